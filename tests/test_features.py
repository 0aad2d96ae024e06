"""Features for downstream work: the same numbers the evaluations use, at any resolution, with
attention maps, from Python and from the command line."""

from __future__ import annotations

import errno
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mim_jax import features
from mim_jax.config.errors import ConfigError
from mim_jax.convert import our_weights
from mim_jax.data import make_eval_iterator
from mim_jax.evaluate import frozen
from mim_jax.training import checkpoint, loop, setup

from conftest import tiny_config


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mae"))
  loop.run(tiny_config("mae", total_steps=2), workdir)
  return workdir


def _raw_images(n=10, size=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_features_equal_the_k_nn_jobs(encoder_dir, tmp_path):
  """cls and mean-pooled features of the export equal those the k-NN / probe jobs compute on
  the same (synthetic) images, block 0 and block 1."""
  prepared = setup.prepare(tiny_config("knn", init_from=encoder_dir))
  batch = next(make_eval_iterator(prepared.data, image_size=(16, 16), channels=3,
                                  batch_size=16, process_index=0, process_count=1))
  enc = features.load(encoder_dir)
  params, _ = checkpoint.load_encoder(os.path.join(encoder_dir, "encoder"))  # the job's weights
  for a, b in zip(jax.tree.leaves(enc.params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (tuple(enc.mean), tuple(enc.std)) == (tuple(prepared.data.mean),
                                               tuple(prepared.data.std))
  for block in (0, 1):
    extractor = frozen.FeatureExtractor(prepared, layer=block)
    want = np.asarray(extractor._features(params, batch["image"]))  # [B, cls D + gap D]
    want = want.reshape(len(want), len(extractor.pools), -1)
    # The same images as raw pixels through the public path: de-normalise the batch.
    raw = (batch["image"] * np.asarray(prepared.data.std, np.float32)
           + np.asarray(prepared.data.mean, np.float32))
    got = features.extract(enc, raw.astype(np.float32), blocks=(block,), batch_size=5)
    np.testing.assert_allclose(got[f"cls_block{block}"], want[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[f"gap_block{block}"], want[:, 1], rtol=1e-5, atol=1e-5)


def test_two_resolutions_patch_tokens_and_attention(encoder_dir):
  images = _raw_images()
  small = features.extract(features.load(encoder_dir), images, blocks=(0, 2),
                           patch_tokens=True, attention=True)
  big_enc = features.load(encoder_dir, image_size=(32, 32))
  big = features.extract(big_enc, np.repeat(np.repeat(images, 2, 1), 2, 2),
                         patch_tokens=True, attention=True)
  assert small["patch_block0"].shape == (10, 16, 64) and big["patch_block0"].shape == (10, 64, 64)
  assert small["attention"].shape == (10, 2, 17, 17) and big["attention"].shape == (10, 2, 65, 65)
  np.testing.assert_allclose(small["attention"].sum(-1), 1.0, rtol=1e-5)
  assert small["rollout"].shape == (10, 4, 4) and big["rollout"].shape == (10, 8, 8)
  np.testing.assert_allclose(big["rollout"].sum(axis=(1, 2)), 1.0, rtol=1e-5)
  assert all(np.isfinite(v).all() for v in (*small.values(), *big.values()))
  # Deterministic, and batching does not change a row.
  again = features.extract(features.load(encoder_dir), images[3:4], blocks=(0, 2))
  np.testing.assert_allclose(again["cls_block2"][0], small["cls_block2"][3], rtol=1e-5,
                             atol=1e-6)


def test_command_line_writes_features_and_attention_pictures(encoder_dir, tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  for i, image in enumerate(_raw_images(n=3, size=20)):
    Image.fromarray(image).save(folder / f"{i}.png")
  out, png = tmp_path / "feats.npz", tmp_path / "maps.png"
  assert features.main(["--encoder", encoder_dir, "--images", str(folder), "--out", str(out),
                        "--blocks", "0,1", "--attention", "--pictures", str(png)]) == 0
  saved = np.load(out)
  assert saved["cls_block0"].shape == (3, 64) and saved["gap_block1"].shape == (3, 64)
  # A folder of photos of another size is centre-cropped as the evaluations crop an image
  # folder (0.875; the command kept the whole image).
  enc = features.load(encoder_dir)
  raw = np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(3)])
  cfg = tiny_config("mae", **{"data.source": "image_folder", "data.path": str(folder)}).data
  batch = next(make_eval_iterator(cfg, image_size=(16, 16), channels=3, batch_size=3,
                                  process_index=0, process_count=1, split=cfg.split))
  np.testing.assert_allclose(features.prepare(enc, raw, 0.875), batch["image"], atol=1e-6)
  np.testing.assert_allclose(saved["cls_block0"], features.extract(
      enc, raw, crop_fraction=0.875)["cls_block0"], rtol=1e-6, atol=1e-6)
  assert saved["rollout"].shape == (3, 4, 4)
  picture = np.asarray(Image.open(png))
  assert picture.ndim == 3 and picture.shape[0] > 3 * 16  # one row per image


def test_command_line_refuses_flags_it_would_not_use(tmp_path, capsys):
  """--pictures draws the attention maps, so without --attention it is an error (it wrote
  nothing, silently); a crop fraction outside (0, 1], a picture path that is not a PNG file,
  a batch below 1 and an image size that is not H,W or one side are refused before the
  encoder loads."""
  np.save(tmp_path / "images.npy", _raw_images(n=2))
  common = ["--encoder", str(tmp_path / "absent"), "--images", str(tmp_path / "images.npy"),
            "--out", str(tmp_path / "f.npz")]
  for extra, message in ((["--pictures", str(tmp_path / "m.png")], "pass --attention too"),
                         (["--crop_fraction", "1.5"], "--crop_fraction=1.5: expected"),
                         # a folder for the picture failed after the .npz had been written
                         (["--attention", "--pictures", str(tmp_path)],
                          "expected the path of a .png file"),
                         # a negative batch wrote an empty .npz, silently
                         (["--batch_size", "-2"], "--batch_size=-2: expected a positive"),
                         (["--image_size", "32,32,3"], "--image_size=32,32,3: expected H,W"),
                         (["--image_size", "a"], "--image_size=a: expected H,W")):
    with pytest.raises(SystemExit) as exited:
      features.main(common + extra)
    assert exited.value.code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / "f.npz").exists()


def test_loading_a_training_workdir_warns_of_nothing(encoder_dir, caplog):
  """Orbax warned of a missing _CHECKPOINT_METADATA in the step's `state` item, which keeps it
  one folder up: a complete restore looked like a broken checkpoint."""
  with caplog.at_level(logging.WARNING):
    _, params = our_weights.read_weights(encoder_dir)  # continued pre-training's reader
  assert set(params) == {"encoder", "decoder"}
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_evaluation_refusing_its_encoders_channels_says_they_came_from_init_from(
    encoder_dir, tmp_path):
  """config.channels of an evaluation is the encoder's (adopted from init_from), not one the
  user set: the refusal says where it came from."""
  for split in ("train", "test"):
    np.save(tmp_path / f"{split}.npy", np.zeros((8, 16, 16, 5), np.uint16))
    np.save(tmp_path / f"{split}_labels.npy", np.zeros(8, np.int64))
  config = tiny_config("knn", init_from=encoder_dir, **{
      "data.source": "npy", "data.path": str(tmp_path), "data.eval_split": "test",
      "data.mean": (0.5,), "data.std": (0.5,)})
  with pytest.raises(ConfigError, match=r"config.channels=3 is invalid: .*they have 5.*"
                     r"config.channels is the encoder's in config.init_from=.*had 3 channel"):
    setup.prepare(config)


def test_command_line_bad_input_is_one_line_and_writes_nothing(encoder_dir, tmp_path, capsys):
  """Each of these was a traceback (exit 1), some after every feature had been computed and
  then lost; an empty array wrote an empty .npz and exited 0. Now: one line naming the
  input, exit 2, before the images are read where the check can be made before."""
  good = tmp_path / "good.npy"
  np.save(good, _raw_images(n=2))
  pickled = tmp_path / "pickled.npy"
  np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  flat, empty = tmp_path / "flat.npy", tmp_path / "empty.npy"
  np.save(flat, np.zeros((4, 16), np.uint8))
  np.save(empty, np.zeros((0, 16, 16, 3), np.uint8))
  bands = tmp_path / "bands.npy"  # 16-bit, 5 bands: no conversion to the encoder's RGB
  np.save(bands, np.zeros((3, 16, 16, 5), np.uint16))
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "broken.png").write_bytes(b"not a png")
  out = tmp_path / "f.npz"
  for encoder, images, extra, says in (
      (tmp_path / "absent", good, [], "not a pre-training workdir whose run finished"),
      (encoder_dir, good, ["--blocks", "9"], "--blocks=9: this encoder has 2 blocks"),
      (encoder_dir, good, ["--image_size", "18"], "not a multiple of the encoder's patch"),
      (encoder_dir, pickled, [], "pickled.npy: not an array of images"),
      (encoder_dir, flat, [], "flat.npy: expected images [N, H, W]"),
      (encoder_dir, empty, [], "empty.npy: expected images [N, H, W]"),
      (encoder_dir, folder, [], "broken.png: not an image"),
      (encoder_dir, bands, [], "bands.npy: image 0 has 5 channel(s) (uint16) and the encoder "
       f"at {encoder_dir} takes 3")):
    code = features.main(["--encoder", str(encoder), "--images", str(images), "--out",
                          str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, (says, err)
  assert not out.exists()
  for extra, says in ((["--images", str(tmp_path / "absent.npy")], "no such folder or .npy"),
                      (["--blocks", "a"], "--blocks=a: expected comma-separated"),
                      (["--blocks", ""], "--blocks=: expected comma-separated"),
                      (["--out", str(tmp_path / "feats")], "expected the path of a .npz"),
                      (["--out", str(tmp_path)], "expected the path of a .npz")):
    args = ["--encoder", encoder_dir, "--images", str(good), "--out", str(out), *extra]
    # (argparse keeps the last --images)
    with pytest.raises(SystemExit) as exited:
      features.main(args)
    assert exited.value.code == 2 and says in capsys.readouterr().err
  # A new folder for the output is made (the file written whole).
  nested = tmp_path / "new" / "f.npz"
  assert features.main(["--encoder", encoder_dir, "--images", str(good), "--out",
                        str(nested)]) == 0
  assert np.load(nested)["cls_block0"].shape == (2, 64)


def _read_only(monkeypatch, folder):
  """Makes writes under `folder` fail as on a read-only file system (root ignores chmod)."""
  real_open = open

  def fake_open(path, *args, **kwargs):
    if str(path).startswith(str(folder) + os.sep):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)  # ensure_writable's probe


def test_an_out_it_cannot_write_is_refused_before_the_encoder_loads(tmp_path, capsys,
                                                                     monkeypatch):
  """--out under a regular file, or in a read-only folder, failed only after every feature
  had been computed, naming the parent (`File exists`) or a temporary file, not --out. Now one
  line naming the flag before the encoder loads (absent here: it is never reached)."""
  np.save(tmp_path / "images.npy", _raw_images(n=2))
  afile, readonly = tmp_path / "afile", tmp_path / "readonly"
  afile.write_text("")
  readonly.mkdir()
  _read_only(monkeypatch, readonly)
  common = ["--encoder", str(tmp_path / "absent"), "--images", str(tmp_path / "images.npy")]
  for flag, path, extra, says in (
      ("--out", afile / "x.npz", [], f"{afile} is a file, not a folder"),
      ("--out", afile / "deeper" / "x.npz", [], f"{afile} is a file, not a folder"),
      ("--out", readonly / "x.npz", [], f"{readonly} cannot be written (Read-only file"),
      ("--out", readonly / "new" / "x.npz", [], f"{readonly} cannot be written (Read-only"),
      ("--pictures", afile / "m.png", ["--out", str(tmp_path / "f.npz"), "--attention"],
       f"{afile} is a file, not a folder")):
    code = features.main([*common, *extra, flag, str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {flag}={str(path)!r} is invalid: a file in a folder"), err
    assert says in err and len(err.strip().splitlines()) == 1, err
  assert sorted(os.listdir(readonly)) == [] and not (tmp_path / "f.npz").exists()
  # A writable --out passes and creates nothing yet: the absent encoder is the error.
  for out in (tmp_path / "new" / "f.npz", "gs://bucket/f.npz"):  # gs://: left to its write
    assert features.main([*common, "--out", str(out)]) == 2
    assert "not a pre-training workdir" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()


def test_images_with_nan_or_inf_are_refused_naming_the_file(tmp_path):
  """Float images holding NaN or inf gave NaN feature rows, written without a word. The reader
  refuses them (main prints its ValueError in one line, exit 2), naming the file, the count
  and the first image of an array, before the encoder runs."""
  import tifffile
  images = np.random.default_rng(0).random((6, 16, 16, 3), np.float32)
  images[4, 1, 2, 0] = np.nan
  np.save(tmp_path / "bands.npy", images)
  with pytest.raises(ValueError, match=rf"^{tmp_path}/bands.npy: it holds 1 NaN value\(s\) in 1 "
                     r"of its 6 image\(s\), the first in image 4: pixel values must be finite"):
    features.read_images(str(tmp_path / "bands.npy"))
  folder = tmp_path / "tiffs"
  folder.mkdir()
  tifffile.imwrite(folder / "0.tif", images[0])
  tifffile.imwrite(folder / "1.tif", images[4])
  with pytest.raises(ValueError, match=rf"^{folder}/1.tif: 1 NaN or inf pixel value\(s\)"):
    features.read_images(str(folder))
  images[4] = 0.5  # finite floats are read as they are
  np.save(tmp_path / "bands.npy", images)
  assert features.read_images(str(tmp_path / "bands.npy")).shape == (6, 16, 16, 3)


def test_a_folder_is_read_in_the_evaluations_order_and_types_are_not_mixed(tmp_path):
  """The rows of a folder come as the image folders list it (each folder's files, then its
  sub-folders; hidden ones skipped): a sort of full paths put cat-2/ before cat/ and read
  .ipynb_checkpoints/ copies. An 8-bit and a 16-bit image of one size were stacked into one
  float array, the 8-bit one as 0..255 read as if in [0, 1]."""
  from mim_jax.data import sources, transforms
  px = np.full((8, 8), 128, np.uint8)
  for name in ("a.png", "cat/x.png", "cat-2/y.png", ".ipynb_checkpoints/z.png"):
    os.makedirs(os.path.dirname(str(tmp_path / name)) or str(tmp_path), exist_ok=True)
    Image.fromarray(px).save(tmp_path / name)
  images = features.read_images(str(tmp_path))
  assert len(images) == 3 and list(sources.walk_images(str(tmp_path))) == [
      str(tmp_path / n) for n in ("a.png", "cat/x.png", "cat-2/y.png")]
  Image.fromarray(px.astype(np.uint16) * 257).save(tmp_path / "cat" / "x.png")  # 16-bit
  mixed = features.read_images(str(tmp_path))
  assert mixed.dtype == object and [im.dtype for im in mixed] == [np.uint8, np.float32, np.uint8]
  norm = transforms.Normalizer((0.5,), (0.5,), 1)
  values = [float(norm(transforms.to_channels(im, 1)).max()) for im in mixed]
  np.testing.assert_allclose(values, values[0], atol=1e-6)  # the same grey, the same input
