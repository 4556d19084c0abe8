"""Metrics of a VAE on the whole test split, and the `evaluate` command.

Training calls `Evaluator` every epoch; it stays cheap: the ELBO and its two terms, and the
reconstruction quality (SSIM, PSNR, MSE) of images decoded from the posterior mean and from
the posterior sample the ELBO used. The command adds what costs more:

  python -m jaxvae.evaluate --workdir DIR [--iw_samples K]

restores the latest checkpoint of DIR, prints one table and writes DIR/eval.json with the
importance-weighted bound (IWAE), bits/dim from a likelihood over the 256 pixel levels, the
paper's own SSIM protocol, KL per latent dimension, active units, a PCA baseline of the
same size k beside the VAE and, for data with factor labels (dSprites), the disentanglement
metrics MIG and DCI of the posterior means (`factor_metrics_of_run`).

Every number is a mean over the real (unpadded) test images, and a function of the run's eval
key only: binarization is drawn per image from its index in the split, so each batching of
the split scores the same binary images. `estimators` says which estimator each key is.
"""

import dataclasses
import functools
import json
import math
import os
import time
from typing import NamedTuple

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import app, flags

from jaxvae import data, disentanglement, distributions, loops, models, objectives, parallel
from jaxvae import fid as fid_lib
from jaxvae import run as run_lib

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Cov_x E_q[z_j] > 0.01
PAPER_SSIM_WINDOW = 7         # scikit-image's default win_size before 0.19
PAPER_SSIM_DATA_RANGE = 2.0   # what it assumed for float images ([-1, 1]) before 0.19


# ----------------------------------------------------------------------------- image metrics


def ssim_filter(height: int, width: int) -> tuple[int, float]:
  """dm-pix's 11-pixel, sigma-1.5 Gaussian window, shrunk to fit small images.

  dm_pix.ssim silently returns a wrong value when the filter exceeds the image, so the size is
  the largest odd number <= min(11, H, W), with sigma scaled in proportion.
  """
  size = min(11, height, width)
  size -= 1 - size % 2
  return size, 1.5 * size / 11


def window_matrix(n: int, size: int, sigma: float) -> np.ndarray:
  """dm-pix's normalized Gaussian window (odd `size`) as a band matrix f32[n, n - size + 1]:
  v @ m is v f32[..., n] filtered in "valid" mode along its last axis."""
  taps = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
  m = np.zeros((n, n - size + 1))
  for j in range(n - size + 1):
    m[j:j + size, j] = taps / taps.sum()
  return m.astype(np.float32)


def ssim(x: jax.Array, y: jax.Array, in_loop: bool = False) -> jax.Array:
  """SSIM of images in [0, 1] (dm-pix, max_val 1): f32[B, H, W, C] x2 -> f32[B].

  dm-pix's Gaussian window runs as its own one-channel convolutions when `in_loop` (inside a
  compiled loop), and otherwise as products with band matrices: XLA:CPU runs those
  convolutions 8x slower outside a loop and 1.4x faster inside one (1,000 CIFAR-10 images:
  1.39 s against 0.18 s outside, 94 ms against 133 ms inside). The same SSIM up to float
  rounding either way.
  """
  size, sigma = ssim_filter(x.shape[-3], x.shape[-2])
  if in_loop:
    return dm_pix.ssim(x, y, max_val=1.0, filter_size=size, filter_sigma=sigma)
  rows, cols = (window_matrix(n, size, sigma) for n in x.shape[-3:-1])
  highest = jax.lax.Precision.HIGHEST
  blur = lambda z: jnp.matmul(jnp.matmul(rows.T, z, precision=highest), cols, precision=highest)
  # Channels first, so that both products run over the two minor axes; SSIM averages the map
  # over the last three axes, whichever order they come in.
  channels_first = lambda v: jnp.moveaxis(v, -1, -3)
  return dm_pix.ssim(channels_first(x), channels_first(y), max_val=1.0, filter_fn=blur)


def paper_ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """The paper's SSIM: scikit-image's `structural_similarity` with its defaults of the time.

  A 7x7 uniform window, sample covariances (N / (N - 1)), K1 = 0.01, K2 = 0.03 and
  data_range 2 (the range skimage then assumed for float images, [-1, 1]; our images span
  [0, 1], so the constants are 4x too large and the score is inflated). The SSIM map is
  averaged over the pixels whose window fits in the image, then over channels, as skimage
  does. f32[B, H, W, C] x2 in [0, 1] -> f32[B].
  """
  w = PAPER_SSIM_WINDOW
  if min(x.shape[-3:-1]) < w:
    raise ValueError(f"images of {x.shape[-3]}x{x.shape[-2]} pixels are smaller than the paper "
                     f"protocol's {w}x{w} window; it needs at least {w}x{w}")

  def box(v):  # the window mean wherever the window fits, separably: f32[B, H - 6, W - 6, C]
    for dims in ((1, w, 1, 1), (1, 1, w, 1)):
      v = jax.lax.reduce_window(v, 0.0, jax.lax.add, dims, (1, 1, 1, 1), "VALID")
    return v / w**2

  cov_norm = w * w / (w * w - 1.0)
  ux, uy = box(x), box(y)
  vx = cov_norm * (box(x * x) - ux * ux)
  vy = cov_norm * (box(y * y) - uy * uy)
  vxy = cov_norm * (box(x * y) - ux * uy)
  c1, c2 = (0.01 * PAPER_SSIM_DATA_RANGE) ** 2, (0.03 * PAPER_SSIM_DATA_RANGE) ** 2
  s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return s.mean(axis=(1, 2, 3))


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error per pixel and channel: f32[B, H, W, C] x2 -> f32[B]."""
  return distributions.sum_except_batch(jnp.square(x - y)) / np.prod(x.shape[1:])


def psnr_db(mse_per_image: jax.Array) -> jax.Array:
  """PSNR in dB of images in [0, 1] (peak 1) from their MSE: f32[B] -> f32[B]."""
  return -10.0 * jnp.log10(mse_per_image)


def recon_metrics(original: jax.Array, recon: jax.Array, prefix: str, with_ssim: bool = True,
                  paper_window: bool = False, in_loop: bool = False) -> dict[str, jax.Array]:
  """SSIM, PSNR and MSE of reconstructions against originals, f32[B] each, keys `prefix*`;
  `paper_window` adds `paper_ssim`; `in_loop`: see `ssim`."""
  err = mse(original, recon)
  out = {f"{prefix}psnr_db": psnr_db(err), f"{prefix}mse": err}
  if with_ssim:
    out[f"{prefix}ssim"] = ssim(original, recon, in_loop)
  if paper_window:
    out[f"{prefix}ssim_paper_window"] = paper_ssim(original, recon)
  return out


# ----------------------------------------------------------------------------- likelihood


def discrete_log_likelihood(kind: str, x: jax.Array, obs: dict) -> jax.Array:
  """log P(x|z) of 8-bit (or binary) data as a probability, not a density. -> f32[B] nats.

  A Gaussian decoder is binned on the 256 levels (discretized Gaussian); the discrete
  likelihoods are their own.
  """
  if kind == "gaussian":
    return distributions.discretized_gaussian_log_prob(x, obs["mean"], obs["log_scale"])
  return distributions.log_likelihood(kind, x, obs)


def active_units(posterior_means: np.ndarray,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, np.ndarray]:
  """Active units (Burda et al. 2016): dims j with Cov_x(E_q[z_j | x]) > threshold.

  posterior_means: f32[N, K] over a split. Returns (count, per-dim variance f32[K]).
  """
  variance = np.var(np.asarray(posterior_means, np.float64), axis=0)
  return int(np.sum(variance > threshold)), variance.astype(np.float32)


# ----------------------------------------------------------------------------- the split


class Streams(NamedTuple):
  """The eval key's independent streams. Everything that scores a split derives its keys here,
  so the ELBO, the IWAE and the figures see the same binarized images."""
  binarize: jax.Array  # fold_in(binarize, image index) binarizes each test image
  elbo: jax.Array      # fold_in(elbo, batch number): the ELBO's posterior draws
  iwae: jax.Array      # fold_in(iwae, batch number): the IWAE's draws
  paper: jax.Array     # the paper-protocol image's binarization and draw
  figures: jax.Array   # the figures' prior draws, neighbourhoods and image pairs


def stream_keys(key: jax.Array) -> Streams:
  return Streams(*jax.random.split(key, len(Streams._fields)))


def model_inputs(x_uint8: jax.Array, index: jax.Array, bin_key: jax.Array,
                 binarize: str) -> tuple[jax.Array, jax.Array]:
  """(original f32[B, H, W, C] in [0, 1], the model's input x, binarized if configured).

  x_uint8: uint8[B, H, W, C]; index: int32[B], each image's position in its split, which keys
  its binarization draw (so the draw does not depend on how the split is batched).
  """
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(bin_key, index)
  x = jax.vmap(lambda im, k: data.to_unit_interval(im, k, binarize))(x_uint8, keys)
  return data.to_unit_interval(x_uint8, None), x


class _Batched:
  """A split on device in fixed-size batches, padded with blank images.

  images uint8[NB, B, H, W, C], index int32[NB, B] (positions in the split) and mask
  bool[NB, B] (False on padding); `map` runs a per-batch function over all batches, in a
  compiled loop or one compiled call per batch (`loop`: "scan" or "per_step", see
  `jaxvae.loops`).
  """

  def __init__(self, images: np.ndarray, batch_size: int, mesh, loop: str):
    self.loop = loop
    n = len(images)
    self.num_images = n
    self.batch = min(batch_size, n)
    num_batches = math.ceil(n / self.batch)
    pad = num_batches * self.batch - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    shape = (num_batches, self.batch)
    replicated = parallel.replicated(mesh)
    self.images = jax.device_put(images.reshape(shape + images.shape[1:]), replicated)
    self.index = jax.device_put(np.arange(num_batches * self.batch, dtype=np.int32).reshape(shape),
                                replicated)
    self.mask = jax.device_put((np.arange(num_batches * self.batch) < n).reshape(shape), replicated)
    sharded = self.batch % mesh.shape[parallel.DATA_AXIS] == 0
    self.sharding = parallel.batch_sharded(mesh) if sharded else None

  def map(self, fn):
    """fn(x uint8[B, ...], index int32[B], batch_number, *args) -> pytree of [B, ...].

    Returns (images, index, *args) -> pytree of [NB, B, ...]: one jitted program that loops
    over the batches, or a `_BatchLoop` of one jitted program per batch. Call it with
    `self.images, self.index` so the split is an argument, not a baked-in constant.
    """
    return _batch_map(fn, self.loop, self.sharding)

  def unpad(self, per_example):
    """[NB, B, ...] -> numpy [N, ...] in split order."""
    return jax.tree.map(lambda v: np.asarray(v).reshape((-1,) + v.shape[2:])[: self.num_images],
                        per_example)


class _BatchLoop:
  """`_Batched.map` without a compiled loop: Python calls per_batch(images, index, batch_number,
  *args) once per batch and stacks the results."""

  def __init__(self, per_batch):
    self.per_batch = per_batch

  def __call__(self, images, index, *args):
    outs = [self.per_batch(images, index, np.int32(i), *args) for i in range(images.shape[0])]
    return jax.tree.map(lambda *batches: jnp.stack(batches), *outs)

  def _cache_size(self) -> int:
    return self.per_batch._cache_size()


# ----------------------------------------------------------------------------- per epoch


def _eval_batch(params, x_uint8, index, batch_number, bin_key, elbo_key, *, model, binarize,
                full, in_loop):
  """Per-example metrics of one batch: dict of f32[B] (kl_per_dim_nats f32[B, K]). `full` adds
  the evaluate command's extras: the discrete ELBO of a Gaussian decoder, the SSIM of the
  posterior-draw reconstruction, and SSIM with the paper's window; `in_loop`: whether a
  compiled loop runs it (see `ssim`)."""
  original, x = model_inputs(x_uint8, index, bin_key, binarize)
  t = objectives.elbo_terms(params, jax.random.fold_in(elbo_key, batch_number), x, model=model)
  log_lik, kl, obs_sample = t["log_lik"], t["kl"], t["obs"]
  obs_mean = model.apply(params, t["mean"], method=models.VAE.decode_bottom)
  out = {"elbo_nats": log_lik - kl, "log_lik_nats": log_lik, "kl_nats": kl,
         "kl_per_dim_nats": t["kl_per_dim"]}
  if full and model.likelihood == "gaussian":
    out["elbo_discrete_nats"] = discrete_log_likelihood(model.likelihood, x, obs_sample) - kl
  paper_window = full and min(x.shape[1:3]) >= PAPER_SSIM_WINDOW
  for name, obs in (("mean", obs_mean), ("sample", obs_sample)):
    recon = distributions.likelihood_mean(model.likelihood, obs)
    # Per epoch, one SSIM: it is a third of the evaluation's time.
    out.update(recon_metrics(original, recon, f"recon_{name}_", full or name == "mean",
                             paper_window, in_loop))
  return out


class Evaluator:
  """Holds the padded test split on device and the compiled metric function.

  `evaluator(params, key)` -> dict of Python floats, means over the real test images:
    elbo_nats, log_lik_nats, kl_nats: the ELBO and its terms under the model's likelihood, one
      posterior draw per image and the analytic KL (two stochastic layers: the KL estimate of
      `objectives.elbo_terms` at that draw);
    recon_mean_{ssim,psnr_db,mse}, recon_sample_{psnr_db,mse}: images decoded from the
      posterior mean, and from that same posterior draw, against the original in [0, 1];
    bits_per_dim: the ELBO in bits per dimension, for discrete likelihoods;
    kl_per_dim_nats: a list of K floats, the analytic KL of each latent dim (they sum to
      kl_nats), so metrics.jsonl follows which dims switch on during training; with two
      layers, those of the top code given the drawn h1.
  With `full=True` (the evaluate command) also recon_sample_ssim, elbo_discrete_nats for a
  Gaussian decoder (the same draw scored by the discretized Gaussian; its bits_per_dim comes
  from it) and recon_*_ssim_paper_window (`paper_ssim`), when images are at least 7x7.
  """

  def __init__(self, model: models.VAE, config, test: data.Split, mesh, full: bool = False):
    self.split = _Batched(test.images, config.eval.batch_size, mesh, loops.resolve(config, mesh))
    self.num_dims = int(np.prod(test.images.shape[1:]))
    self.likelihood = model.likelihood
    fn = self.split.map(lambda x, idx, i, params, bin_key, elbo_key: _eval_batch(
        params, x, idx, i, bin_key, elbo_key, model=model, binarize=config.data.binarize,
        full=full, in_loop=self.split.loop == "scan"))

    def mean(v, mask):  # f32[NB, B, ...] -> f32[...], over the real images
      real = mask.reshape(mask.shape + (1,) * (v.ndim - 2))
      return jnp.sum(jnp.where(real, v, 0.0), axis=(0, 1)) / mask.sum()

    means = jax.jit(lambda per_example, mask: {k: mean(v, mask) for k, v in per_example.items()})

    def run(images, index, mask, params, key):
      streams = stream_keys(key)
      return means(fn(images, index, params, streams.binarize, streams.elbo), mask)

    # A Python loop over batches cannot be traced into one program; then only its parts compile.
    self._run = run if self.split.loop == "per_step" else jax.jit(run)
    self._programs = (fn, means) if self.split.loop == "per_step" else (self._run,)

  def __call__(self, params, key: jax.Array) -> dict[str, float | list[float]]:
    split = self.split
    out = jax.device_get(self._run(split.images, split.index, split.mask, params, key))
    out = {k: float(v) if v.ndim == 0 else v.tolist() for k, v in out.items()}
    if "elbo_discrete_nats" in out or self.likelihood in distributions.DISCRETE_LIKELIHOODS:
      nats = out.get("elbo_discrete_nats", out["elbo_nats"])
      out["bits_per_dim"] = float(distributions.bits_per_dim(nats, self.num_dims))
    return out

  def cache_size(self) -> int:
    """Compilations of the most compiled program: 1 in a healthy run."""
    return max(program._cache_size() for program in self._programs)


# ----------------------------------------------------------------------------- the command


def iwae_on_split(model: models.VAE, params, config, split: data.Split, mesh, key: jax.Array,
                  num_samples: int) -> dict[str, float]:
  """The IWAE bound with `num_samples` draws, scored by `discrete_log_likelihood`, averaged
  over the split: {"iwae": nats, "elbo": the K-draw ELBO of the same log-weights}.

  `config.eval.iw_batch_size` images x `config.eval.iw_chunk` draws are decoded at a time.
  """
  batched = _Batched(split.images, config.eval.iw_batch_size, mesh, loops.resolve(config, mesh))
  streams = stream_keys(key)

  def one(x_uint8, index, batch_number, params):
    _, x = model_inputs(x_uint8, index, streams.binarize, config.data.binarize)
    return objectives.iwae_bound(
        params, jax.random.fold_in(streams.iwae, batch_number), x, model=model,
        num_samples=num_samples, chunk_size=config.eval.iw_chunk,
        log_lik_fn=lambda x, obs: discrete_log_likelihood(model.likelihood, x, obs),
        unroll=batched.loop == "per_step")

  per_example = batched.unpad(batched.map(one)(batched.images, batched.index, params))
  return {k: float(np.mean(v, dtype=np.float64)) for k, v in per_example.items()}


def _batch_map(fn, loop: str, sharding):
  """`_Batched.map` of `fn` for a split whose batches take `sharding` (None: unsharded)."""

  def one(i, x, idx, *args):
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    return fn(x, idx, i, *args)

  if loop == "per_step":
    return _BatchLoop(jax.jit(lambda images, index, i, *args: one(i, images[i], index[i], *args)))

  def run(images, index, *args):
    return jax.lax.map(lambda inputs: one(*inputs, *args),
                       (jnp.arange(images.shape[0]), images, index))

  return jax.jit(run)


def posterior_stats(model: models.VAE, params, images: np.ndarray, key: jax.Array, binarize: str,
                    batch_size: int, mesh, loop: str, layer: str = "top"
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Posterior means f32[N, K] and KL per latent dim f32[N, K] (nats) of uint8[N, H, W, C],
  binarized as `Evaluator` does with the same key; `loop` as `loops.resolve` gives it.

  With two stochastic layers, `layer="top"` gives those of q(h2|h1) at one draw h1 ~ q(h1|x)
  (as Burda et al. count the top layer's active units), and `layer="bottom"` the means of
  q(h1|x), with no KL (its prior is not N(0, I)): NaN.
  """
  batched = _Batched(images, batch_size, mesh, loop)
  program = _posterior_program(model, binarize, batched.loop, batched.sharding, layer)
  streams = stream_keys(key)
  return batched.unpad(program(batched.images, batched.index, params, streams.binarize,
                               streams.elbo))


@functools.lru_cache(maxsize=16)
def _posterior_program(model: models.VAE, binarize: str, loop: str, sharding, layer: str):
  """`posterior_stats`' compiled pass, one per model, split layout and layer: the figures,
  drawn after every few evaluations, and the factor metrics reuse it instead of compiling
  anew."""

  def one(x_uint8, index, batch_number, params, bin_key, draw_key):
    _, x = model_inputs(x_uint8, index, bin_key, binarize)
    mean, log_scale = model.apply(params, x, method=models.VAE.encode_bottom)
    if models.stochastic_layers(model) == 2:
      if layer == "bottom":
        return mean, jnp.full_like(mean, jnp.nan)
      h1 = distributions.sample_diag_gaussian(jax.random.fold_in(draw_key, batch_number), mean,
                                              log_scale)[0]
      mean, log_scale = model.apply(params, h1, method=models.HierarchicalVAE.encode_upper)
    return mean, distributions.kl_per_dim(mean, log_scale)

  return _batch_map(one, loop, sharding)


def paper_protocol(model: models.VAE, params, image: np.ndarray, key: jax.Array,
                   binarize: str) -> dict[str, float]:
  """`paper_ssim` of ONE training image (uint8[H, W, C]) against its reconstruction decoded
  from the posterior mean and from one posterior sample, as the paper reported per epoch."""
  bin_key, z_key = jax.random.split(stream_keys(key).paper)
  original, x = model_inputs(jnp.asarray(image)[None], jnp.zeros((1,), jnp.int32), bin_key,
                             binarize)
  mean, log_scale = model.apply(params, x, method="encode")
  z = distributions.sample_diag_gaussian(z_key, mean, log_scale)[0]
  out = {}
  for name, latent in (("mean", mean), ("sample", z)):
    recon = distributions.likelihood_mean(model.likelihood,
                                          model.apply(params, latent, method="decode"))
    out[f"paper_protocol_ssim_{name}"] = float(paper_ssim(original, recon)[0])
  return out


@dataclasses.dataclass(frozen=True)
class PCA:
  """A linear map to k dims: z = (x - mean) @ components.T, x' = mean + z @ components."""
  mean: np.ndarray        # f32[D]
  components: np.ndarray  # f32[k, D], orthonormal rows by decreasing variance
  variance: np.ndarray    # f32[k], the data's variance along each component
  total_variance: float   # the trace of the data's covariance

  @property
  def explained_fraction(self) -> float:
    return float(self.variance.sum() / self.total_variance)

  def project(self, x: np.ndarray) -> np.ndarray:
    """f32[N, D] -> f32[N, k]."""
    return (np.asarray(x, np.float32) - self.mean) @ self.components.T

  def reconstruct(self, x: np.ndarray) -> np.ndarray:
    """f32[N, D] -> f32[N, D], the projection onto the k-dim principal subspace."""
    return self.mean + self.project(x) @ self.components


def fit_pca(rows: np.ndarray, k: int, scale: float = 1.0, chunk: int = 4096) -> PCA:
  """PCA of `rows * scale` (rows [N, D] of any dtype; uint8 images stay uint8 in memory), from
  the covariance accumulated in float64 a chunk at a time. k is capped at D."""
  n, d = rows.shape
  k = min(k, d)
  mean = np.zeros(d)
  for i in range(0, n, chunk):
    mean += rows[i:i + chunk].sum(axis=0, dtype=np.float64) * scale
  mean /= n
  cov = np.zeros((d, d))
  for i in range(0, n, chunk):
    centred = (rows[i:i + chunk] * np.float32(scale) - mean.astype(np.float32))
    cov += (centred.T @ centred).astype(np.float64)
  cov /= n
  variance, vectors = scipy.linalg.eigh(cov, subset_by_index=(d - k, d - 1))
  order = np.argsort(variance)[::-1]
  return PCA(mean.astype(np.float32), vectors[:, order].T.astype(np.float32),
             variance[order].astype(np.float32), float(np.trace(cov)))


_recon_metrics = jax.jit(recon_metrics, static_argnames=("prefix", "with_ssim", "paper_window"))


# Enough rows to estimate a covariance of 4,096 pixels (64x64) closely; all of CIFAR-10's and
# MNIST's training images, 60,000 of dSprites' 737,280 (all of them took minutes on 2 cores).
PCA_FIT_IMAGES = 60_000


def pca_baseline(train: np.ndarray, test: np.ndarray, k: int, batch_size: int) -> dict:
  """PCA with k components fit on the training images (at most PCA_FIT_IMAGES of them, drawn
  without replacement with seed 0), scored on the test images as the VAE is:
  recon_{ssim,psnr_db,mse,ssim_paper_window} means, and paper_protocol_ssim of training image
  0. train, test: uint8[N, H, W, C]."""
  fit = train
  if len(train) > PCA_FIT_IMAGES:  # random, not strided: dSprites' grid is ordered by factor
    fit = train[np.sort(np.random.default_rng(0).choice(len(train), PCA_FIT_IMAGES, replace=False))]
  pca = fit_pca(fit.reshape(len(fit), -1), k, scale=1 / 255)
  shape = test.shape[1:]
  paper_window = min(shape[:2]) >= PAPER_SSIM_WINDOW

  def reconstruct(images):
    flat = images.reshape(len(images), -1).astype(np.float32) / 255
    return flat.reshape(images.shape), np.clip(pca.reconstruct(flat), 0, 1).reshape(images.shape)

  sums = {}
  for i in range(0, len(test), batch_size):
    per_image = _recon_metrics(*reconstruct(test[i:i + batch_size]), prefix="recon_",
                               paper_window=paper_window)
    for key, v in per_image.items():
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(v), dtype=np.float64))
  out = {"k": int(pca.components.shape[0]), "explained_variance_fraction": pca.explained_fraction,
         **{key: v / len(test) for key, v in sums.items()}}
  if paper_window:
    out["paper_protocol_ssim"] = float(paper_ssim(*reconstruct(train[:1]))[0])
  return out


# ----------------------------------------------------------------------------- factor labels

FACTOR_SEED = 0  # fixed, not the run's: every run of a sweep is scored on the same images


def factor_sample_sizes(num_images: int) -> tuple[int, int]:
  """(num_points, num_test) of `disentanglement.factor_metrics` on a split of num_images: the
  protocol's 10,000 and 5,000, cut in the same 2:1 ratio when the split is smaller (a
  subsampled dSprites; MI's upward bias then grows)."""
  num_points, num_test = disentanglement.NUM_POINTS, disentanglement.NUM_TEST
  if num_images >= num_points + num_test:
    return num_points, num_test
  num_points = num_images * num_points // (num_points + num_test)
  return num_points, num_images - num_points


def factor_codes(model: models.VAE, params, config, split: data.Split, key: jax.Array,
                 mesh) -> tuple[np.ndarray, np.ndarray]:
  """Posterior means f32[N, K] and factor labels int32[N, F] of N = num_points + num_test
  images of `split` (`factor_sample_sizes`) drawn without replacement with FACTOR_SEED."""
  n = sum(factor_sample_sizes(len(split.images)))
  rows = np.sort(np.random.default_rng(FACTOR_SEED).choice(len(split.images), n, replace=False))
  means, _ = posterior_stats(model, params, split.images[rows], key, config.data.binarize,
                             config.eval.batch_size, mesh, loops.resolve(config, mesh))
  return means, split.factors[rows]


def factor_mutual_info(model: models.VAE, params, config, ds: data.Dataset, key: jax.Array,
                       mesh) -> np.ndarray:
  """`factor_metrics_of_run`'s mutual_info_nats f64[K, F] (binned latent x factor, nats) without
  DCI's forests. On the full protocol (15,000 points, 10 latents, 2 CPU cores) MIG's part took
  0.3 s and factor_metrics 22 s, so the figures, drawn during training, use this."""
  codes, factors = factor_codes(model, params, config, ds.train, key, mesh)
  train, _ = disentanglement.protocol_rows(len(codes), FACTOR_SEED,
                                           *factor_sample_sizes(len(ds.train.images)))
  return disentanglement.mig(codes[train], factors[train]).mutual_info


def factor_metrics_of_run(run, mesh) -> dict:
  """`disentanglement.factor_metrics` (MIG, DCI) of a restored run's posterior means on its
  factor-labelled train split (for dSprites, the whole factor grid), with FACTOR_SEED."""
  ds = run.dataset
  if ds.train.factors is None:
    raise ValueError(f"{ds.name} has no factor labels; factor metrics need a factor-labelled "
                     "source such as data.source=sprites")
  codes, factors = factor_codes(run.model, run.state.params, run.config, ds.train, run.keys.eval,
                                mesh)
  num_points, num_test = factor_sample_sizes(len(ds.train.images))
  out = disentanglement.factor_metrics(codes, factors, ds.factor_names, seed=FACTOR_SEED,
                                       num_points=num_points, num_test=num_test)
  out["estimators"]["codes"] = (
      f"posterior means of {num_points + num_test} of the {len(ds.train.images)} train-split "
      f"images (for dSprites, the factor grid), drawn without replacement with seed "
      f"{FACTOR_SEED}, the same images for every run")
  return out


def estimators(likelihood: str, binarize: str, image_shape, iw_samples: int,
               layers: int = 1) -> dict[str, str]:
  """What each key of eval.json's "vae" and "pca" sections estimates, and how, for a model of
  `layers` stochastic layers."""
  model_lik = {
      "gaussian": "Gaussian density on [0,1] pixels (continuous, not a probability of 8-bit data)",
      "bernoulli": f"Bernoulli on binarized pixels (binarize={binarize})",
      "discretized_logistic": "discretized logistic over the 256 pixel levels"}[likelihood]
  discrete = ("the Gaussian decoder binned on the 256 pixel levels (discretized Gaussian)"
              if likelihood == "gaussian" else model_lik)
  sfx = "_discrete" if likelihood == "gaussian" else ""
  size, sigma = ssim_filter(*image_shape[:2])
  out = {
      "elbo_nats": f"ELBO, one posterior draw per image, analytic KL; {model_lik}",
      "log_lik_nats": "E_q[log p(x|z)] from the ELBO's draw",
      "kl_nats": "KL(q(z|x) || N(0, I)), analytic",
      "bits_per_dim": f"-ELBO / (D ln 2), D = {int(np.prod(image_shape))}; {discrete}",
      f"iwae{sfx}_nats": f"IWAE bound: logsumexp of K={iw_samples} log-weights - log K; {discrete}",
      f"iwae_elbo{sfx}_nats": f"mean of the same K={iw_samples} log-weights (ELBO, Monte Carlo KL)",
      "iwae_bits_per_dim": f"the IWAE bound per dimension; {discrete}",
      "recon_mean_*": "reconstruction decoded from the posterior mean",
      "recon_sample_*": "reconstruction decoded from one posterior draw (the ELBO's)",
      "*_ssim": f"dm-pix SSIM, max_val 1, {size}x{size} Gaussian window (sigma {sigma:.2f}), "
                "against the original in [0, 1], mean over the test split",
      "*_ssim_paper_window": "the paper's SSIM settings (scikit-image then: 7x7 uniform window, "
                             "data_range 2), mean over the test split",
      "paper_protocol_ssim*": "paper protocol: the paper's SSIM settings on ONE training image "
                              "(index 0), as the paper reported it",
      "*_psnr_db": "PSNR in dB, peak 1, mean over images",
      "*_mse": "mean squared error per pixel and channel, [0, 1] units",
      "active_units": f"dims j with Cov_x(E_q[z_j|x]) > {ACTIVE_UNIT_THRESHOLD} over the test "
                      "split",
      "active_units_per_layer": "two stochastic layers: the active units of h1 (means of "
                                "q(h1|x)) and of the top code (means of q(h2|h1) at one draw "
                                "of h1), as Burda et al. count them",
      "kl_per_dim_nats": "KL per latent dim, analytic, mean over the test split (two layers: "
                         "the top code's given the ELBO's draw of h1)",
      "pca": "PCA with k = latent_dim components fit on the training split (k capped at D)",
  }
  if likelihood == "gaussian":
    out["elbo_discrete_nats"] = f"ELBO with the same draw and KL; {discrete}"
  if layers == 2:
    out["elbo_nats"] = f"ELBO, one draw of h1 ~ q(h1|x) and h2 ~ q(h2|h1) per image; {model_lik}"
    out["kl_nats"] = ("KL(q(h1, h2|x) || p(h1, h2)) estimated at that draw: log q(h1|x) - "
                      "log p(h1|h2) + KL(q(h2|h1) || N(0, I)), the last analytic")
    out[f"iwae_elbo{sfx}_nats"] = (f"mean of the same K={iw_samples} log-weights (ELBO, Monte "
                                   "Carlo KL); each weight draws h1, then h2 given h1")
    out["active_units"] = (f"code dims j with Cov_x(E_q[h2_j|h1]) > {ACTIVE_UNIT_THRESHOLD} "
                           "over the test split, h1 drawn once per image")
  else:
    del out["active_units_per_layer"]
  return out


def evaluate_run(run, iw_samples: int | None = None, name: str = "") -> dict:
  """Every metric of a restored run (`jaxvae.train.restore_run`), called `name`, on its test split.

  Returns the eval.json dict: the run's identity, "vae" and "pca" metrics, KL per dim, the
  posterior-mean variance per dim, "estimators", seconds per stage and, when the data has
  factor labels, "factors" (`factor_metrics_of_run`: MIG, DCI, their protocol).
  """
  config, ds, model = run.config, run.dataset, run.model
  iw_samples = config.eval.iw_samples if iw_samples is None else iw_samples
  if iw_samples <= 0:
    raise run_lib.RunError(f"--iw_samples={iw_samples} must be a positive number of importance "
                           "samples, e.g. 1000")
  mesh = parallel.make_mesh()
  seconds = {}

  def timed(stage, fn, *args):
    t = time.time()
    out = fn(*args)
    seconds[stage] = round(time.time() - t, 2)
    return out

  vae, kl, variance = _vae_metrics(run, iw_samples, mesh, timed)
  pca = timed("pca", pca_baseline, ds.train.images, ds.test.images, config.model.latent_dim,
              config.eval.batch_size)
  result = {
      "run": name,
      "epoch": int(run.progress["epoch"]), "step": int(run.state.step),
      "dataset": ds.name, "num_test_images": len(ds.test.images), "image_shape": ds.image_shape,
      "likelihood": model.likelihood, "latent_dim": config.model.latent_dim,
      "iw_samples": iw_samples, "vae": vae, "pca": pca,
      "kl_per_dim_nats": kl.mean(axis=0).tolist(),
      "posterior_mean_variance": variance.tolist(),
      "estimators": estimators(model.likelihood, config.data.binarize, ds.image_shape, iw_samples,
                               models.stochastic_layers(model)),
      "seconds": seconds,
  }
  if ds.train.factors is not None:
    result["factors"] = timed("factors", factor_metrics_of_run, run, mesh)
  return result


def _vae_metrics(run, iw_samples: int, mesh, timed) -> tuple[dict, np.ndarray, np.ndarray]:
  """evaluate_run's "vae" section, the KL per dim f32[N, K] and the posterior-mean variance
  f32[K]; `timed(stage, fn, *args)` calls fn and records its seconds."""
  config, ds, model, params = run.config, run.dataset, run.model, run.state.params
  key = run.keys.eval
  sfx = "_discrete" if model.likelihood == "gaussian" else ""
  vae = timed("elbo_and_recon", Evaluator(model, config, ds.test, mesh, full=True), params, key)
  del vae["kl_per_dim_nats"]  # eval.json holds it once, at its top level
  iw = timed("iwae", iwae_on_split, model, params, config, ds.test, mesh, key, iw_samples)
  vae[f"iwae{sfx}_nats"] = iw["iwae"]
  vae[f"iwae_elbo{sfx}_nats"] = iw["elbo"]
  vae["iwae_bits_per_dim"] = float(distributions.bits_per_dim(iw["iwae"],
                                                              int(np.prod(ds.image_shape))))
  stats_args = (model, params, ds.test.images, key, config.data.binarize, config.eval.batch_size,
                mesh, loops.resolve(config, mesh))
  means, kl = timed("posterior", posterior_stats, *stats_args)
  vae["active_units"], variance = active_units(means)
  if models.stochastic_layers(model) == 2:
    # Burda et al. count each layer: "active units" is the top code's, as for one layer.
    bottom, _ = posterior_stats(*stats_args, layer="bottom")
    vae["active_units_per_layer"] = [active_units(bottom)[0], vae["active_units"]]
  if min(ds.image_shape[:2]) >= PAPER_SSIM_WINDOW:
    vae.update(paper_protocol(model, params, ds.train.images[0], key, config.data.binarize))
  return vae, kl, variance


def _cell(v) -> str:
  """A table cell: strings as they are, None (not computed) as n/a, numbers to 4 decimals."""
  if isinstance(v, str):
    return v
  if v is None:
    return "n/a"
  return f"{v:.2f}" if abs(v) >= 100 else f"{v:.4f}"


def format_table(result: dict) -> str:
  """The results table: VAE (posterior mean), VAE (posterior draw) and PCA side by side."""
  vae, pca, k = result["vae"], result["pca"], result["iw_samples"]
  sfx = "_discrete" if result["likelihood"] == "gaussian" else ""
  lik = "discretized Gaussian" if sfx else result["likelihood"]
  layers = vae.get("active_units_per_layer")  # two stochastic layers only
  kl_how = "analytic" if layers is None else "same draw; analytic for the top layer only"
  rows = [  # label, VAE, VAE z~q, PCA ("" where it does not apply), estimator
      ("ELBO (nats/image)", vae["elbo_nats"], "", "",
       f"1 draw/image, {'analytic' if layers is None else 'estimated'} KL, "
       f"{result['likelihood']} likelihood"),
      ("  E_q log p(x|z) (nats/image)", vae["log_lik_nats"], "", "", "same draw"),
      ("  KL (nats/image)", vae["kl_nats"], "", "", kl_how),
  ]
  if sfx:
    rows.append(("ELBO, discrete (nats/image)", vae["elbo_discrete_nats"], "", "",
                 "same draw, Gaussian binned on 256 levels"))
  rows += [
      ("ELBO (bits/dim)", vae.get("bits_per_dim"), "", "", lik),
      (f"IWAE K={k} (nats/image)", vae[f"iwae{sfx}_nats"], "", "", f"{lik}, >= ELBO"),
      (f"IWAE K={k} (bits/dim)", vae["iwae_bits_per_dim"], "", "", lik),
      ("ELBO of the IWAE draws (nats/image)", vae[f"iwae_elbo{sfx}_nats"], "", "",
       f"mean of the {k} log-weights"),
      ("SSIM", vae["recon_mean_ssim"], vae["recon_sample_ssim"], pca["recon_ssim"],
       "dm-pix, Gaussian window, test split"),
      ("SSIM, paper window", vae.get("recon_mean_ssim_paper_window"),
       vae.get("recon_sample_ssim_paper_window"), pca.get("recon_ssim_paper_window"),
       "7x7 uniform, data_range 2, test split"),
      ("SSIM, paper protocol", vae.get("paper_protocol_ssim_mean"),
       vae.get("paper_protocol_ssim_sample"), pca.get("paper_protocol_ssim"),
       "paper window, ONE training image"),
      ("PSNR (dB)", vae["recon_mean_psnr_db"], vae["recon_sample_psnr_db"], pca["recon_psnr_db"],
       "peak 1, test split"),
      ("MSE (per pixel)", vae["recon_mean_mse"], vae["recon_sample_mse"], pca["recon_mse"],
       "[0, 1] units, test split"),
      ("active units", f"{vae['active_units']}/{result['latent_dim']}", "", "",
       f"Cov_x E_q[z] > {ACTIVE_UNIT_THRESHOLD}"),
  ]
  if layers is not None:
    rows.append(("active units per layer", " + ".join(map(str, layers)), "", "",
                 "h1, then the code h2 (its means at one draw of h1)"))
  cells = [("metric", "VAE", "VAE z~q", f"PCA k={pca['k']}", "estimator")]
  cells += [(label, *map(_cell, values), note) for label, *values, note in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(5)]
  lines = [f"{result['run']}: {result['dataset']} test split ({result['num_test_images']} images), "
           f"epoch {result['epoch']}, step {result['step']}, {result['likelihood']} likelihood, "
           f"k={result['latent_dim']}",
           "VAE: likelihood bounds, and reconstructions decoded from the posterior mean; "
           "VAE z~q: decoded from one posterior draw"]
  for i, row in enumerate(cells):
    lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                         zip(row[1:4], widths[1:4])] + [row[4]]))
    if i == 0:
      lines.append("-" * (sum(widths) + 8))
  kl = np.asarray(result["kl_per_dim_nats"])
  lines.append("KL per latent dim (nats), largest first: "
               + ", ".join(f"z{j} {kl[j]:.3g}" for j in np.argsort(kl)[::-1][:8]))
  return "\n".join(lines)


def report(result: dict) -> str:
  """What the evaluate command prints: `format_table`, then the factor metrics' table when
  eval.json has them (`disentanglement.format_table`), then the seconds per stage."""
  parts = [format_table(result)]
  if "factors" in result:
    parts += [f"factor metrics: {result['factors']['estimators']['codes']}",
              disentanglement.format_table(result["factors"])]
  if "fid" in result:
    parts.append(fid_lib.format_fid(result["fid"]))
  parts.append("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
  return "\n".join(parts)


def main(argv):
  workdir = flags.FLAGS.workdir
  run = run_lib.restore_run_for_command(argv, workdir)
  result = evaluate_run(run, flags.FLAGS.iw_samples, os.path.basename(os.path.abspath(workdir)))
  if flags.FLAGS.fid:
    result["fid"] = fid_lib.fid_of_run(run, flags.FLAGS.fid)
  print(report(result))
  path = os.path.join(workdir, "eval.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":  # flags defined only here: train.py, which imports this, has --workdir
  flags.DEFINE_string("workdir", None, "A training run's --workdir (config.json, checkpoints/).")
  flags.DEFINE_integer("iw_samples", None, "K, importance samples per image for the IWAE bound "
                       "(default config.eval.iw_samples).")
  flags.DEFINE_integer("fid", 0, "N > 0: FID and KID of N prior samples and of N test "
                       "reconstructions against the training split (jaxvae/fid.py, docs/fid.md).")
  flags.mark_flags_as_required(["workdir"])
  app.run(run_lib.exit_on_user_error(main))
