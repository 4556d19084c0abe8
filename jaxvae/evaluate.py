"""Test-split metrics, computed over the whole split in one compiled call.

Every figure is per example, averaged over the split: the ELBO and its two terms in nats (one
posterior sample per image, with a fixed key), bits/dim for discrete likelihoods, and SSIM
(dm-pix, max_val 1) and MSE of the reconstruction decoded from the posterior mean against
the image in [0, 1].
"""

import functools
import math

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import data, distributions, models, objectives, parallel


def ssim_filter(height: int, width: int) -> tuple[int, float]:
  """dm-pix's 11-pixel, sigma-1.5 Gaussian window, shrunk to fit small images.

  dm_pix.ssim silently returns a wrong value when the filter exceeds the image, so the size is
  the largest odd number <= min(11, H, W), with sigma scaled in proportion.
  """
  size = min(11, height, width)
  size -= 1 - size % 2
  return size, 1.5 * size / 11


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """SSIM of images in [0, 1]: f32[B, H, W, C] x2 -> f32[B]."""
  size, sigma = ssim_filter(x.shape[-3], x.shape[-2])
  return dm_pix.ssim(x, y, max_val=1.0, filter_size=size, filter_sigma=sigma)


def _eval_batch(params, x_uint8, key, *, model, binarize):
  """Per-example metrics of one batch: dict of f32[B]."""
  bin_key, z_key = jax.random.split(key)
  original = data.to_unit_interval(x_uint8, None)
  x = data.to_unit_interval(x_uint8, bin_key, binarize)
  t = objectives.elbo_terms(params, z_key, x, model=model)
  recon = distributions.likelihood_mean(
      model.likelihood, model.apply(params, t["mean"], method=models.VAE.decode))
  out = {"elbo_nats": t["log_lik"] - t["kl"], "log_lik_nats": t["log_lik"], "kl_nats": t["kl"],
         "ssim": ssim(original, recon),
         "mse": distributions.sum_except_batch(jnp.square(original - recon)) / np.prod(x.shape[1:])}
  return out


class Evaluator:
  """Holds the padded test split on device and the compiled metric function.

  `evaluator(params, key)` -> dict of Python floats, means over the real test images.
  """

  def __init__(self, model: models.VAE, config, test: data.Split, mesh):
    n = len(test.images)
    self.batch = min(config.eval.batch_size, n)
    num_batches = math.ceil(n / self.batch)
    pad = num_batches * self.batch - n
    images = np.concatenate([test.images, np.zeros((pad,) + test.images.shape[1:], np.uint8)])
    mask = np.arange(num_batches * self.batch) < n
    replicated = parallel.replicated(mesh)
    self.images = jax.device_put(images.reshape((num_batches, self.batch) + test.images.shape[1:]),
                                 replicated)
    self.mask = jax.device_put(mask.reshape(num_batches, self.batch), replicated)
    self.num_dims = int(np.prod(test.images.shape[1:]))
    self.discrete = model.likelihood in distributions.DISCRETE_LIKELIHOODS
    batch_fn = functools.partial(_eval_batch, model=model, binarize=config.data.binarize)
    sharded = self.batch % mesh.shape[parallel.DATA_AXIS] == 0
    batch_sharding = parallel.batch_sharded(mesh)

    def run(params, images, mask, key):
      def one(args):
        i, x = args
        if sharded:
          x = jax.lax.with_sharding_constraint(x, batch_sharding)
        return batch_fn(params, x, jax.random.fold_in(key, i))
      per_example = jax.lax.map(one, (jnp.arange(images.shape[0]), images))
      return {k: jnp.sum(jnp.where(mask, v, 0.0)) / mask.sum() for k, v in per_example.items()}

    self._run = jax.jit(run)

  def __call__(self, params, key: jax.Array) -> dict[str, float]:
    out = {k: float(v) for k, v in jax.device_get(self._run(params, self.images, self.mask, key)).items()}
    if self.discrete:
      out["bits_per_dim"] = float(distributions.bits_per_dim(out["elbo_nats"], self.num_dims))
    return out

  def cache_size(self) -> int:
    return self._run._cache_size()
