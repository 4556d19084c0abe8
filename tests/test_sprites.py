"""The generated dSprites: its factor grid, the sprites' geometry, the cache and the config keys."""

import ml_collections
import numpy as np
import pytest

from jaxvae import data, sprites
from jaxvae.config import ConfigError, base_config, validate


@pytest.fixture(scope="module")
def masks():
  return sprites.masks()  # bool[3, 6, 40, CANVAS, CANVAS]


def _cfg(**kw) -> ml_collections.ConfigDict:
  c = base_config().data
  c.update(source="sprites", **kw)
  return c


def test_factor_grid_holds_each_combination_once_in_dsprites_order():
  assert sprites.FACTOR_NAMES == ("shape", "scale", "orientation", "posX", "posY")
  assert sprites.FACTOR_SIZES == (3, 6, 40, 32, 32) and sprites.NUM_IMAGES == 737_280
  f = sprites.factors(np.arange(sprites.NUM_IMAGES))
  assert f.dtype == np.int32
  # C order over the factors: posY varies fastest, shape slowest.
  grid = np.stack(np.meshgrid(*map(np.arange, sprites.FACTOR_SIZES), indexing="ij"), -1)
  np.testing.assert_array_equal(f, grid.reshape(-1, 5))
  np.testing.assert_allclose(sprites.SCALES, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
  assert sprites.ORIENTATIONS[0] == 0 and sprites.ORIENTATIONS[-1] < 2 * np.pi


def test_subsample_is_a_fixed_set_of_distinct_grid_points_rendered_alone(tmp_path, monkeypatch):
  rendered = []
  render = sprites.render
  monkeypatch.setattr(sprites, "render", lambda idx: rendered.append(len(idx)) or render(idx))
  ds = data.load(_cfg(sprites_subsample=300, cache_dir=str(tmp_path)))
  assert rendered == [300, 300] and not list(tmp_path.iterdir())  # no full grid, no cache
  assert ds.class_names == sprites.SHAPES and ds.name == "sprites"
  assert ds.factor_names == sprites.FACTOR_NAMES and ds.factor_sizes == sprites.FACTOR_SIZES
  for split in (ds.train, ds.test):
    assert split.images.shape == (300, 64, 64, 1) and split.images.dtype == np.uint8
    assert split.factors.shape == (300, 5) and split.factors.dtype == np.int32
    index = np.ravel_multi_index(tuple(split.factors.T), sprites.FACTOR_SIZES)
    assert len(np.unique(index)) == 300
    np.testing.assert_array_equal(split.labels, split.factors[:, 0])
    np.testing.assert_array_equal(split.images, render(index))
  data.check_pixels_fit(ds, "bernoulli", "none")
  again = data.load(_cfg(sprites_subsample=300, cache_dir=str(tmp_path)))
  np.testing.assert_array_equal(again.train.images, ds.train.images)
  np.testing.assert_array_equal(again.test.factors, ds.test.factors)
  small_train, small_test = sprites.split_indices(100)
  train, test = sprites.split_indices(300)
  assert set(small_train) <= set(train) and set(small_test) <= set(test)


def test_every_sprite_is_binary_non_empty_and_inside_the_frame(masks):
  # All 720 masks at the four extreme positions: the corners of the position grid.
  mask_index = np.arange(720).repeat(4)
  pos = np.tile([[0, 0], [0, 31], [31, 0], [31, 31]], (720, 1))
  index = mask_index * 1024 + pos[:, 0] * 32 + pos[:, 1]
  images = sprites.render(index)[..., 0]
  assert set(np.unique(images).tolist()) == {0, 255}
  for edge in (masks[..., 0, :], masks[..., -1, :], masks[..., 0], masks[..., -1]):
    assert not edge.any()  # the canvas holds the whole sprite
  area = masks.reshape(720, -1).sum(axis=1).repeat(4)
  assert area.min() > 0
  np.testing.assert_array_equal((images == 255).sum(axis=(1, 2)), area)  # nothing clipped
  for border in (images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]):
    assert not border.any()


def test_mask_area_grows_with_scale(masks):
  area = masks.sum(axis=(-2, -1))  # [shape, scale, orientation]
  assert (np.diff(area, axis=1) > 0).all()


def test_orientation_turns_counter_clockwise_with_the_shapes_symmetries(masks):
  turn = lambda m, steps: np.roll(m, -steps, axis=1)  # [scale, orientation, ...]: k -> k + steps
  np.testing.assert_array_equal(turn(masks[0], 10), masks[0])  # square: quarter turns
  np.testing.assert_array_equal(turn(masks[1], 20), masks[1])  # ellipse: half turns
  assert not np.array_equal(turn(masks[1], 10), masks[1])
  assert not (turn(masks[2], 20) == masks[2]).all(axis=(-2, -1)).any()  # heart: none
  # The heart's lobes (most of its area) are up at orientation 0, left after a quarter turn.
  rows, cols = np.nonzero(masks[2, -1, 0])
  assert rows.mean() < sprites.CANVAS // 2
  rows, cols = np.nonzero(masks[2, -1, 10])
  assert cols.mean() < sprites.CANVAS // 2


def test_generation_is_deterministic(masks):
  np.testing.assert_array_equal(sprites.masks.__wrapped__(), masks)  # drawn afresh
  index = np.random.default_rng(5).choice(sprites.NUM_IMAGES, 50, replace=False)
  np.testing.assert_array_equal(sprites.render(index), sprites.render(index))


def test_full_grid_is_cached_as_packed_bits(tmp_path, monkeypatch):
  # The grid shrunk to its first 2,048 images: the whole-grid path, in a moment.
  monkeypatch.setattr(sprites, "NUM_IMAGES", 2048)
  cfg = _cfg(cache_dir=str(tmp_path))
  ds = data.load(cfg)
  assert [p.name for p in tmp_path.iterdir()] == [sprites.cache_file(tmp_path).name]
  assert sprites.cache_file(tmp_path).stat().st_size < 2048 * 64 * 64 / 8 + 256
  assert len(ds.train.images) == len(ds.test.images) == 2048
  monkeypatch.setattr(sprites, "render", lambda idx: pytest.fail("rendered despite a cache"))
  cached = data.load(cfg)
  np.testing.assert_array_equal(cached.train.images, ds.train.images)
  np.testing.assert_array_equal(cached.test.images, ds.test.images)
  np.testing.assert_array_equal(cached.train.factors, ds.train.factors)


def test_cache_name_changes_with_the_generator_version_and_geometry(tmp_path, monkeypatch):
  before = sprites.cache_file(tmp_path)
  assert before.parent == tmp_path and before.name.startswith("sprites-")
  monkeypatch.setattr(sprites, "GENERATOR_VERSION", sprites.GENERATOR_VERSION + 1)
  after_version = sprites.cache_file(tmp_path)
  monkeypatch.setattr(sprites, "RADIUS", 13.0)
  assert len({before, after_version, sprites.cache_file(tmp_path)}) == 3


def test_binary_check_reads_uint8_chunks():
  assert data._is_binary(np.array([0, 255], np.uint8).reshape(2, 1, 1, 1))
  for grey in (1, 254):
    assert not data._is_binary(np.array([0, grey, 255], np.uint8).reshape(3, 1, 1, 1))


@pytest.mark.parametrize("key,value,match", [
    ("model.likelihood", "gaussian", r"config\.model\.likelihood='gaussian'.*bernoulli"),
    ("data.binarize", "dynamic", r"config\.data\.binarize='dynamic'.*already binary"),
    ("data.sprites_subsample", -1, r"config\.data\.sprites_subsample=-1 must be in"),
    ("data.sprites_subsample", 737_281, r"config\.data\.sprites_subsample=737281 must be in"),
])
def test_sprites_configs_that_cannot_run_stop_naming_the_key(key, value, match):
  c = base_config()
  c.data.source, c.model.likelihood = "sprites", "bernoulli"
  validate(c)
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=match):
    validate(c)
