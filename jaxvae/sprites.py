"""dSprites, procedurally generated: 737,280 binary 64x64 sprites with their factor labels.

The factor grid is dSprites' own, each combination once, indexed in C order over
(shape, scale, orientation, posX, posY) so posY varies fastest:
  shape:       square, ellipse, heart
  scale:       6 values linearly spaced in [0.5, 1]
  orientation: 40 values 2*pi*k/40, k = 0..39, counter-clockwise as displayed (the real
               dSprites spaces 40 values over [0, 2*pi] inclusive, so its first and last match)
  posX, posY:  32 values each; index k puts the sprite's centre on the centre of pixel 16 + k
               (column for posX, row counted downward for posY), i.e. pixels 16..47, one-pixel
               steps symmetric about the frame's centre.

Geometry. At scale 1 every shape reaches exactly RADIUS = 14 pixels from its centre (at scale s,
14 * s), so its farthest pixel is at least 2 pixels inside the frame at every scale, orientation
and position (the border rows and columns 0, 1, 62, 63 stay empty). At orientation 0:
  square:  side 14 * sqrt(2) = 19.8 pixels (corners on the circle of radius 14), edges axis-aligned.
  ellipse: semi-axes 14 and 7 pixels, the long axis horizontal.
  heart:   the classic construction, a square turned 45 degrees (a diamond) with a disc
           on each of its two upper edges (diameter the square's side, centred on the edge's
           midpoint), tip down: 26.8 pixels wide and 24.5 high. Its centre is the centre of the
           smallest circle about its vertical axis that holds it, so the tip and the lobes'
           farthest points (up and outward) both reach 14 pixels.
Orientation rotates a shape about its centre. The square has 4-fold symmetry (orientation k and
k + 10 are the same image) and the ellipse 2-fold (k and k + 20), as in the real dSprites; the
heart has none.

Rendering. A sprite's mask depends only on (shape, scale, orientation): the 720 masks are drawn
once on a 31x31 canvas centred on the sprite, anti-aliased by 16x16 supersampling and
thresholded to binary at half coverage; orientations k >= 10 are exact quarter turns (np.rot90) of
orientations 0..9, since the supersampling grid is symmetric under quarter turns. Position is an
integer-pixel translation of the canvas, so every image is exactly its mask, moved. Images are
uint8 0/255 [N, 64, 64, 1]; the full grid (3 GB) is cached as packed bits (377 MB) under the
cache folder, in a file whose name fingerprints GENERATOR_VERSION and the geometry.

Domains (`restyle`, `data.sprites_domain`): the same sprites and factor labels drawn another way,
for transfer tests (DARLA, Higgins et al. 2017). "source" is the images above; the target domains
change appearance only, each a function of the grid index alone (so a subset's images are those of
the full grid): "dim" draws the sprite at 128 instead of 255; "grey" puts it on a background of 96;
"noise" on a background of uniform noise in [0, 128] (one of 256 fixed noise fields, picked per grid
index by a fixed random table); "stripes" on diagonal stripes of 96, 4 pixels wide.
"""

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1  # bump on any change to the images, so stale caches are never read
IMAGE_SIZE = 64
RADIUS = 14.0          # pixels from the centre to a sprite's farthest point, at scale 1
FIRST_CENTRE = 16      # pixel of the sprite centre at posX = 0 (column) and posY = 0 (row)
CANVAS = 31            # side of a mask's canvas, centred on the sprite: holds radius 15.5
SUPERSAMPLE = 16       # samples per pixel side (with 8, the square's 0.45-covered edge pixels
                       # counted as half covered, and in)

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (3, 6, 40, 32, 32)
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
SCALES = np.linspace(0.5, 1.0, FACTOR_SIZES[1])
ORIENTATIONS = 2 * np.pi * np.arange(FACTOR_SIZES[2]) / FACTOR_SIZES[2]
DOMAINS = ("source", "dim", "grey", "noise", "stripes")
DOMAIN_SEED = 2        # the noise fields and which image gets which
NOISE_FIELDS, NOISE_MAX = 256, 128
TEST_SIZE = 10_000
_TRAIN_SEED, _TEST_SEED = 0, 1

# The heart, drawn from a diamond of side 1 centred at the origin: its upper edges' midpoints are
# (+-_D, _D) (the lobes' centres, radius 1/2) and its tip is (0, -_TIP). The sprite's centre sits
# _SHIFT above the diamond's, where the tip and the lobes' far edges are equally far
# (sqrt(_D^2 + (_D - t)^2) + 1/2 = _TIP + t), and that distance is _REACH.
_D = 0.5 ** 1.5
_TIP = 0.5 ** 0.5
_SHIFT = (2 * _D ** 2 - (_TIP - 0.5) ** 2) / (2 * (_D + _TIP - 0.5))
_REACH = _TIP + _SHIFT


def _square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (np.abs(x) <= 0.5 ** 0.5) & (np.abs(y) <= 0.5 ** 0.5)


def _ellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return x ** 2 + (2 * y) ** 2 <= 1


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  x, y = np.abs(x) * _REACH, y * _REACH + _SHIFT  # to the side-1 diamond's coordinates
  return (x + np.abs(y) <= _TIP) | ((x - _D) ** 2 + (y - _D) ** 2 <= 0.25)


@functools.cache
def masks() -> np.ndarray:
  """All 720 sprite masks: bool[3, 6, 40, CANVAS, CANVAS] (shape, scale, orientation, row, col).

  Shapes are the unit-radius `_square`, `_ellipse`, `_heart` (x right, y up) at RADIUS * scale.
  Drawn once per process (0.7 s) and read-only, since every `render` places them.
  """
  s, half = SUPERSAMPLE, CANVAS // 2
  # Sample offsets from the sprite centre in pixels, symmetric about 0 (t and -t exactly), so a
  # quarter turn of the canvas maps the samples onto themselves.
  t = (2 * s * (np.arange(CANVAS)[:, None] - half) + 2 * np.arange(s) + 1 - s).ravel() / (2 * s)
  x, y = t[None, :], -t[:, None]  # rows grow downward, y upward
  quarter = FACTOR_SIZES[2] // 4
  out = np.empty(FACTOR_SIZES[:3] + (CANVAS, CANVAS), bool)
  for k, angle in enumerate(ORIENTATIONS[:quarter]):
    c, sn = np.cos(angle), np.sin(angle)
    u, v = c * x + sn * y, -sn * x + c * y  # the samples turned by -angle: the shape's own frame
    for j, scale in enumerate(SCALES):
      r = RADIUS * scale
      for i, inside in enumerate((_square, _ellipse, _heart)):
        hits = inside(u / r, v / r).reshape(CANVAS, s, CANVAS, s).sum(axis=(1, 3))
        out[i, j, k] = 2 * hits >= s * s
  for q in range(1, 4):
    out[:, :, q * quarter:(q + 1) * quarter] = np.rot90(out[:, :, :quarter], q, axes=(-2, -1))
  out.flags.writeable = False
  return out


def factors(indices: np.ndarray) -> np.ndarray:
  """Grid indices int[N] -> their factor indices int32[N, 5], in FACTOR_NAMES order."""
  return np.stack(np.unravel_index(indices, FACTOR_SIZES), axis=1).astype(np.int32)


def render(indices: np.ndarray) -> np.ndarray:
  """The grid images at `indices` (int[N], any order): uint8[N, 64, 64, 1] of 0 and 255."""
  f = factors(indices)
  num_pos = FACTOR_SIZES[3]
  # Every image is a 64x64 window of a zero field that holds its mask at row and column `at`: the
  # window from num_pos - 1 - j shows the canvas at frame pixel FIRST_CENTRE - CANVAS // 2 + j,
  # which puts the sprite's centre on pixel FIRST_CENTRE + j for posY (rows) or posX (columns) j.
  at = FIRST_CENTRE - CANVAS // 2 + num_pos - 1
  field = np.zeros((np.prod(FACTOR_SIZES[:3]), IMAGE_SIZE + num_pos - 1, IMAGE_SIZE + num_pos - 1),
                   np.uint8)
  field[:, at:at + CANVAS, at:at + CANVAS] = masks().reshape(-1, CANVAS, CANVAS) * np.uint8(255)
  windows = np.lib.stride_tricks.sliding_window_view(field, (IMAGE_SIZE, IMAGE_SIZE), axis=(1, 2))
  mask_index = np.ravel_multi_index(tuple(f[:, :3].T), FACTOR_SIZES[:3])
  return windows[mask_index, num_pos - 1 - f[:, 4], num_pos - 1 - f[:, 3]][..., None]


def split_indices(subsample: int) -> tuple[np.ndarray, np.ndarray]:
  """Grid indices (train int[N], test int[M]) for `data.sprites_subsample`.

  0: train is the whole grid in grid order (disentanglement work trains on all of it) and test a
  fixed random TEST_SIZE of it, in random order (figures show a split's first images).
  n > 0: train is a fixed random n of the grid, in grid order, and test the first min(TEST_SIZE,
  n) of the same random test order, drawn independently of train. Subsets are nested: a larger
  n holds a smaller one.
  """
  if not 0 <= subsample <= NUM_IMAGES:
    raise ValueError(f"sprites_subsample={subsample} must be in [0, {NUM_IMAGES}] (0: all)")
  test_order = np.random.default_rng(_TEST_SEED).permutation(NUM_IMAGES)
  test = test_order[:min(TEST_SIZE, subsample or TEST_SIZE)]
  if subsample == 0:
    return np.arange(NUM_IMAGES), test
  return np.sort(np.random.default_rng(_TRAIN_SEED).permutation(NUM_IMAGES)[:subsample]), test


def cache_file(cache_dir: Path) -> Path:
  """Where the packed full grid lives: the name changes with the generator and its geometry."""
  key = (f"{GENERATOR_VERSION}|{IMAGE_SIZE}|{RADIUS}|{FIRST_CENTRE}|{CANVAS}|{SUPERSAMPLE}|"
         f"{SHAPES}|{FACTOR_SIZES}|{SCALES.tolist()}|{ORIENTATIONS.tolist()}")
  return cache_dir / f"sprites-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


def cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
  """Binary images uint8[N, H, W, 1] from `path` (packed bits), or from `make()`, then saved
  there."""
  if path.exists():
    images = np.unpackbits(np.load(path, mmap_mode="r"), axis=-1)  # from uint8[N, H, W / 8]
    images *= 255  # in place: the grid is 3 GB
    return images[..., None]
  images = make()
  path.parent.mkdir(parents=True, exist_ok=True)
  # A name of its own, so processes that generate at once never write into one file; the rename
  # is atomic, so a killed run never leaves a half-written cache.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.npy")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.packbits(images[..., 0], axis=-1))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return images


def load(subsample: int, cache_dir: Path, domain: str = "source"
         ) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """((train images, factors), (test images, factors)) as in `split_indices`, drawn in `domain`
  (`restyle`); images uint8[N, 64, 64, 1], factors int32[N, 5]. Only the full grid is cached, in
  the source domain (a subset renders in moments)."""
  train, test = split_indices(subsample)
  if subsample:
    train_images, test_images = render(train), render(test)
  else:
    train_images = cached(cache_file(cache_dir), lambda: render(train))
    test_images = train_images[test]
  return ((restyle(train_images, train, domain), factors(train)),
          (restyle(test_images, test, domain), factors(test)))


@functools.cache
def _noise() -> tuple[np.ndarray, np.ndarray]:
  """The "noise" domain's fields uint8[NOISE_FIELDS, 64, 64] and each grid index's field
  int[NUM_IMAGES]: drawn once, read-only."""
  rng = np.random.default_rng(DOMAIN_SEED)
  fields = rng.integers(0, NOISE_MAX + 1, (NOISE_FIELDS, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  which = rng.integers(0, NOISE_FIELDS, NUM_IMAGES)
  fields.flags.writeable = which.flags.writeable = False
  return fields, which


def _background(domain: str, indices: np.ndarray) -> np.ndarray:
  """The background of `domain` behind the grid images at `indices`: uint8[N, 64, 64] (or one
  [64, 64] that broadcasts)."""
  if domain == "grey":
    return np.full((IMAGE_SIZE, IMAGE_SIZE), 96, np.uint8)
  if domain == "stripes":
    rows, cols = np.indices((IMAGE_SIZE, IMAGE_SIZE))
    return (((rows + cols) // 4) % 2 * 96).astype(np.uint8)
  if domain == "noise":
    fields, which = _noise()
    return fields[which[indices]]
  return np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)


def restyle(images: np.ndarray, indices: np.ndarray, domain: str, chunk: int = 65_536
            ) -> np.ndarray:
  """The grid images at `indices` (uint8[N, 64, 64, 1] of 0 and 255, as `render` gives them)
  drawn in `domain` (one of DOMAINS), in place and returned: the sprite's pixels at the domain's
  level (255, or 128 for "dim"), the others its background. Factors are untouched."""
  if domain not in DOMAINS:
    raise ValueError(f"sprites domain {domain!r} is not one of {DOMAINS}")
  if domain == "source":
    return images
  level = np.uint8(128 if domain == "dim" else 255)
  for start in range(0, len(images), chunk):  # in chunks: the full grid is 3 GB
    block = images[start:start + chunk, ..., 0]
    block[...] = np.where(block > 0, level, _background(domain, indices[start:start + chunk]))
  return images
