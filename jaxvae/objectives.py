"""The ELBO and the training loss built on it.

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I))

Per example: the log-likelihood is summed over pixels and the KL over latent dims; the
expectation is the mean of `num_samples` reparameterized draws (the paper's 1/L sum).
Batch figures are means over examples. Everything is in nats.
"""

import functools
import math
from typing import Callable

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


def iwae_bound(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int,
               chunk_size: int | None = None,
               log_lik_fn: Callable[[jax.Array, dict], jax.Array] | None = None,
               unroll: bool = False) -> dict[str, jax.Array]:
  """The importance-weighted bound (Burda et al. 2016) with K = `num_samples` draws from q(z|x).

      log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),   z_k ~ q(z|x)
      iwae    = logsumexp_k(log w_k) - log K   (<= log p(x), rising to it as K grows)
      elbo    = mean_k(log w_k)                (the K-sample ELBO; iwae >= elbo per example)

  x: f32[B, H, W, C]. The draws are taken `chunk_size` at a time (B * chunk_size decoded images
  in memory at once) and folded into a running float32 logsumexp. `log_lik_fn(x, obs) -> f32[B]`
  scores the decoder output; the default is the model's own likelihood. `unroll` runs the
  chunks as straight-line code, with no loop (see `jaxvae.loops`). Returns f32[B] nats.
  """
  if log_lik_fn is None:
    log_lik_fn = functools.partial(distributions.log_likelihood, model.likelihood)
  chunk = min(chunk_size or num_samples, num_samples)
  num_chunks = -(-num_samples // chunk)
  mean, log_scale = model.apply(params, x, method=VAE.encode)
  x_rep = jnp.broadcast_to(x, (chunk,) + x.shape).reshape((-1,) + x.shape[1:])

  def body(carry, i):
    lse, total = carry
    z = distributions.sample_diag_gaussian(jax.random.fold_in(rng, i), mean, log_scale, chunk)
    obs = model.apply(params, z.reshape(-1, z.shape[-1]), method=VAE.decode)
    log_w = (log_lik_fn(x_rep, obs).reshape(chunk, x.shape[0])
             + distributions.standard_normal_log_prob(z)
             - distributions.diag_gaussian_log_prob(z, mean, log_scale))  # [chunk, B]
    # The last chunk may overrun K; its extra draws count for nothing.
    real = (i * chunk + jnp.arange(chunk) < num_samples)[:, None]
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(jnp.where(real, log_w, -jnp.inf), axis=0))
    return (lse, total + jnp.where(real, log_w, 0.0).sum(axis=0)), None

  init = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
  (lse, total), _ = jax.lax.scan(body, init, jnp.arange(num_chunks), unroll=unroll)
  return {"iwae": lse - math.log(num_samples), "elbo": total / num_samples}
