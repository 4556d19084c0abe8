"""The ELBO with the reparameterization trick, per example:

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))

The log-likelihood is summed over pixels and the KL over latent dims; the expectation is the
mean of `num_samples` reparameterized draws (the paper's 1/L sum), all in nats. A one-layer
model's KL to N(0, I) is analytic; a two-layer model's is estimated at the draws
(`models.HierarchicalVAE.kl`). The training objectives built on it live in
`jaxvae/objectives/`.
"""

import jax
import jax.numpy as jnp

from jaxvae import distributions
from jaxvae.models import VAE

def elbo_terms(params, rng: jax.Array, x: jax.Array, *, model: VAE,
               num_samples: int = 1) -> dict[str, jax.Array]:
  """The two ELBO terms per example.

  x: f32[B, H, W, C] in [0, 1]. Returns f32[B] arrays `log_lik` (the Monte Carlo estimate of
  E_q[log p(x|z)] from `num_samples` draws) and `kl` (the model's `kl`), the posterior `mean`
  and `log_scale` f32[B, K] of the latent next to x, its draws `z` f32[L, B, K], the decoder
  output `obs` of the draws (each f32[L * B, ...]) and `kl_per_dim` f32[B, K_top].

  A top-down model (`models.VAE.top_down`) gives its own one-draw terms (`topdown.TopDownVAE.terms`):
  `log_lik`, `kl`, `obs` and, as `kl_per_dim`, the KL of each latent group f32[B, G].
  """
  if model.top_down:
    if num_samples != 1:
      raise ValueError(f"a top-down model draws one posterior sample per example, not {num_samples}")
    t = model.apply(params, x, rng, method="terms")
    return {"log_lik": t["log_lik"], "kl": t["kl"], "obs": t["obs"], "kl_per_dim": t["kl_groups"]}
  rng, upper_rng = model.layer_keys(rng)
  mean, log_scale = model.apply(params, x, method="encode_bottom")
  z = distributions.sample_diag_gaussian(rng, mean, log_scale, num_samples)  # [L, B, K]
  obs = model.apply(params, z.reshape(-1, z.shape[-1]), method="decode_bottom")
  x_rep = jnp.broadcast_to(x, (num_samples,) + x.shape).reshape((-1,) + x.shape[1:])
  log_lik = distributions.log_likelihood(model.likelihood, x_rep, obs)
  log_lik = log_lik.reshape(num_samples, x.shape[0]).mean(axis=0)
  kl, kl_per_dim = model.apply(params, z, mean, log_scale, upper_rng, method="kl")
  return {"log_lik": log_lik, "kl": kl, "mean": mean, "log_scale": log_scale, "z": z,
          "obs": obs, "kl_per_dim": kl_per_dim}


def elbo(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int = 1) -> jax.Array:
  """ELBO per example: x f32[B, H, W, C] -> f32[B] nats."""
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  return t["log_lik"] - t["kl"]
