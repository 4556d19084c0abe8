"""Every data source as uint8 arrays (N, H, W, C) with int32 labels, and on-device scaling.

Sources (`config.data.source`):
  tfds:   a TFDS dataset by name (`data.name`), `data.path` as its data_dir if set.
  folder: `data.path` laid out `split/class/*.{png,jpg,jpeg}` (a directory, or a .tar/.tar.gz
          archive of one); sorted class folder names give the labels. Decoded arrays are cached
          under `data.cache_dir` (default ~/.cache/jaxvae), so a second run starts in seconds;
          runs started together decode once.
  digits: scikit-learn's bundled 8x8 handwritten digits (no download).
  sprites: dSprites' 737,280 binary 64x64 sprites, generated (jaxvae/sprites.py), with their
           factor labels; `data.sprites_subsample` > 0 takes a fixed random subset as train.
"""

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import lzma
import os
import socket
import tarfile
import tempfile
import zlib
from typing import Callable
from pathlib import Path

try:
  import fcntl
except ImportError:  # not POSIX
  fcntl = None

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import sprites

BINARIZATIONS = ("none", "threshold", "dynamic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CACHE_VERSION = "1"


class DataError(ValueError):
  """Data that cannot be used as given; the message says what was wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8[N, H, W, C]
  labels: np.ndarray  # int32[N]
  factors: np.ndarray | None = None  # int32[N, F]: ground-truth factor indices, where known


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Split
  test: Split
  class_names: tuple[str, ...]
  name: str
  factor_names: tuple[str, ...] = ()  # the F columns of Split.factors
  factor_sizes: tuple[int, ...] = ()  # how many values each factor takes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])


# `config.data.source` -> its loader: data_cfg -> Dataset. `register_source` adds one.
LOADERS: dict[str, Callable[..., "Dataset"]] = {}


def register_source(name: str):
  """Decorator: makes `loader(data_cfg) -> Dataset` the source `config.data.source=name`."""
  def register(loader):
    LOADERS[name] = loader
    return loader
  return register


def load(data_cfg) -> Dataset:
  """Loads both splits that `data_cfg` (a `config.data`) names. Raises DataError on bad data."""
  if data_cfg.source not in LOADERS:
    raise DataError(f"config.data.source={data_cfg.source!r}; choose one of {tuple(LOADERS)}")
  ds = LOADERS[data_cfg.source](data_cfg)
  if ds.train.images.shape[1:] != ds.test.images.shape[1:]:
    raise DataError(f"{ds.name}: train images are {ds.train.images.shape[1:]} but test images "
                    f"are {ds.test.images.shape[1:]}; both splits need one image size")
  return ds


def check_pixels_fit(ds: Dataset, likelihood: str, binarize: str) -> None:
  """Refuses data whose pixel values the likelihood cannot score."""
  if likelihood == "bernoulli" and binarize == "none":
    for split_name, split in (("train", ds.train), ("test", ds.test)):
      if not _is_binary(split.images):
        values = np.flatnonzero(np.bincount(split.images.ravel(), minlength=256))
        raise DataError(
            f"likelihood 'bernoulli' needs binary pixels, but the {split_name} split of "
            f"{ds.name} has {len(values)} distinct values; set --config.data.binarize=dynamic "
            "(a fresh draw per batch) or --config.data.binarize=threshold")


def _is_binary(images: np.ndarray) -> bool:
  """Whether every pixel is 0 or 255. In chunks, and in uint8: a bincount of the whole split
  would cast it to int64 (24 GB for the sprites grid) and take 20 s for it."""
  step = max(1, (1 << 22) // max(1, images[:1].size))
  # Adding 1 wraps 255 to 0, so exactly the binary pixels end at 0 or 1.
  return all((images[i:i + step] + np.uint8(1)).max() <= 1 for i in range(0, len(images), step))


def to_unit_interval(x: jax.Array, rng: jax.Array | None, binarize: str = "none") -> jax.Array:
  """uint8[B, H, W, C] -> f32[B, H, W, C] in [0, 1], binarized if asked (on device).

  'threshold' maps pixels >= 128 to 1; 'dynamic' draws Bernoulli(x / 255) with `rng`.
  """
  shape = x.shape
  # Flat: XLA:CPU vectorizes along the minor axis, only C wide in [B, H, W, C] (see
  # `distributions.pixel_rows`); the draw is the same bit for bit.
  x = x.reshape(-1).astype(jnp.float32) / 255.0
  if binarize == "threshold":
    x = (x >= 0.5).astype(jnp.float32)
  elif binarize == "dynamic":
    x = jax.random.bernoulli(rng, x).astype(jnp.float32)
  return x.reshape(shape)


def pixel_mean(images: np.ndarray, binarize: str) -> np.ndarray:
  """uint8[N, H, W, C] -> f32[H, W, C]: each pixel's mean in [0, 1] as the model sees it,
  for binarized data the probability of a 1 (a dynamic draw's expectation is x / 255)."""
  if binarize == "threshold":
    return (images >= 128).mean(axis=0, dtype=np.float64).astype(np.float32)
  return (images.mean(axis=0, dtype=np.float64) / 255).astype(np.float32)


# ----------------------------------------------------------------------------- digits


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """`sklearn.datasets.load_digits()`'s images f64[1797, 64] and targets, read from the file
  scikit-learn ships (the values load_digits returns) without importing scikit-learn, which
  takes over a second: every tiny run and test subprocess loads these digits."""
  spec = importlib.util.find_spec("sklearn")
  path = spec and os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                               "digits.csv.gz")
  if not path or not os.path.exists(path):  # another layout: ask scikit-learn itself
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data, d.target
  table = np.loadtxt(path, delimiter=",")
  return table[:, :-1], table[:, -1].astype(np.int64)


@register_source("digits")
def _load_digits(data_cfg) -> Dataset:
  """sklearn's 1,797 digits (values 0..16) as uint8 0..255; a fixed split of 1,500 / 297."""
  del data_cfg  # no keys: the data ship with scikit-learn
  pixels, target = _sklearn_digits()
  images = np.rint(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
  order = np.random.default_rng(0).permutation(len(images))
  images, labels = images[order], target[order].astype(np.int32)
  return Dataset(Split(images[:1500], labels[:1500]), Split(images[1500:], labels[1500:]),
                 tuple(str(i) for i in range(10)), "digits")


# ----------------------------------------------------------------------------- tfds


@register_source("tfds")
def _load_tfds_source(data_cfg) -> Dataset:
  return _load_tfds(data_cfg.name, data_cfg.path or None)


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
  import tensorflow_datasets as tfds
  try:
    splits = {s: tfds.load(name, split=s, data_dir=data_dir, download=False, shuffle_files=False)
              for s in ("train", "test")}
  except Exception as not_local:  # not prepared locally: download if the network allows
    if not _online():
      where = data_dir or "~/tensorflow_datasets"
      raise DataError(
          f"TFDS dataset {name!r} is not prepared under {where} and this machine cannot reach "
          f"the download servers ({not_local.__class__.__name__}). Point at a local copy: "
          f"--config.data.path=DATA_DIR for a TFDS data_dir that holds {name}, or "
          "--config.data.source=folder --config.data.path=DIR for images laid out "
          "split/class/*.png (a .tar.gz of that layout works too)") from None
    splits = {s: tfds.load(name, split=s, data_dir=data_dir, download=True, shuffle_files=False)
              for s in ("train", "test")}
  out = {}
  for s, ds in splits.items():
    images, labels = [], []
    # Iterating, not batch_size=-1: the latter aborts the process under tfds.testing.mock_data.
    for ex in tfds.as_numpy(ds):
      images.append(ex["image"])
      labels.append(ex.get("label", 0))
    if not images:
      raise DataError(f"TFDS dataset {name!r} split {s!r} is empty")
    out[s] = Split(_stack_uint8(images, f"tfds:{name}/{s}"), np.asarray(labels, np.int32))
  num_classes = int(max(out["train"].labels.max(), out["test"].labels.max())) + 1
  return Dataset(out["train"], out["test"], tuple(str(i) for i in range(num_classes)), name)


def _online(timeout: float = 3.0) -> bool:
  """Whether TFDS's download host answers quickly; offline, TFDS would retry for minutes."""
  try:
    socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _stack_uint8(images: list, source: str) -> np.ndarray:
  shapes = {np.shape(im) for im in images}
  if len(shapes) > 1:
    raise DataError(f"{source}: images of several shapes {sorted(shapes)[:4]}; resize them to one")
  arr = np.stack(images)
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.dtype != np.uint8:
    if arr.min() < 0 or arr.max() > 255:
      raise DataError(f"{source}: pixel values span [{arr.min()}, {arr.max()}], not 8-bit 0..255")
    arr = arr.astype(np.uint8)
  return arr


# ----------------------------------------------------------------------------- sprites


@register_source("sprites")
def _load_sprites_source(data_cfg) -> Dataset:
  return _load_sprites(data_cfg.sprites_subsample, data_cfg.cache_dir, data_cfg.sprites_domain)


def _load_sprites(subsample: int, cache_dir: str, domain: str = "source") -> Dataset:
  """The generated dSprites grid in `domain` (`sprites.restyle`); labels are the shape index,
  class names the shapes."""
  cache = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
  train, test = sprites.load(subsample, cache, domain)
  split = lambda images, factors: Split(images, factors[:, 0].copy(), factors)
  return Dataset(split(*train), split(*test), sprites.SHAPES, "sprites", sprites.FACTOR_NAMES,
                 sprites.FACTOR_SIZES)


# ----------------------------------------------------------------------------- image folder


def _default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "jaxvae"


def _fingerprint(path: Path) -> str:
  """Changes whenever the folder's (or archive's) files, sizes or times change."""
  h = hashlib.sha1(f"{_CACHE_VERSION}|{path.resolve()}".encode())
  if path.is_file():
    st = path.stat()
    h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
  else:
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for f in sorted(files):
        st = os.stat(os.path.join(root, f))
        h.update(f"{os.path.relpath(os.path.join(root, f), path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


@register_source("folder")
def _load_folder_source(data_cfg) -> Dataset:
  return _load_folder(data_cfg.path, data_cfg.cache_dir)


def _load_folder(path: str, cache_dir: str) -> Dataset:
  if not path:
    raise DataError("config.data.source='folder' needs --config.data.path=DIR (split/class/*.png)")
  root = Path(path).expanduser()
  if not root.exists():
    raise DataError(f"image folder {root} does not exist; set --config.data.path to a folder "
                    "laid out split/class/*.png, or a .tar.gz of one")
  if not os.access(root, os.R_OK):
    raise DataError(f"image folder {root} is not readable by this user; fix its permissions")
  cache = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
  cache_file = cache / f"folder-{root.name}-{_fingerprint(root)}.npz"
  if cache_file.exists():  # (a read-only cache is read without a lock)
    return _read_cache(cache_file, root)
  cache.mkdir(parents=True, exist_ok=True)
  # One process decodes; others started at the same time wait for its cache file.
  with _locked(cache / (cache_file.stem + ".lock")):
    if cache_file.exists():
      return _read_cache(cache_file, root)
    files = _list_archive(root) if root.is_file() else _list_dir(root)
    ds = _decode_folder(files, root)
    # The rename is atomic, so a killed run never leaves a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=cache_file.stem + ".", suffix=".tmp.npz")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, train_images=ds.train.images, train_labels=ds.train.labels,
                 test_images=ds.test.images, test_labels=ds.test.labels,
                 class_names=np.array(ds.class_names))
      os.replace(tmp, cache_file)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return ds


def _read_cache(cache_file: Path, root: Path) -> Dataset:
  with np.load(cache_file) as z:
    return Dataset(Split(z["train_images"], z["train_labels"]),
                   Split(z["test_images"], z["test_labels"]),
                   tuple(str(c) for c in z["class_names"]), root.name)


@contextlib.contextmanager
def _locked(path: Path):
  """An exclusive advisory lock on `path`. Without one (not POSIX, or the file cannot be
  opened) two processes may both decode, each writing a whole cache file of its own."""
  try:
    f = open(path, "a") if fcntl else None
  except OSError:
    f = None
  if f is None:
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _split_class(rel: str):
  parts = rel.split("/")  # (a tar member's name, or a relative path made with "/")
  if (len(parts) == 3 and parts[0] in ("train", "test")
      and os.path.splitext(parts[2])[1].lower() in IMAGE_SUFFIXES):
    return parts[0], parts[1]
  return None


def _list_dir(root: Path):
  """Yields (split, class, name, read_bytes) for every image under root/split/class/."""
  for split in ("train", "test"):
    d = root / split
    if not d.is_dir():
      continue
    for f in sorted(d.rglob("*")):
      if f.is_file() and (sc := _split_class(f.relative_to(root).as_posix())):
        yield sc[0], sc[1], str(f), f.read_bytes


# A compressed archive is read through its module's reader, which raises on a stream cut short
# wherever the cut falls; tarfile's own stream reader ends quietly at a cut inside a header.
_DECOMPRESSORS = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
                  b"BZh": bz2.BZ2File, b"\xfd7zXZ\x00": lzma.LZMAFile}


def _list_archive(root: Path):
  if not tarfile.is_tarfile(root):
    raise DataError(f"{root} is a file but not a tar archive; give a folder or a .tar(.gz) of one")
  try:
    with open(root, "rb") as raw:
      magic = raw.read(6)
      raw.seek(0)
      opener = next((o for m, o in _DECOMPRESSORS.items() if magic.startswith(m)), None)
      with (opener(raw) if opener else contextlib.nullcontext(raw)) as f:
        with tarfile.open(fileobj=f, mode="r|") as tar:  # a stream: read in order, no seeks back
          for m in tar:
            rel = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and (sc := _split_class(rel)):
              data = tar.extractfile(m).read()
              yield sc[0], sc[1], f"{root}:{rel}", lambda data=data: data
        while f.read(1 << 20):  # to the compressed stream's end: a cut in its tail raises too
          pass
  except (EOFError, tarfile.TarError, zlib.error, lzma.LZMAError, OSError) as e:
    raise DataError(f"{root} is damaged or incomplete ({type(e).__name__}: {e}); copy or "
                    "download it again (compare its size or checksum with the original)") from None


def _pixels(im) -> np.ndarray:
  """A PIL image's pixels; 8-bit grey and RGB through raw bytes, a third faster than asarray."""
  if im.mode in ("L", "RGB"):
    im.load()
    shape = (im.height, im.width) + ((3,) if im.mode == "RGB" else ())
    return np.frombuffer(im.tobytes(), np.uint8).reshape(shape)
  return np.asarray(im)


def _decode_folder(files, root: Path) -> Dataset:
  from PIL import Image, UnidentifiedImageError
  per_split: dict[str, list] = {"train": [], "test": []}
  for split, cls, name, read in files:
    try:
      with Image.open(io.BytesIO(read())) as im:
        arr = _pixels(im)
    except (UnidentifiedImageError, OSError) as e:
      raise DataError(f"{name} is not a readable image ({e}); remove or replace it") from None
    per_split[split].append((name, cls, arr))
  for split, items in per_split.items():
    if not items:
      raise DataError(f"{root} has no images under {split}/<class>/ (png or jpg); the layout is "
                      "train/<class>/*.png and test/<class>/*.png")
  classes = sorted({cls for items in per_split.values() for _, cls, _ in items})
  first_name, _, first = per_split["train"][0]
  out = {}
  for split, items in per_split.items():
    for name, _, arr in items:
      if arr.shape != first.shape:
        raise DataError(f"{name} is {arr.shape} but {first_name} is {first.shape}; every image "
                        "needs the same size and channels")
      if arr.dtype != np.uint8:
        raise DataError(f"{name} has {arr.dtype} pixels; only 8-bit images (0..255) are supported")
    images = np.stack([arr for _, _, arr in items])
    if images.ndim == 3:
      images = images[..., None]
    labels = np.array([classes.index(cls) for _, cls, _ in items], np.int32)
    out[split] = Split(images, labels)
  return Dataset(out["train"], out["test"], tuple(classes), root.name)
