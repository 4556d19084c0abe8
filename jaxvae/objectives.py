"""The ELBO and the training loss built on it.

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I))

Per example: the log-likelihood is summed over pixels and the KL over latent dims; the
expectation is the mean of `num_samples` reparameterized draws (the paper's 1/L sum).
Batch figures are means over examples. Everything is in nats.
"""

import jax
import jax.numpy as jnp

from jaxvae import distributions
from jaxvae.models import VAE


def elbo_terms(params, rng: jax.Array, x: jax.Array, *, model: VAE,
               num_samples: int = 1) -> dict[str, jax.Array]:
  """The two ELBO terms per example.

  x: f32[B, H, W, C] in [0, 1]. Returns f32[B] arrays `log_lik` (the Monte Carlo estimate of
  E_q[log p(x|z)] from `num_samples` draws) and `kl` (analytic), plus the posterior
  `mean` and `log_scale` f32[B, K].
  """
  mean, log_scale = model.apply(params, x, method=VAE.encode)
  z = distributions.sample_diag_gaussian(rng, mean, log_scale, num_samples)  # [L, B, K]
  obs = model.apply(params, z.reshape(-1, z.shape[-1]), method=VAE.decode)
  x_rep = jnp.broadcast_to(x, (num_samples,) + x.shape).reshape((-1,) + x.shape[1:])
  log_lik = distributions.log_likelihood(model.likelihood, x_rep, obs)
  log_lik = log_lik.reshape(num_samples, x.shape[0]).mean(axis=0)
  kl = distributions.kl_standard_normal(mean, log_scale)
  return {"log_lik": log_lik, "kl": kl, "mean": mean, "log_scale": log_scale}


def elbo(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int = 1) -> jax.Array:
  """ELBO per example: x f32[B, H, W, C] -> f32[B] nats."""
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  return t["log_lik"] - t["kl"]


def loss(params, rng: jax.Array, x: jax.Array, *, model: VAE, beta: float = 1.0,
         num_samples: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss -(E[log p(x|z)] - beta * KL), mean over the batch, and batch metrics.

  The metrics report the plain ELBO (beta = 1) whatever beta is, in nats per example.
  """
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
  value = -(log_lik - beta * kl)
  return value, {"loss": value, "elbo_nats": log_lik - kl, "log_lik_nats": log_lik,
                 "kl_nats": kl}
