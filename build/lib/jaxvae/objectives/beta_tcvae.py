"""beta-TCVAE (Chen et al. 2018), `objective.kind="beta_tcvae"`:

    loss = -E[log p(x|z)] + alpha MI + beta TC + gamma DWKL

with the three terms of the KL's decomposition estimated by minibatch-weighted sampling over
the batch (`tc_decomposition`).
"""

import math

import jax
import jax.numpy as jnp

from jaxvae import distributions
from jaxvae.errors import ConfigError
from jaxvae.models import VAE
from jaxvae.elbo import elbo_terms
from jaxvae.objectives import base


def tc_decomposition(z: jax.Array, mean: jax.Array, log_scale: jax.Array,
                     dataset_size: int) -> dict[str, jax.Array]:
  """The KL split E[log q(z|x) - log p(z)] = MI + TC + DWKL (Chen et al. 2018), estimated
  with minibatch-weighted sampling (MWS) over the batch.

      log q(z_i)      ~ logsumexp_j log q(z_i|x_j)              - log(B N)
      log q_d(z_id)   ~ logsumexp_j log q(z_id|x_j)             - log(B N)
      MI   = mean_i log q(z_i|x_i) - log q(z_i)                 (index-code mutual information)
      TC   = mean_i log q(z_i) - sum_d log q_d(z_id)            (total correlation)
      DWKL = mean_i sum_d log q_d(z_id) - log p(z_id)           (dimension-wise KL)

  z: f32[L, B, K], draws z_i ~ q(z|x_i); mean, log_scale: f32[B, K]; `dataset_size` N.
  Returns `mi` and `tc` f32[], `dwkl` f32[K] per latent dim, nats, means over the L draws.
  The three sum to the Monte Carlo KL at the same draws. The log(B N) of MWS is a constant:
  against the batch's own aggregate posterior (log B) it adds log N to MI and (K - 1) log N
  to TC and takes K log N from DWKL, without changing a gradient.
  """
  log_norm = math.log(mean.shape[0] * dataset_size)
  # log q(z_i,d | x_j) for every pair: [L, B (i), B (j), K].
  log_q_pairs = distributions.diag_gaussian_log_prob_per_dim(z[:, :, None], mean, log_scale)
  log_q_z = jax.nn.logsumexp(log_q_pairs.sum(axis=-1), axis=2) - log_norm  # [L, B]
  log_q_dims = jax.nn.logsumexp(log_q_pairs, axis=2) - log_norm  # [L, B, K]
  log_q_z_x = distributions.diag_gaussian_log_prob(z, mean, log_scale)  # [L, B]
  log_p_dims = distributions.diag_gaussian_log_prob_per_dim(z, 0.0, 0.0)  # [L, B, K]
  return {"mi": jnp.mean(log_q_z_x - log_q_z),
          "tc": jnp.mean(log_q_z - log_q_dims.sum(axis=-1)),
          "dwkl": jnp.mean(log_q_dims - log_p_dims, axis=(0, 1))}


def tcvae_loss(params, rng: jax.Array, x: jax.Array, *, model: VAE, dataset_size: int,
               alpha: float | jax.Array, beta: float | jax.Array, gamma: float | jax.Array,
               num_samples: int = 1, free_bits: float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-E[log p(x|z)] + alpha MI + beta TC + gamma DWKL, mean over the batch, and metrics.

  The terms are `tc_decomposition`'s MWS estimates over the batch, from the draws that score
  log p(x|z). With free bits each dim's DWKL is floored in the loss where the batch's own
  aggregate posterior would put it at `free_bits` nats: MWS reads log N lower, so a floor on
  its raw value would hold every dim and take the DWKL's gradient away.
  Metrics: the plain ELBO (analytic KL) plus `mi_nats`, `tc_nats`, `dwkl_nats`, the MWS
  values (with their offsets: independent latents read TC = (K - 1) log N).
  """
  if dataset_size < x.shape[0]:
    raise ValueError(f"beta_tcvae's MWS estimator needs the dataset size N >= the batch "
                     f"({x.shape[0]}), got N={dataset_size}; lower config.batch_size")
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
  tc = tc_decomposition(t["z"], t["mean"], t["log_scale"], dataset_size)
  dwkl = tc["dwkl"].sum()
  dwkl_term = (jnp.maximum(tc["dwkl"], free_bits - math.log(dataset_size)).sum() if free_bits
               else dwkl)
  value = -log_lik + alpha * tc["mi"] + beta * tc["tc"] + gamma * dwkl_term
  return value, dict(base.elbo_metrics(value, log_lik, kl), mi_nats=tc["mi"], tc_nats=tc["tc"],
                     dwkl_nats=dwkl)


class BetaTCVAE(base.Objective):
  """Chen et al.'s beta-TCVAE; the TC weight after warm-up is reported as `beta`."""
  kind = "beta_tcvae"
  defaults = {
      "tc_alpha": 1.0,  # the weights of the index-code MI, the total correlation and the
      "tc_beta": 6.0,   #   dimension-wise KL
      "tc_gamma": 1.0,
  }

  @classmethod
  def check_keys(cls, o):
    base.check_nonnegative(o, "tc_alpha", "tc_beta", "tc_gamma")

  @classmethod
  def check(cls, config):
    base.check_one_layer(config, "objective.kind='beta_tcvae'")
    if config.batch_size < 2:
      raise ConfigError(f"config.batch_size={config.batch_size}: kind='beta_tcvae' estimates q(z) "
                        "from the other examples of the batch; use >= 2")

  def __init__(self, config, model, dataset_size=None):
    if not dataset_size:
      raise ValueError("objective.kind='beta_tcvae' needs the dataset size: objectives.make(..., "
                       "dataset_size=N)")
    super().__init__(config, model, dataset_size)

  def loss(self, params, rng, x, step):
    alpha, beta, gamma = (self.weight(w, step)
                          for w in (self.cfg.tc_alpha, self.cfg.tc_beta, self.cfg.tc_gamma))
    value, metrics = tcvae_loss(params, rng, x, model=self.model, dataset_size=self.dataset_size,
                                alpha=alpha, beta=beta, gamma=gamma,
                                num_samples=self.cfg.num_samples, free_bits=self.cfg.free_bits)
    return value, dict(metrics, beta=jnp.asarray(beta, jnp.float32))
