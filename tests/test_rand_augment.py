"""RandAugment and random erasing (data/rand_augment.py) against timm, their reference."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mim_jax import data, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.data import rand_augment as ra
from mim_jax.data import transforms

timm_aa = pytest.importorskip("timm.data.auto_augment")

MAGNITUDES = (0.0, 3.7, 9.0, 10.0)


def _images():
  rng = np.random.default_rng(0)
  # Smooth gradients plus noise: every op (equalise, posterize, shears) changes such an image.
  ramp = np.linspace(0, 255, 24)[None, :, None] * np.ones((20, 1, 1))
  rgb = np.clip(ramp * np.array([1.0, 0.6, 0.3]) + rng.normal(0, 20, (20, 24, 3)), 0, 255)
  return {"RGB": Image.fromarray(rgb.astype(np.uint8), "RGB"),
          "L": Image.fromarray(rgb[..., 0].astype(np.uint8), "L")}


@pytest.mark.parametrize("name", sorted(set(ra.OPS) | set(ra.OPS_INCREASING)))
def test_each_op_equals_timm_at_every_magnitude_and_sign(name, monkeypatch):
  """Our argument rule and op against timm's `LEVEL_TO_ARG` / `NAME_TO_OP` with the same
  magnitude and sign (timm's coin flip replaced by the sign under test), bicubic resampling and
  the mean fill, as MAE's recipe sets them: identical pixels."""
  for mode, img in _images().items():
    fill = 124 if mode == "L" else (124, 116, 104)
    for negate in (False, True):
      monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, n=negate: -v if n else v)
      for magnitude in MAGNITUDES:
        level_fn = timm_aa.LEVEL_TO_ARG[name]
        theirs_args = level_fn(magnitude, {}) if level_fn is not None else ()
        ours_arg = ra.op_argument(name, magnitude, negate)
        assert (ours_arg,) == tuple(theirs_args) or (ours_arg is None and not theirs_args), (
            name, magnitude, negate)
        ours = ra.apply_op(name, img, ours_arg, fill)
        if name.startswith("Posterize") and ours_arg == 0:
          # Pillow >= 12 refuses 0 bits (timm's call raises); older Pillow, which timm was
          # written against, kept none: a black image.
          assert not np.any(np.asarray(ours))
          continue
        theirs = timm_aa.NAME_TO_OP[name](img, *theirs_args, fillcolor=fill,
                                          resample=Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs),
                                      err_msg=f"{name} m={magnitude} negate={negate} {mode}")


def test_the_signed_ops_are_those_whose_argument_has_a_sign():
  """`SIGNED` (the ops that draw a sign) against timm: the ops whose argument flips with its
  coin."""
  signed = set()
  for name in set(ra.OPS) | set(ra.OPS_INCREASING):
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    if level_fn is None:
      continue
    args = set()
    for negate in (False, True):
      timm_aa._randomly_negate, saved = (lambda v, n=negate: -v if n else v), \
          timm_aa._randomly_negate
      try:
        args.add(level_fn(5.0, {}))
      finally:
        timm_aa._randomly_negate = saved
    if len(args) == 2:
      signed.add(name)
  assert signed == ra.SIGNED


def test_policy_parses_like_timm():
  """The op sets are timm's, in its order; "rand-m9-mstd0.5-inc1" (MAE / BEiT fine-tuning) reads
  as timm's `rand_augment_transform` builds it."""
  assert ra.OPS_INCREASING == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
  assert ra.OPS == tuple(timm_aa._RAND_TRANSFORMS)
  for spec in ("rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.3", "rand-mstd1"):
    ours = ra.RandAugment.parse(spec)
    theirs = timm_aa.rand_augment_transform(spec, {})
    assert ours.ops == tuple(op.name for op in theirs.ops), spec
    assert ours.num_layers == theirs.num_layers, spec
    for op in theirs.ops:
      assert (ours.magnitude, ours.prob, ours.magnitude_std) == (
          op.magnitude, op.prob, op.magnitude_std), spec
  # mstd above 100: magnitudes uniform in [0, M] (timm's reading), not a Gaussian of std 101.
  wide = ra.RandAugment.parse("rand-m9-mstd101-p1")
  rng = np.random.default_rng(0)
  seen = [wide.magnitude_draw(rng) for _ in range(2000)]
  assert 0 <= min(seen) < 0.5 and 8.5 < max(seen) <= 9 and abs(np.mean(seen) - 4.5) < 0.3
  for bad in ("rand-m9-x3", "augmix-m5", "rand-n0", "rand-p2"):
    with pytest.raises(ValueError, match="RandAugment"):
      ra.RandAugment.parse(bad)


def test_policy_draws_are_the_elements_and_change_the_image():
  policy = ra.RandAugment.parse("rand-m9-mstd0.5-inc1")
  img = np.asarray(_images()["RGB"])
  outs = [policy(img, np.random.default_rng(s), (124, 116, 104)) for s in range(40)]
  again = [policy(img, np.random.default_rng(s), (124, 116, 104)) for s in range(40)]
  for a, b in zip(outs, again):
    np.testing.assert_array_equal(a, b)  # the element's rng decides everything
  changed = np.mean([np.any(o != img) for o in outs])
  # Two ops at p = 0.5 each: 1 - 0.25 of the images meet at least one (some ops at a weak
  # magnitude or on this image change nothing).
  assert 0.5 < changed < 0.95 and all(o.dtype == np.uint8 and o.shape == img.shape
                                      for o in outs)
  with pytest.raises(ValueError, match="grayscale or RGB"):
    policy(np.zeros((4, 4, 2), np.uint8), np.random.default_rng(0), (0, 0))
  # High-bit-depth images (float32 in [0, 1]) go through the same ops rounded to 8 bits.
  unit = img.astype(np.float32) / 255.0
  for s in range(10):
    as_float = policy(unit, np.random.default_rng(s), (124, 116, 104))
    assert as_float.dtype == np.float32
    np.testing.assert_allclose(as_float * 255.0, outs[s], atol=1e-3)


def test_fill_is_the_mean_on_every_channel():
  """One mean value for all channels (as the normalisation allows) fills grey, not red."""
  assert ra.fill_value((0.5,), 3) == (128, 128, 128)
  assert ra.fill_value((0.485, 0.456, 0.406), 3) == (124, 116, 104)
  rotated = ra.apply_op("Rotate", Image.new("RGB", (8, 8)), 45.0, ra.fill_value((0.5,), 3))
  assert np.asarray(rotated)[0, 0].tolist() == [128, 128, 128]


def test_random_erasing_rectangle_and_rate():
  """timm's RandomErasing(p, mode='pixel'): the rate, one rectangle strictly inside of 2% to
  1/3 of the area (up to rounding) and aspect 0.3 to 1/0.3, N(0, 1) noise in it."""
  rng = np.random.default_rng(0)
  h, w, c = 32, 40, 3
  image = np.full((h, w, c), 7.0, np.float32)
  erased = []
  for _ in range(2000):
    out = ra.random_erasing(image, rng, 0.25)
    assert np.all(image == 7.0)  # the input is not modified
    hit = np.any(out != 7.0, axis=-1)
    if hit.any():
      rows, cols = np.nonzero(hit)
      bh, bw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
      assert bh < h and bw < w and hit.sum() == bh * bw
      assert 0.02 * h * w * 0.8 <= bh * bw <= h * w / 3 * 1.2
      assert 0.3 / 1.5 <= bh / bw <= 1.5 / 0.3
      erased.append(out[hit])
  assert abs(len(erased) / 2000 - 0.25) < 0.03
  noise = np.concatenate(erased)
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
  assert ra.random_erasing(image, rng, 0.0) is image


def _data_config(**overrides):
  fields = registry.base_config("finetune").data.to_dict()
  fields.update(source="synthetic", synthetic_size=16, num_workers=0, mean=(0.5,), std=(0.5,))
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def test_the_pipeline_applies_them():
  """Both fields act in the training pipeline (same seed, same crops: only they differ); the
  erasing comes after the normalisation (its noise has std 1 whatever data.std is)."""
  def batch(**fields):
    it = data.make_train_iterator(_data_config(**fields), image_size=(16, 16), channels=3,
                                  global_batch_size=16, seed=0, process_index=0,
                                  process_count=1)
    return next(it)["image"]
  plain, again = batch(), batch()
  np.testing.assert_array_equal(plain, again)
  augmented = batch(rand_augment="rand-m9-mstd0.5-inc1")
  erased = batch(random_erasing=1.0)
  assert np.mean(np.any(augmented != plain, axis=(1, 2, 3))) > 0.4
  assert np.all(np.any(erased != plain, axis=(1, 2, 3)))
  # A small data.std spreads the normalised pixels over +-50; the erased ones stay N(0, 1).
  narrow, narrow_erased = batch(std=(0.01,)), batch(random_erasing=1.0, std=(0.01,))
  noise = narrow_erased[narrow_erased != narrow]
  assert noise.size > 100 and abs(noise.std() - 1.0) < 0.1 and abs(noise.mean()) < 0.1
  # TrainAugment with neither is the plain crop + flip.
  aug = transforms.TrainAugment(image_size=(8, 8), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                hflip=False,
                                normalize=transforms.Normalizer((0.0,), (1.0,), 1))
  img = {"image": np.arange(64, dtype=np.uint8).reshape(8, 8, 1), "label": 3}
  np.testing.assert_allclose(aug.random_map(img, np.random.default_rng(0))["image"][..., 0],
                             np.arange(64).reshape(8, 8) / 255, rtol=1e-6)


@pytest.mark.parametrize("overrides,field", [
    ({"data.rand_augment": "rand-m9-q2"}, "data.rand_augment"),
    ({"data.random_erasing": 1.5}, "data.random_erasing"),
    ({"data.rand_augment": "rand-m9-mstd0.5-inc1", "data.augment_on": "device",
      "data.source": "fashion_mnist"}, "data.rand_augment"),
    ({"data.rand_augment": "rand-m9-mstd0.5-inc1", "channels": 4, "data.mean": (0.5,),
      "data.std": (0.5,)}, "data.rand_augment"),
])
def test_bad_settings_fail_at_validation(overrides, field):
  c = registry.base_config("mae")
  config_defaults.override(c, **overrides)
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    registry.validate_config(c)
