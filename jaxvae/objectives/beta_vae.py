"""The beta-weighted ELBO objective (`objective.kind="elbo"`, the beta-VAE):

    loss = -E[log p(x|z)] + beta(step) KL

beta = 1 is the negative ELBO (`jaxvae.elbo`); free bits floor each latent dim's KL.
"""

import jax
import jax.numpy as jnp

from jaxvae import distributions
from jaxvae.elbo import elbo_terms
from jaxvae.models import VAE
from jaxvae.objectives import base


def free_bits_kl(mean: jax.Array, log_scale: jax.Array, free_bits: float) -> jax.Array:
  """sum_k max(mean_b KL_bk, free_bits): the KL with each latent dim's batch mean floored.

  mean, log_scale: f32[B, K] -> f32[] nats. A dim below the floor gets no gradient (IAF's
  free bits, Kingma et al. 2016), so the prior cannot pull it all the way to collapse.
  """
  kl_dims = distributions.kl_per_dim(mean, log_scale).mean(axis=0)  # [K]
  return jnp.maximum(kl_dims, free_bits).sum()


def beta_elbo_loss(params, rng: jax.Array, x: jax.Array, *, model: VAE,
                   beta: float | jax.Array = 1.0, num_samples: int = 1, free_bits: float = 0.0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss -(E[log p(x|z)] - beta * KL), mean over the batch, and batch metrics.

  With `free_bits` > 0 the KL in the loss is `free_bits_kl`. The metrics report the plain
  ELBO (beta = 1, the true KL) whatever beta and free_bits are, in nats per example.
  """
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
  kl_term = free_bits_kl(t["mean"], t["log_scale"], free_bits) if free_bits else kl
  value = -(log_lik - beta * kl_term)
  return value, base.elbo_metrics(value, log_lik, kl)


class BetaELBO(base.Objective):
  """-E[log p(x|z)] + beta KL, beta after warm-up; beta = 1 is the negative ELBO."""
  kind = "elbo"
  reads_beta = True
  defaults = {"beta": 1.0}  # the KL weight in the loss; reported ELBOs always use 1

  @classmethod
  def check_keys(cls, o):
    base.check_nonnegative(o, "beta", "warmup_steps", "free_bits")

  @classmethod
  def check(cls, config):
    if config.objective.free_bits:
      base.check_one_layer(config, "objective.free_bits")

  def loss(self, params, rng, x, step):
    beta = self.weight(self.cfg.beta, step)
    value, metrics = beta_elbo_loss(params, rng, x, model=self.model, beta=beta,
                                    num_samples=self.cfg.num_samples,
                                    free_bits=self.cfg.free_bits)
    return value, dict(metrics, beta=jnp.asarray(beta, jnp.float32))
