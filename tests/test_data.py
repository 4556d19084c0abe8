"""Every data source, the folder cache, and the messages bad data gets."""

import concurrent.futures
import tarfile
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import CIFAR10_TGZ, needs
from jaxvae import data
from jaxvae.config import base_config


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = base_config().data
  c.update(kw)
  return c


def _write_folder(root, sizes=((6, 5),), mode="RGB", per_class=3):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("zebra", "ant"):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(per_class):
        h, w = sizes[i % len(sizes)]
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")


def test_digits_are_uint8_images_with_labels():
  ds = data.load(_cfg(source="digits"))
  assert ds.train.images.shape == (1500, 8, 8, 1) and ds.test.images.shape == (297, 8, 8, 1)
  assert ds.train.images.dtype == np.uint8 and ds.train.images.max() == 255
  assert set(np.unique(ds.train.labels)) == set(range(10))
  # Read from scikit-learn's file without importing it: exactly what load_digits returns.
  from sklearn.datasets import load_digits
  pixels, target = data._sklearn_digits()
  reference = load_digits()
  np.testing.assert_array_equal(pixels, reference.data)
  np.testing.assert_array_equal(target, reference.target)


def test_folder_labels_follow_sorted_class_names_and_cache_is_reused(tmp_path):
  _write_folder(tmp_path / "imgs")
  cache = tmp_path / "cache"
  ds = data.load(_cfg(source="folder", path=str(tmp_path / "imgs"), cache_dir=str(cache)))
  assert ds.class_names == ("ant", "zebra")
  assert ds.train.images.shape == (6, 6, 5, 3)
  # sorted file order: ant/0..2 then zebra/0..2
  np.testing.assert_array_equal(ds.train.labels, [0, 0, 0, 1, 1, 1])
  first = np.asarray(Image.open(tmp_path / "imgs/train/zebra/0.png"))
  np.testing.assert_array_equal(ds.train.images[3], first)
  assert len(list(cache.glob("*.npz"))) == 1
  # A changed file (new size and time) makes a new cache entry rather than a stale hit.
  Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "imgs/train/zebra/0.png")
  ds_again = data.load(_cfg(source="folder", path=str(tmp_path / "imgs"), cache_dir=str(cache)))
  assert len(list(cache.glob("*.npz"))) == 2
  assert ds_again.train.images[3].max() == 0


def test_folder_cache_hit_needs_no_decoding(tmp_path, monkeypatch):
  _write_folder(tmp_path / "imgs")
  cfg = _cfg(source="folder", path=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "c"))
  ds = data.load(cfg)
  monkeypatch.setattr(data, "_decode_folder", lambda *a: pytest.fail("decoded despite a cache"))
  np.testing.assert_array_equal(data.load(cfg).test.images, ds.test.images)


def test_loads_started_together_decode_once(tmp_path, monkeypatch):
  # Two loaders at once (threads here; processes lock the same way): one decodes while the
  # other waits on the cache's lock, then reads the cache file.
  _write_folder(tmp_path / "imgs")
  cfg = _cfg(source="folder", path=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "c"))
  decode, calls = data._decode_folder, []

  def slow_decode(*args):
    calls.append(1)
    time.sleep(0.5)  # long enough for the second loader to reach the lock
    return decode(*args)

  monkeypatch.setattr(data, "_decode_folder", slow_decode)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    a, b = pool.map(lambda _: data.load(cfg), range(2))
  assert len(calls) == 1
  np.testing.assert_array_equal(a.train.images, b.train.images)


def test_tar_archive_reads_like_the_folder(tmp_path):
  _write_folder(tmp_path / "imgs", mode="L")
  archive = tmp_path / "imgs.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for split in ("train", "test"):
      tar.add(tmp_path / "imgs" / split, arcname=split)
  a = data.load(_cfg(source="folder", path=str(archive), cache_dir=str(tmp_path / "c1")))
  b = data.load(_cfg(source="folder", path=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "c2")))
  assert a.train.images.shape == (6, 6, 5, 1)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)


def test_a_truncated_archive_is_a_data_error_naming_the_file(tmp_path):
  _write_folder(tmp_path / "imgs")
  archive = tmp_path / "imgs.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for split in ("train", "test"):
      tar.add(tmp_path / "imgs" / split, arcname=split)
  whole = archive.read_bytes()
  # A copy cut short anywhere: in a member's data, in a header, in the stream's tail.
  for cut in sorted({len(whole) * k // 8 for k in range(1, 8)} | {len(whole) - 1}):
    archive.write_bytes(whole[:cut])
    with pytest.raises(data.DataError, match=rf"{archive} is damaged or incomplete .*copy or "
                       "download it again"):
      data.load(_cfg(source="folder", path=str(archive), cache_dir=str(tmp_path / f"c{cut}")))


@pytest.mark.parametrize("problem,match", [
    ("mixed_sizes", r"1\.png is \(7, 5, 3\) but .*0\.png is \(6, 5, 3\)"),
    ("not_an_image", r"broken\.png is not a readable image"),
    ("empty", r"has no images under train"),
    ("missing", r"does not exist"),
    ("sixteen_bit", r"only 8-bit"),
])
def test_bad_folders_fail_with_a_message_naming_the_problem(tmp_path, problem, match):
  root = tmp_path / "imgs"
  cfg = _cfg(source="folder", path=str(root), cache_dir=str(tmp_path / "c"))
  if problem == "mixed_sizes":
    _write_folder(root, sizes=((6, 5), (7, 5)))
  elif problem == "not_an_image":
    _write_folder(root)
    (root / "train" / "ant" / "broken.png").write_text("not a png")
  elif problem == "empty":
    (root / "train").mkdir(parents=True)
  elif problem == "sixteen_bit":
    _write_folder(root, mode="L")
    Image.fromarray(np.full((6, 5), 4000, np.uint16)).save(root / "test" / "ant" / "9.png")
  with pytest.raises(data.DataError, match=match):
    data.load(cfg)


def test_bernoulli_refuses_grey_pixels_unless_binarized():
  ds = data.load(_cfg(source="digits"))
  with pytest.raises(data.DataError, match="binarize=dynamic"):
    data.check_pixels_fit(ds, "bernoulli", "none")
  data.check_pixels_fit(ds, "bernoulli", "dynamic")
  data.check_pixels_fit(ds, "gaussian", "none")


def test_binarization_on_device():
  import jax
  x = np.array([[[[0], [127], [128], [255]]]], np.uint8)
  np.testing.assert_array_equal(data.to_unit_interval(x, None, "threshold").ravel(), [0, 0, 1, 1])
  np.testing.assert_allclose(data.to_unit_interval(x, None).ravel(), np.array([0, 127, 128, 255]) / 255)
  draws = data.to_unit_interval(np.full((20000, 1, 1, 1), 64, np.uint8), jax.random.key(0), "dynamic")
  assert set(np.unique(draws).tolist()) == {0.0, 1.0}
  assert abs(float(draws.mean()) - 64 / 255) < 0.015  # 4.6 standard errors


def test_tfds_source_offline_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load(_cfg(source="tfds", name="mnist"))
  assert ds.train.images.shape == (12, 28, 28, 1) and ds.train.images.dtype == np.uint8
  assert ds.test.labels.dtype == np.int32


def test_tfds_without_network_fails_fast_saying_how_to_point_at_a_copy(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_online", lambda timeout=3.0: False)
  with pytest.raises(data.DataError, match=r"not prepared under .*config\.data\.source=folder"):
    data.load(_cfg(source="tfds", name="mnist", path=str(tmp_path)))


@pytest.mark.slow
@needs(CIFAR10_TGZ)
def test_real_cifar10_jpeg_copy_loads_as_cifar10():
  ds = data.load(_cfg(source="folder", path=str(CIFAR10_TGZ)))
  assert ds.train.images.shape == (50000, 32, 32, 3) and ds.test.images.shape == (10000, 32, 32, 3)
  assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
  np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
