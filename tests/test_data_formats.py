"""Data beyond 8-bit RGB: 16-bit PNG and TIFF without lost bits, any channel count, .npy
arrays, per-channel statistics, and pictures of N-channel data; 8-bit data unchanged."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mim_jax import data, features, recipes, registry
from mim_jax.config.errors import ConfigError
from mim_jax.data import sources, stats, transforms
from mim_jax.training import loop

from conftest import REPO, requires_fmnist, tiny_config

tifffile = pytest.importorskip("tifffile")


def _png16(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array.astype(np.uint16)).save(buf, format="PNG")
  return buf.getvalue()


def _tiff(array: np.ndarray, **kwargs) -> bytes:
  buf = io.BytesIO()
  tifffile.imwrite(buf, array, **kwargs)
  return buf.getvalue()


def test_bmp_and_webp_files_of_an_image_folder_are_read(tmp_path):
  # Skipped without a word before: a folder of 24 files read as 12.
  pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  for i, fmt in enumerate(("PNG", "BMP", "WEBP")):
    (tmp_path / "a").mkdir(exist_ok=True)
    Image.fromarray(pixels).save(tmp_path / "a" / f"{i}.{fmt.lower()}", fmt, lossless=True)
  source = sources.ImageFolderSource(str(tmp_path))
  assert len(source) == 3
  for i in range(3):
    decoded = transforms.decode_image(open(source[i]["path"], "rb").read(), 3)
    np.testing.assert_array_equal(decoded, pixels)


def test_16_bit_grayscale_png_keeps_every_bit():
  values = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # 4096 distinct levels
  decoded = transforms.decode_image(_png16(values), channels=1)
  assert decoded.dtype == np.float32 and decoded.shape == (64, 64, 1)
  np.testing.assert_array_equal(decoded[..., 0], values.astype(np.float32) / 65535.0)
  assert len(np.unique(decoded)) == 4096  # 8 bits would leave 256


def test_16_bit_grayscale_png_opened_as_32_bit_by_older_pillow(monkeypatch):
  """Older Pillow (10, 11) opens a 16-bit grayscale PNG in mode "I" (int32): its values are still
  16-bit and are scaled by 1/65535 (as int32 they came out about 3e-5 at most, black)."""
  values = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
  open_image = transforms.Image.open

  def as_older_pillow(fp, *args, **kwargs):
    img = open_image(fp, *args, **kwargs)
    img.load()
    assert img.mode.startswith("I;16")
    return img.convert("I")
  monkeypatch.setattr(transforms.Image, "open", as_older_pillow)
  decoded = transforms.decode_image(_png16(values), channels=1)
  np.testing.assert_array_equal(decoded[..., 0], values.astype(np.float32) / 65535.0)


def test_a_16_bit_image_with_a_fourth_channel_is_refused_with_the_fields_to_set():
  """An 8-bit RGBA image loses its alpha; beyond 8 bits the fourth channel may be a band, so
  it is refused, naming config.channels (the message said only 'cannot convert')."""
  with pytest.raises(ValueError, match=r"uint16 image with 4 channels to 3.*config.channels=4"):
    transforms.decode_image(_tiff(np.zeros((4, 4, 4), np.uint16)), channels=3)


def test_16_bit_colour_png_is_refused_rather_than_cut_to_8_bits():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
  raw = bytearray(buf.getvalue())
  raw[24] = 16  # the IHDR bit depth of a 48-bit RGB PNG (PIL reads those as 8-bit RGB)
  with pytest.raises(ValueError, match="16-bit colour PNG.*TIFF"):
    transforms.decode_image(bytes(raw), channels=3)


@pytest.mark.parametrize("planar", [False, True], ids=["interleaved", "planar"])
def test_multichannel_16_bit_tiff(planar):
  rng = np.random.default_rng(0)
  bands = rng.integers(0, 65536, (12, 10, 5)).astype(np.uint16)
  stored = np.moveaxis(bands, -1, 0) if planar else bands
  decoded = transforms.decode_image(_tiff(stored), channels=5)
  np.testing.assert_array_equal(decoded, bands.astype(np.float32) / 65535.0)


def test_float_resize_and_normalise_keep_high_bit_depth():
  image = (np.arange(20 * 20 * 2, dtype=np.float32).reshape(20, 20, 2) / 800.0)
  out = transforms.resize_box(image, (0, 0, 20, 20), (20, 20))
  np.testing.assert_allclose(out, image, atol=1e-6)  # an identity resize stays exact
  half = transforms.resize_box(image, (0, 0, 20, 20), (10, 10))
  assert half.dtype == np.float32 and half.shape == (10, 10, 2)
  norm = transforms.Normalizer((0.5, 0.25), (0.5, 0.25), 2)
  np.testing.assert_allclose(norm(image), (image - [0.5, 0.25]) / [0.5, 0.25], rtol=1e-5,
                             atol=1e-6)


@requires_fmnist
def test_fashion_mnist_batches_are_bit_identical_to_before():
  """The 8-bit path is the one every published result used: the first training batches and
  an evaluation batch hash to what the code produced before high-bit-depth support."""
  c = recipes.fmnist_pretraining(registry.base_config("mae"), None)
  c.data.num_workers = 0
  it = data.make_train_iterator(c.data, image_size=(28, 28), channels=1, global_batch_size=32,
                                seed=3)
  first, second = next(it), next(it)
  it.close()
  ev = next(data.make_eval_iterator(c.data, image_size=(28, 28), channels=1, batch_size=16,
                                    process_index=0, process_count=1))
  digest = hashlib.sha256(b"".join(np.ascontiguousarray(x["image"]).tobytes()
                                   for x in (first, second, ev))).hexdigest()
  assert digest == "11756d5eba95881c40d8897c6cce2a05bf78310c3cba6b2d471a577eb32292be"


def _npy_folder(tmp_path, channels=5, n=64, dtype=np.uint16):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 60000, (n, 16, 16, channels)).astype(dtype)
  images[:, :8] //= 4  # structure: the top half darker
  np.save(tmp_path / "train.npy", images)
  np.save(tmp_path / "train_labels.npy", np.arange(n) % 4)
  np.save(tmp_path / "test.npy", images[:16])
  np.save(tmp_path / "test_labels.npy", np.arange(16) % 4)
  return images


def test_five_band_npy_data_through_training_pictures_and_evaluation(tmp_path):
  """MAE and MaskFeat (HOG per band) train on 5-band 16-bit arrays; pictures show a chosen
  band; k-NN reads the same source; the class count comes from the labels."""
  folder = tmp_path / "bands"
  folder.mkdir()
  images = _npy_folder(folder)
  fields = {"data.source": "npy", "data.path": str(folder), "channels": 5,
            "data.mean": (0.4,), "data.std": (0.3,)}
  state = loop.run(tiny_config("mae", total_steps=2, viz_every=2, viz_channels=(4,), **fields),
                   str(tmp_path / "mae"))
  assert state.params["encoder"]["patch_embed"]["kernel"].shape[0] == 4 * 4 * 5
  picture = np.asarray(Image.open(tmp_path / "mae" / "reconstructions" / "step_00000002.png"))
  assert picture.ndim == 3 and picture.shape[-1] == 3
  loop.run(tiny_config("maskfeat", total_steps=1, **{"masking.min_block": 2,
                                                     "target.hog.cell_size": 2,
                                                     "target.hog.gaussian_window": 4, **fields}),
           str(tmp_path / "maskfeat"))
  results = loop.run(tiny_config("knn", init_from=str(tmp_path / "mae"), **{"knn.k": 5,
                                                                          **fields}),
                     str(tmp_path / "knn"))
  # The 16 test arrays are the first 16 training arrays (their labels arbitrary): each finds
  # itself in the bank only if both splits are read alike (mean-pooled: a 2-step encoder's
  # [CLS] token hardly depends on its image yet).
  assert results["knn_top1_gap"] >= 0.9, results
  assert data.num_classes(_npy_cfg(folder)) == 4
  batch = next(data.make_eval_iterator(_npy_cfg(folder), image_size=(16, 16), channels=5,
                                       batch_size=4, process_index=0, process_count=1))
  np.testing.assert_allclose(batch["image"], (images[:4] / 65535.0 - 0.4) / 0.3, rtol=1e-5,
                             atol=1e-5)


def _npy_cfg(folder):
  c = registry.base_config("mae").data
  c.update(source="npy", path=str(folder), mean=(0.4,), std=(0.3,), split="train")
  return c


def test_channel_statistics_and_their_overrides(tmp_path):
  folder = tmp_path / "bands"
  folder.mkdir()
  images = _npy_folder(folder, channels=3)
  mean, std, count = stats.channel_stats(_npy_cfg(folder), image_size=(8, 8), channels=3)
  unit = images.astype(np.float64) / 65535.0
  np.testing.assert_allclose(mean, unit.mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(std, unit.std(axis=(0, 1, 2)), rtol=1e-9)
  assert count == 64
  # As training reads the split: without the held-out examples, only the label subset.
  held = _npy_cfg(folder)
  held.update(holdout=16, label_fraction=0.5)
  rows = sources.train_indices(held, np.arange(64) % 4)
  assert len(rows) == 24
  got_mean, got_std, got_count = stats.channel_stats(held, image_size=(8, 8), channels=3)
  assert got_count == 24
  np.testing.assert_allclose(got_mean, unit[rows].mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(got_std, unit[rows].std(axis=(0, 1, 2)), rtol=1e-8)
  line = stats.format_overrides(mean, std)
  assert line.startswith("--config.data.mean='(") and "--config.data.std=" in line
  # The command prints the same line.
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats",
                        f"--config={REPO}/configs/mae_fmnist.py", "--config.data.source=npy",
                        f"--config.data.path={folder}", "--config.channels=3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == line


def test_channel_statistics_of_generated_images_at_the_configs_size(tmp_path):
  """Synthetic images are made at the size asked: the statistics read them at the config's
  image_size (they were made at 1x1, whose one pixel per image gave a std 3.7x too small)."""
  cfg = registry.base_config("mae").data
  cfg.update(source="synthetic", synthetic_size=20)
  mean, std, count = stats.channel_stats(cfg, image_size=(16, 16), channels=3)
  images = np.stack([sources.SyntheticSource(20, (16, 16), 3)[i]["image"] for i in range(20)])
  unit = images.astype(np.float64) / 255.0
  assert count == 20
  np.testing.assert_allclose(mean, unit.mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(std, unit.std(axis=(0, 1, 2)), rtol=1e-8)


def test_bad_npy_arrays_are_one_line_errors(tmp_path):
  """An array of the wrong rank, or labels that do not match the images: bad input, one line
  and exit 2 (ConfigError) from the trainer and the tools, not a ValueError's traceback."""
  np.save(tmp_path / "train.npy", np.zeros((4, 8), np.uint8))
  with pytest.raises(ConfigError, match=r"train.npy holds an array of shape \(4, 8\)"):
    sources.NpySource(str(tmp_path), "train")
  np.save(tmp_path / "train.npy", np.zeros((4, 8, 8), np.uint8))
  np.save(tmp_path / "train_labels.npy", np.zeros(3, np.int64))
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats",
                        f"--config={REPO}/configs/mae_fmnist.py", "--config.data.source=npy",
                        f"--config.data.path={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.startswith("error: ") and "has 3 labels for 4 images" in out.stderr
  assert "Traceback" not in out.stderr
  # An array numpy reads only with pickles: the field is named in full (it said config.split).
  np.save(tmp_path / "train.npy", np.array([None] * 4, object), allow_pickle=True)
  with pytest.raises(ConfigError, match=r"^config.data.split='train' is invalid: a split whose "
                     r".*train.npy is a .npy array"):
    data.validate_data_config(_npy_cfg(tmp_path), image_size=(8, 8), channels=1)


def test_integer_pixels_other_than_uint8_and_uint16_are_refused_before_training(tmp_path):
  """An int64 array of 0..255 (what np.array of a list of ints gives) was read as fractions of
  int64's maximum: every image ~1e-17, one constant after normalisation, and training went on.
  Refused by validation, the decoder (a TIFF) and the feature tool, saying what to store."""
  np.save(tmp_path / "train.npy", np.full((4, 8, 8), 200, np.int64))
  with pytest.raises(ConfigError, match=r"train.npy holds pixels of a type that is read; int64 "
                     r"pixel values are not read: store 8-bit data as uint8"):
    data.validate_data_config(_npy_cfg(tmp_path), image_size=(8, 8), channels=1)
  with pytest.raises(ValueError, match=r"int16 pixel values are not read"):
    transforms.decode_image(_tiff(np.full((4, 4), -3, np.int16)), channels=1)
  with pytest.raises(ValueError, match=r"train.npy: int64 pixel values are not read"):
    features.read_images(str(tmp_path / "train.npy"))


def test_8_bit_images_of_any_channel_count_stay_8_bit_through_the_resize():
  """A uint8 image of 2 or 4+ channels was resized as float32 of 0..255 and then normalised as
  if in [0, 1] (no / 255): 255x too large on the host path only. Each channel is resized as 8-bit
  grayscale, exactly as a 1-channel image is."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 10, 4), np.uint8)
  box = (1.5, 0.5, 9.0, 8.0)
  out = transforms.resize_box(image, box, (6, 5))
  assert out.dtype == np.uint8 and out.shape == (6, 5, 4)
  top, left, h, w = box
  for k in range(4):  # PIL's 8-bit bicubic resize of the channel alone
    want = Image.fromarray(image[..., k], "L").resize(
        (5, 6), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    np.testing.assert_array_equal(out[..., k], np.asarray(want))


def _encoded(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def test_8_bit_tiffs_are_read_by_what_their_values_mean():
  """Palette, CMYK, bilevel and inverted-grayscale (MINISWHITE) TIFFs were read as raw samples
  (palette indices as grey levels, C, M, Y as R, G, B): now as PIL reads them, the same pixels
  as the PNG of the same image. 16-bit and multi-band TIFFs still keep every sample."""
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[:2], rgb[2:] = (255, 0, 0), (0, 0, 255)
  image = Image.fromarray(rgb)
  for variant in (image.quantize(2), image.convert("CMYK"), image.convert("1")):
    for channels in (1, 3):
      png = variant if variant.mode != "CMYK" else variant.convert("RGB")
      np.testing.assert_array_equal(
          transforms.decode_image(_encoded(variant, "TIFF"), channels),
          transforms.decode_image(_encoded(png, "PNG"), channels), err_msg=variant.mode)
  grey = np.array([[0, 255], [255, 0]], np.uint8)  # stored inverted, the tag says so
  inverted = _tiff(255 - grey, photometric="miniswhite")
  np.testing.assert_array_equal(transforms.decode_image(inverted, 1)[..., 0], grey)
  # What PIL would misread stays with tifffile: signed 8-bit samples (refused), and bands
  # beyond the mode's (RGB + 2: read whole, not cut to RGB).
  with pytest.raises(ValueError, match="int8 pixel values are not read"):
    transforms.decode_image(_tiff(np.full((4, 4), -3, np.int8)), channels=1)
  bands = np.random.default_rng(0).integers(0, 256, (6, 6, 5), np.uint8)
  five = _tiff(bands, photometric="rgb", planarconfig="contig", extrasamples=(0, 0))
  assert Image.open(io.BytesIO(five)).mode == "RGB"  # PIL's view: the two extra bands gone
  np.testing.assert_array_equal(transforms.decode_image(five, 5), bands)
  with pytest.raises(ValueError, match="5 channels to 3"):
    transforms.decode_image(five, 3)


def test_8_bit_files_with_alpha_keep_it_for_2_and_4_channels():
  """config.channels=4 (or 2) with RGBA (gray + alpha) PNGs failed on every image (converted to
  RGB, then reshaped to 4 channels); more channels than a PNG holds is a clear error."""
  rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), np.uint8)
  png = _encoded(Image.fromarray(rgba, "RGBA"), "PNG")
  np.testing.assert_array_equal(transforms.decode_image(png, 4), rgba)
  gray_alpha = transforms.decode_image(png, 2)
  np.testing.assert_array_equal(gray_alpha[..., 1], rgba[..., 3])
  np.testing.assert_array_equal(gray_alpha[..., 0],
                                np.asarray(Image.fromarray(rgba, "RGBA").convert("LA"))[..., 0])
  with pytest.raises(ValueError, match=r"has at most 4 channels, not the 5 of config.channels"):
    transforms.decode_image(png, 5)


def test_float_images_with_nan_or_inf_are_refused_naming_the_file(tmp_path, monkeypatch):
  """A float .npy split holding NaN or inf printed nan statistics, wrote NaN feature rows and
  trained on NaN input. The shared checks refuse it, naming the file, the count and the first
  image: data validation (training, the statistics, bench --feed) and the source itself (a
  run that builds one unvalidated); a float TIFF of an image folder is a bad image for the
  decoder (test_features has the features' reader). The scan goes chunk by chunk (3 images at
  a time here)."""
  monkeypatch.setattr(sources, "_SCAN_BYTES", 3 * 8 * 8 * 4)
  images = np.random.default_rng(0).random((40, 8, 8), np.float32)
  images[17, 2, 3], images[17, 5, 5], images[31, 0, 0] = np.nan, np.nan, -np.inf
  np.save(tmp_path / "train.npy", images)
  says = (rf"{tmp_path}/train.npy holds .*2 NaN and 1 inf value\(s\) in 2 of its 40 "
          r"image\(s\), the first in image 17")
  with pytest.raises(ConfigError, match=r"^config.data.split='train' is invalid: a split whose "
                     rf".*{says}.*NaN or inf input makes the loss NaN"):
    data.validate_data_config(_npy_cfg(tmp_path), image_size=(8, 8), channels=1)
  with pytest.raises(ConfigError, match=says):
    sources.NpySource(str(tmp_path), "train")
  decode = transforms.DecodeImage(channels=1, on_bad_image="raise", skip_log_dir="")
  tiff = tmp_path / "band.tif"
  tiff.write_bytes(_tiff(images[31]))
  with pytest.raises(transforms.BadImageError, match=rf"{tiff}: NonFiniteImageError: 1 NaN or inf"):
    decode.map({"path": str(tiff)})
  # The statistics command: one line and exit 2 (it printed nan for the mean and std).
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats",
                        f"--config={REPO}/configs/mae_fmnist.py", "--config.data.source=npy",
                        f"--config.data.path={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and not out.stdout, out.stderr[-2000:]
  assert out.stderr.startswith("error: config.data.split='train' is invalid") and (
      "2 NaN and 1 inf value(s) in 2 of its 40 image(s), the first in image 17" in out.stderr)
  # Finite float data (rewritten: a new version of the file) passes every check.
  images[17], images[31] = 0.5, 0.25
  np.save(tmp_path / "train.npy", images)
  data.validate_data_config(_npy_cfg(tmp_path), image_size=(8, 8), channels=1)
  assert len(sources.NpySource(str(tmp_path), "train")) == 40


@pytest.mark.parametrize("args, says", [
    (("--max_images=-1",), "error: --max_images=-1 is invalid: an image count >= 0"),
    (("--config.data.path=/no/such/folder",), "error: config.data.path='/no/such/folder' is "
     "invalid: an existing folder with the Fashion-MNIST IDX files"),
    # Fields it would not read: it computes data.mean / data.std and trains nothing.
    (("--config.data.std=(0.5,)",), "error: config.data.std=(0.5,) is not read by "
     "mim_jax.data.stats"),
    (("--config.optimizer.base_lr=0.1",), "error: config.optimizer.base_lr=0.1 is not read"),
    # Data fields it would not read (it printed the training split's statistics for them).
    (("--config.data.eval_split=test",), "error: config.data.eval_split='test' is not read by "
     "mim_jax.data.stats"),
    (("--config.data.hflip=False",), "error: config.data.hflip=False is not read"),
    (("--config.image_size=(56,56)",), "error: config.image_size=(56, 56) is not read"),
    (("--config.data.tfds_name=foo",), "error: config.data.tfds_name='foo' is not used: only "
     "data.source='tfds' reads it"),
    # A mistyped field or a missing file: one line, not a traceback.
    (("--config.data.pth=/x",), "error: config.data.pth does not exist: did you mean "
     "config.data.path"),
    (("--config=configs/nope.py",), "error: --config='configs/nope.py' is invalid"),
])
def test_channel_statistics_command_refuses_bad_input_in_one_line(args, says):
  config = [a for a in args if a.startswith("--config=")] or [
      f"--config={REPO}/configs/mae_fmnist.py"]
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats", *config,
                        *[a for a in args if not a.startswith("--config=")]],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.startswith(says), out.stderr[-2000:]


def test_channel_statistics_of_any_split_and_of_a_small_range(tmp_path):
  """The test split reads as the training split would (it was refused by the check that an
  evaluation not score its training split); values of a small range print with significant
  digits (0.0000 was a std the trainer refuses), and a constant channel is an error."""
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats",
                        f"--config={REPO}/configs/mae_fmnist.py", "--config.data.split=test",
                        "--max_images=50"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "50 images of fashion_mnist split 'test'" in out.stderr, (
      out.stderr[-2000:])
  assert stats.format_overrides(np.array([0.001]), np.array([2e-5])) == (
      "--config.data.mean='(0.001,)' --config.data.std='(2e-05,)'")
  # A mean far from 0 keeps the digits its std needs (.4g printed 1000.123 as 1000).
  assert stats.format_overrides(np.array([1000.123, 0.28604]), np.array([0.01, 0.353])) == (
      "--config.data.mean='(1000.123, 0.286)' --config.data.std='(0.01, 0.353)'")
  # A constant channel over millions of pixels: E[x^2] - E[x]^2 leaves about 1e-7, which
  # printed as a valid std; the channel's range says it is constant.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5000, 28, 28, 2), np.uint8)
  images[..., 0] = 200
  np.save(tmp_path / "train.npy", images)
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats",
                        f"--config={REPO}/configs/mae_fmnist.py", "--config.data.source=npy",
                        f"--config.data.path={tmp_path}", "--config.channels=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "error: channel(s) [0] of the 5000 images read have the same " \
      "value" in out.stderr and not out.stdout, out.stderr[-2000:]


def test_channel_statistics_skip_a_bad_image_as_its_error_advises(tmp_path):
  """BadImageError advises data.on_bad_image='skip', and the statistics tool follows the
  setting as training does (it used to decode with 'raise' whatever the config said)."""
  folder = tmp_path / "images" / "a"
  folder.mkdir(parents=True)
  for i, value in enumerate((51, 102)):
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(folder / f"{i}.png")
  (folder / "2.png").write_bytes(b"\x89PNG not really")
  cfg = registry.base_config("mae").data
  cfg.update(source="image_folder", path=str(tmp_path / "images"), on_bad_image="raise")
  with pytest.raises(transforms.BadImageError, match=r"2.png.*on_bad_image='skip'"):
    stats.channel_stats(cfg, image_size=(8, 8), channels=3)
  # The command says so in one line, as the trainer does (it printed a traceback).
  out = subprocess.run([sys.executable, "-m", "mim_jax.data.stats",
                        f"--config={REPO}/configs/mae_fmnist.py",
                        "--config.data.source=image_folder",
                        f"--config.data.path={tmp_path / 'images'}",
                        "--config.data.on_bad_image=raise"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.startswith("error: ") and "2.png" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  cfg.on_bad_image = "skip"
  mean, std, count = stats.channel_stats(cfg, image_size=(8, 8), channels=3)
  assert count == 2
  np.testing.assert_allclose(mean, [0.3] * 3)
  np.testing.assert_allclose(std, [0.1] * 3, atol=1e-7)


def test_channel_count_and_shown_channels_are_checked():
  with pytest.raises(ConfigError, match=r"config.viz_channels=\(5,\) is invalid"):
    registry.validate_config(tiny_config("mae", channels=5, viz_channels=(5,),
                                         **{"data.mean": (0.5,), "data.std": (0.5,)}))
  with pytest.raises(ConfigError, match="config.channels=0"):
    registry.validate_config(tiny_config("mae", channels=0))


@pytest.mark.parametrize("mode,channels,subsampling,fast", [
    ("RGB", 3, 0, True), ("RGB", 3, 2, True), ("L", 1, 0, True),
    ("RGB", 1, 2, False), ("L", 3, 0, False), ("CMYK", 3, 0, False)])
def test_jpeg_fast_path_decodes_pil_s_pixels(mode, channels, subsampling, fast):
  """simplejpeg takes the JPEGs it decodes exactly as PIL does (same DCT and upsampling);
  colour conversions it would do differently stay with PIL."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:75, 0:100]
  array = np.stack([(xx * 0.3 + yy * 0.2) % 256, (xx * 0.7) % 256, yy % 256], -1)
  array[10:30, 20:50] = rng.integers(0, 256, 3)
  img = Image.fromarray(array.astype(np.uint8)).convert(mode)
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=90, subsampling=subsampling)
  encoded = buf.getvalue()
  assert (transforms._decode_jpeg_fast(encoded, channels) is not None) == fast
  with Image.open(io.BytesIO(encoded)) as ref:
    ref = ref.convert("RGB") if ref.mode not in ("RGB", "L") else ref
    ref = np.asarray(ref.convert("L" if channels == 1 else "RGB"))
  np.testing.assert_array_equal(transforms.decode_image(encoded, channels),
                                ref.reshape(*ref.shape[:2], channels))
  with pytest.raises(OSError, match="(?i)truncated"):  # a truncated file still fails (PIL's)
    transforms.decode_image(encoded[:len(encoded) // 2], channels)
