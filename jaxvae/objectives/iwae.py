"""The importance-weighted bound (Burda, Grosse & Salakhutdinov 2016): its training objective
(`objective.kind="iwae"`) and its evaluation with many draws.

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),   z_k ~ q(z|x)
    iwae    = logsumexp_k(log w_k) - log k   (<= log p(x), rising to it as k grows)
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxvae import distributions
from jaxvae.errors import ConfigError
from jaxvae.models import VAE
from jaxvae.objectives import base


def log_weights(params, x: jax.Array, z: jax.Array, mean: jax.Array, log_scale: jax.Array, *,
                model: VAE, log_lik_fn: Callable[[jax.Array, dict], jax.Array] | None = None,
                upper_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Importance log-weights log w = log p(x|z) + log p(z) - log q(z|x) of draws z ~ q(z|x).

  x: f32[B, H, W, C]; z: f32[S, B, K]; mean, log_scale: f32[B, K], the posterior of x.
  `log_lik_fn(x, obs) -> f32[B]` scores the decoder output; the default is the model's own
  likelihood. log p(z) is the model's `log_prior` (two layers: from one upper draw keyed by
  `upper_rng`, so log w is the two-layer weight log p(x, h1, h2) - log q(h1, h2|x)). Returns
  (log_w, log_lik), f32[S, B] nats each.
  """
  if log_lik_fn is None:
    log_lik_fn = functools.partial(distributions.log_likelihood, model.likelihood)
  num_draws = z.shape[0]
  obs = model.apply(params, z.reshape(-1, z.shape[-1]), method="decode_bottom")
  x_rep = jnp.broadcast_to(x, (num_draws,) + x.shape).reshape((-1,) + x.shape[1:])
  log_lik = log_lik_fn(x_rep, obs).reshape(num_draws, x.shape[0])
  log_prior = model.apply(params, z, upper_rng, method="log_prior")
  log_w = log_lik + log_prior - distributions.diag_gaussian_log_prob(z, mean, log_scale)
  return log_w, log_lik


def iwae_loss(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IWAE training loss with k = `num_samples` draws from q(z|x):

      loss = -mean_b(logsumexp_k log w_k - log k)   (see `log_weights`)

  x: f32[B, H, W, C]. Metrics: `iwae_nats` (the bound) and the plain ELBO from the same k
  draws, its KL the model's `kl` (analytic for one layer; estimated at the draws for two).
  """
  rng, upper_rng = model.layer_keys(rng)
  mean, log_scale = model.apply(params, x, method="encode_bottom")
  z = distributions.sample_diag_gaussian(rng, mean, log_scale, num_samples)  # [k, B, K]
  log_w, log_lik = log_weights(params, x, z, mean, log_scale, model=model, upper_rng=upper_rng)
  iwae = (jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)).mean()
  value = -iwae
  kl = model.apply(params, z, mean, log_scale, upper_rng, method="kl")[0].mean()
  return value, dict(base.elbo_metrics(value, log_lik.mean(), kl), iwae_nats=iwae)


def iwae_bound(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int,
               chunk_size: int | None = None,
               log_lik_fn: Callable[[jax.Array, dict], jax.Array] | None = None,
               unroll: bool = False) -> dict[str, jax.Array]:
  """The importance-weighted bound with K = `num_samples` draws, for evaluation:
  {"iwae": f32[B], "elbo": the K-sample ELBO mean_k log w_k, f32[B]} in nats (iwae >= elbo).

  x: f32[B, H, W, C]. The draws are taken `chunk_size` at a time (B * chunk_size decoded images
  in memory at once) and folded into a running float32 logsumexp. `log_lik_fn(x, obs) -> f32[B]`
  scores the decoder output; the default is the model's own likelihood. `unroll` runs the
  chunks as straight-line code, with no loop (see `jaxvae.loops`).
  """
  chunk = min(chunk_size or num_samples, num_samples)
  num_chunks = -(-num_samples // chunk)
  draw_log_weights = _top_down_draws if model.top_down else _draws
  posterior = None if model.top_down else model.apply(params, x, method="encode_bottom")

  def body(carry, i):
    lse, total = carry
    log_w = draw_log_weights(params, jax.random.fold_in(rng, i), x, posterior, chunk,
                             model=model, log_lik_fn=log_lik_fn)  # [chunk, B]
    # The last chunk may overrun K; its extra draws count for nothing.
    real = (i * chunk + jnp.arange(chunk) < num_samples)[:, None]
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(jnp.where(real, log_w, -jnp.inf), axis=0))
    return (lse, total + jnp.where(real, log_w, 0.0).sum(axis=0)), None

  init = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
  (lse, total), _ = jax.lax.scan(body, init, jnp.arange(num_chunks), unroll=unroll)
  return {"iwae": lse - math.log(num_samples), "elbo": total / num_samples}


def _draws(params, key, x, posterior, chunk: int, *, model: VAE, log_lik_fn):
  """`log_weights` of `chunk` draws from q(z|x) = N(*posterior): f32[chunk, B]."""
  key, upper_rng = model.layer_keys(key)
  z = distributions.sample_diag_gaussian(key, *posterior, chunk)
  return log_weights(params, x, z, *posterior, model=model, log_lik_fn=log_lik_fn,
                     upper_rng=upper_rng)[0]


def _top_down_draws(params, key, x, posterior, chunk: int, *, model: VAE, log_lik_fn):
  """A top-down model's log-weights (`topdown.TopDownVAE.log_weight`) of `chunk` draws per
  example, each through every latent group: f32[chunk, B]. The model's own likelihood scores
  them (a discrete one, which `log_lik_fn` would give too)."""
  del posterior, log_lik_fn
  x_rep = jnp.broadcast_to(x, (chunk,) + x.shape).reshape((-1,) + x.shape[1:])
  return model.apply(params, x_rep, key, method="log_weight").reshape(chunk, x.shape[0])


class IWAE(base.Objective):
  """The IWAE loss with k = `num_samples` draws; no KL term to weight, warm up or floor."""
  kind = "iwae"

  @classmethod
  def check(cls, config):
    o = config.objective
    if o.num_samples < 2:
      raise ConfigError(f"config.objective.num_samples={o.num_samples} with kind='iwae' is the "
                        "single-sample ELBO (with a Monte Carlo KL); use kind='elbo' or >= 2")
    for key in ("warmup_steps", "free_bits"):
      if o[key]:
        raise ConfigError(f"config.objective.{key}={o[key]} needs a KL term, and kind='iwae' "
                          "has none apart from its log-weights; set it to 0")

  def loss(self, params, rng, x, step):
    del step  # no schedule
    return iwae_loss(params, rng, x, model=self.model, num_samples=self.cfg.num_samples)
