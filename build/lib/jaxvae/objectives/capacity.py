"""Controlled capacity (Burgess et al. 2018), `objective.kind="capacity"`:

    loss = -E[log p(x|z)] + gamma(step) |KL - C(step)|

C rises linearly from `capacity_start` to `capacity_max` nats over `capacity_steps` optimizer
steps, then stays; the penalty pulls the KL towards C from either side, so C sets how much
information the code carries.
"""

import jax
import jax.numpy as jnp

from jaxvae.errors import ConfigError, check_positive
from jaxvae.models import VAE
from jaxvae.elbo import elbo_terms
from jaxvae.objectives import base, beta_vae


def capacity_loss(params, rng: jax.Array, x: jax.Array, *, model: VAE,
                  capacity: float | jax.Array, gamma: float | jax.Array, num_samples: int = 1,
                  free_bits: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-E[log p(x|z)] + gamma |KL - C|, mean over the batch, and the plain-ELBO metrics.

  KL is the per-example KL summed over latent dims, batch mean (`free_bits_kl` with free
  bits); `capacity` C in nats. gamma pairs with a log-likelihood summed over the D pixels:
  were it averaged over pixels, the same run would need gamma / D.

  The paper's beta-VAE line E[log p(x|z)] - beta (KL - epsilon) is not this: taken
  literally epsilon is a constant with zero gradient, and that run is a plain beta-VAE.
  """
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
  kl_term = beta_vae.free_bits_kl(t["mean"], t["log_scale"], free_bits) if free_bits else kl
  value = -log_lik + gamma * jnp.abs(kl_term - capacity)
  return value, base.elbo_metrics(value, log_lik, kl)


def capacity_schedule(step: jax.Array, start: float, stop: float, steps: int) -> jax.Array:
  """C(step) = start + (stop - start) min(step / steps, 1): nats, f32[]."""
  return start + (stop - start) * jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)


class Capacity(base.Objective):
  """Burgess et al.'s capacity objective; metrics add `capacity_nats` C(step) and the weight
  gamma after warm-up as `beta`."""
  kind = "capacity"
  defaults = {
      "capacity_start": 0.0,     # C rises linearly from start to max nats over
      "capacity_max": 25.0,      #   capacity_steps optimizer steps, then stays at max
      "capacity_steps": 100_000,
      "capacity_gamma": 1000.0,  # the weight of |KL - C| for a log-likelihood summed over pixels
  }

  @classmethod
  def check_keys(cls, o):
    base.check_nonnegative(o, "capacity_start")
    check_positive(o.capacity_steps, "objective.capacity_steps")
    check_positive(o.capacity_gamma, "objective.capacity_gamma", float)
    if o.capacity_max < o.capacity_start:
      raise ConfigError(f"config.objective.capacity_max={o.capacity_max} is below "
                        f"objective.capacity_start={o.capacity_start}")

  @classmethod
  def check(cls, config):
    if config.objective.free_bits:
      base.check_one_layer(config, "objective.free_bits")

  def loss(self, params, rng, x, step):
    cfg = self.cfg
    gamma = self.weight(cfg.capacity_gamma, step)
    capacity = capacity_schedule(step, cfg.capacity_start, cfg.capacity_max, cfg.capacity_steps)
    value, metrics = capacity_loss(params, rng, x, model=self.model, capacity=capacity,
                                   gamma=gamma, num_samples=cfg.num_samples,
                                   free_bits=cfg.free_bits)
    return value, dict(metrics, beta=jnp.asarray(gamma, jnp.float32), capacity_nats=capacity)
