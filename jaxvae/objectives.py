"""The ELBO and the training objectives built on it.

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I))

Per example: the log-likelihood is summed over pixels and the KL over latent dims; the
expectation is the mean of `num_samples` reparameterized draws (the paper's 1/L sum).
Batch figures are means over examples. Everything is in nats.

`make_loss(config.objective, model)` builds the training loss (params, rng, x, step) ->
(value, metrics) of one `objective.kind`:

    elbo        -E[log p(x|z)] + beta(step) KL                                  (beta-VAE)
    capacity    -E[log p(x|z)] + gamma(step) |KL - C(step)|                     (Burgess 2018)
    beta_tcvae  -E[log p(x|z)] + alpha MI + beta TC + gamma DWKL, MWS estimates (Chen 2018)
    iwae        -(logsumexp_k log w_k - log k)                                  (Burda 2016)

KL warm-up (elbo, capacity, beta_tcvae) scales the KL weights by min(step / warmup_steps, 1);
free bits floor each latent dim's batch-mean KL at `free_bits` nats in the loss. Every
schedule is a traced function of the optimizer step, so it is exact across a resume.
Whatever the objective, the metrics report the plain ELBO (beta = 1, analytic KL).

A two-layer model (`models.HierarchicalVAE`, latents h1 next to x and h2 on top) has no
analytic KL: its KL is estimated from the draws (`elbo_terms`), and its log-weights draw h2
given each h1 (`log_weights`). beta, warm-up and capacity weight that estimate.
"""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxvae import distributions, models
from jaxvae.models import VAE

KINDS = ("elbo", "capacity", "beta_tcvae", "iwae")


def _layer_keys(rng: jax.Array, model: VAE) -> tuple[jax.Array, jax.Array | None]:
  """(key of the draws next to x, key of the upper layer's draws or None with one layer).
  A one-layer model draws from `rng` itself, as it always has."""
  if models.stochastic_layers(model) == 1:
    return rng, None
  bottom, upper = jax.random.split(rng)
  return bottom, upper


def upper_layer(params, rng: jax.Array, h1: jax.Array, *, model: VAE) -> dict[str, jax.Array]:
  """A two-layer model's terms above the middle latent, from one draw h2 ~ q(h2|h1) per h1.

  h1: f32[S, B, K1]. Returns f32[S, B] arrays, nats:
    log_p_h1   log p(h1|h2)
    log_ratio  log p(h2) - log q(h2|h1)
    kl_top     KL(q(h2|h1) || N(0, I)), analytic
  and `kl_top_per_dim` f32[S, B, K2]. log_p_h1 + log_ratio is the one-draw importance estimate
  of log p(h1) (its exp is unbiased for p(h1)), the log-prior that the log-weights use.
  """
  flat = h1.reshape(-1, h1.shape[-1])
  mean2, log_scale2 = model.apply(params, flat, method=models.HierarchicalVAE.encode_upper)
  h2 = distributions.sample_diag_gaussian(rng, mean2, log_scale2)[0]
  mean1, log_scale1 = model.apply(params, h2, method=models.HierarchicalVAE.decode_upper)
  per_dim = distributions.kl_per_dim(mean2, log_scale2)
  shape = h1.shape[:-1]
  return {"log_p_h1": distributions.diag_gaussian_log_prob(flat, mean1, log_scale1).reshape(shape),
          "log_ratio": (distributions.standard_normal_log_prob(h2)
                        - distributions.diag_gaussian_log_prob(h2, mean2, log_scale2)).reshape(shape),
          "kl_top": per_dim.sum(axis=-1).reshape(shape),
          "kl_top_per_dim": per_dim.reshape(shape + per_dim.shape[-1:])}


def elbo_terms(params, rng: jax.Array, x: jax.Array, *, model: VAE,
               num_samples: int = 1) -> dict[str, jax.Array]:
  """The two ELBO terms per example.

  x: f32[B, H, W, C] in [0, 1]. Returns f32[B] arrays `log_lik` (the Monte Carlo estimate of
  E_q[log p(x|z)] from `num_samples` draws) and `kl`, the posterior `mean` and `log_scale`
  f32[B, K] of the latent next to x, its draws `z` f32[L, B, K], the decoder output `obs` of
  the draws (each f32[L * B, ...]) and `kl_per_dim` f32[B, K_top].

  One stochastic layer: kl = KL(q(z|x) || N(0, I)), analytic, and kl_per_dim its terms. Two
  (`HierarchicalVAE`): kl is the draws' mean of log q(h1|x) - log p(h1|h2) + KL(q(h2|h1) ||
  N(0, I)), h2 ~ q(h2|h1) once per h1 draw, an unbiased estimate of KL(q(h1, h2|x) || p(h1, h2))
  that is analytic in its top layer; kl_per_dim holds that top layer's terms.
  """
  rng, upper_rng = _layer_keys(rng, model)
  mean, log_scale = model.apply(params, x, method=VAE.encode_bottom)
  z = distributions.sample_diag_gaussian(rng, mean, log_scale, num_samples)  # [L, B, K]
  obs = model.apply(params, z.reshape(-1, z.shape[-1]), method=VAE.decode_bottom)
  x_rep = jnp.broadcast_to(x, (num_samples,) + x.shape).reshape((-1,) + x.shape[1:])
  log_lik = distributions.log_likelihood(model.likelihood, x_rep, obs)
  log_lik = log_lik.reshape(num_samples, x.shape[0]).mean(axis=0)
  if upper_rng is None:
    kl = distributions.kl_standard_normal(mean, log_scale)
    kl_per_dim = distributions.kl_per_dim(mean, log_scale)
  else:
    up = upper_layer(params, upper_rng, z, model=model)
    log_q = distributions.diag_gaussian_log_prob(z, mean, log_scale)  # [L, B]
    kl = (log_q - up["log_p_h1"] + up["kl_top"]).mean(axis=0)
    kl_per_dim = up["kl_top_per_dim"].mean(axis=0)
  return {"log_lik": log_lik, "kl": kl, "mean": mean, "log_scale": log_scale, "z": z,
          "obs": obs, "kl_per_dim": kl_per_dim}


def elbo(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int = 1) -> jax.Array:
  """ELBO per example: x f32[B, H, W, C] -> f32[B] nats."""
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  return t["log_lik"] - t["kl"]


def _elbo_metrics(value: jax.Array, log_lik: jax.Array, kl: jax.Array) -> dict[str, jax.Array]:
  """The batch metrics every objective reports: its value and the plain ELBO, nats per example."""
  return {"loss": value, "elbo_nats": log_lik - kl, "log_lik_nats": log_lik, "kl_nats": kl}


def free_bits_kl(mean: jax.Array, log_scale: jax.Array, free_bits: float) -> jax.Array:
  """sum_k max(mean_b KL_bk, free_bits): the KL with each latent dim's batch mean floored.

  mean, log_scale: f32[B, K] -> f32[] nats. A dim below the floor gets no gradient (IAF's
  free bits, Kingma et al. 2016), so the prior cannot pull it all the way to collapse.
  """
  kl_dims = distributions.kl_per_dim(mean, log_scale).mean(axis=0)  # [K]
  return jnp.maximum(kl_dims, free_bits).sum()


def loss(params, rng: jax.Array, x: jax.Array, *, model: VAE, beta: float | jax.Array = 1.0,
         num_samples: int = 1, free_bits: float = 0.0
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training loss -(E[log p(x|z)] - beta * KL), mean over the batch, and batch metrics.

  With `free_bits` > 0 the KL in the loss is `free_bits_kl`. The metrics report the plain
  ELBO (beta = 1, the true KL) whatever beta and free_bits are, in nats per example.
  """
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
  kl_term = free_bits_kl(t["mean"], t["log_scale"], free_bits) if free_bits else kl
  value = -(log_lik - beta * kl_term)
  return value, _elbo_metrics(value, log_lik, kl)


def capacity_loss(params, rng: jax.Array, x: jax.Array, *, model: VAE,
                  capacity: float | jax.Array, gamma: float | jax.Array, num_samples: int = 1,
                  free_bits: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Controlled capacity (Burgess et al. 2018): -E[log p(x|z)] + gamma |KL - C|.

  KL is the per-example KL summed over latent dims, batch mean (`free_bits_kl` with free
  bits); `capacity` C in nats. The penalty pulls the KL towards C from either side, so C sets
  how much information the code carries. gamma pairs with a log-likelihood summed over the D
  pixels: were it averaged over pixels, the same run would need gamma / D.

  The paper's beta-VAE line E[log p(x|z)] - beta (KL - epsilon) is not this: taken
  literally epsilon is a constant with zero gradient, and that run is a plain beta-VAE.
  """
  t = elbo_terms(params, rng, x, model=model, num_samples=num_samples)
  log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
  kl_term = free_bits_kl(t["mean"], t["log_scale"], free_bits) if free_bits else kl
  value = -log_lik + gamma * jnp.abs(kl_term - capacity)
  return value, _elbo_metrics(value, log_lik, kl)


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
  """beta-TCVAE (Chen et al. 2018): -E[log p(x|z)] + alpha MI + beta TC + gamma DWKL.

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
  return value, dict(_elbo_metrics(value, log_lik, kl), mi_nats=tc["mi"], tc_nats=tc["tc"],
                     dwkl_nats=dwkl)


def log_weights(params, x: jax.Array, z: jax.Array, mean: jax.Array, log_scale: jax.Array, *,
                model: VAE, log_lik_fn: Callable[[jax.Array, dict], jax.Array] | None = None,
                upper_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Importance log-weights log w = log p(x|z) + log p(z) - log q(z|x) of draws z ~ q(z|x).

  x: f32[B, H, W, C]; z: f32[S, B, K]; mean, log_scale: f32[B, K], the posterior of x.
  `log_lik_fn(x, obs) -> f32[B]` scores the decoder output; the default is the model's own
  likelihood. With two stochastic layers z is h1, and log p(h1) is `upper_layer`'s
  log p(h1|h2) + log p(h2) - log q(h2|h1) from one h2 draw keyed by `upper_rng`, so log w is
  the two-layer weight log p(x, h1, h2) - log q(h1, h2|x). Returns (log_w, log_lik), f32[S, B]
  nats each.
  """
  if log_lik_fn is None:
    log_lik_fn = functools.partial(distributions.log_likelihood, model.likelihood)
  num_draws = z.shape[0]
  obs = model.apply(params, z.reshape(-1, z.shape[-1]), method=VAE.decode_bottom)
  x_rep = jnp.broadcast_to(x, (num_draws,) + x.shape).reshape((-1,) + x.shape[1:])
  log_lik = log_lik_fn(x_rep, obs).reshape(num_draws, x.shape[0])
  if models.stochastic_layers(model) == 1:
    log_prior = distributions.standard_normal_log_prob(z)
  else:
    up = upper_layer(params, upper_rng, z, model=model)
    log_prior = up["log_p_h1"] + up["log_ratio"]
  log_w = log_lik + log_prior - distributions.diag_gaussian_log_prob(z, mean, log_scale)
  return log_w, log_lik


def iwae_loss(params, rng: jax.Array, x: jax.Array, *, model: VAE, num_samples: int
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IWAE training loss (Burda et al. 2016) with k = `num_samples` draws from q(z|x):

      loss = -mean_b(logsumexp_k log w_k - log k)   (see `log_weights`)

  x: f32[B, H, W, C]. k = 1 is the single-sample ELBO with a Monte Carlo KL. Metrics:
  `iwae_nats` (the bound) and the plain ELBO from the same k draws, with the analytic KL for
  one stochastic layer and the Monte Carlo KL of the log-weights for two.
  """
  rng, upper_rng = _layer_keys(rng, model)
  mean, log_scale = model.apply(params, x, method=VAE.encode_bottom)
  z = distributions.sample_diag_gaussian(rng, mean, log_scale, num_samples)  # [k, B, K]
  log_w, log_lik = log_weights(params, x, z, mean, log_scale, model=model, upper_rng=upper_rng)
  iwae = (jax.nn.logsumexp(log_w, axis=0) - math.log(num_samples)).mean()
  value = -iwae
  if upper_rng is None:
    kl = distributions.kl_standard_normal(mean, log_scale).mean()
  else:
    kl = (log_lik - log_w).mean()
  return value, dict(_elbo_metrics(value, log_lik.mean(), kl), iwae_nats=iwae)


# ----------------------------------------------------------------------------- schedules
# Functions of the traced optimizer step (`TrainState.step`: steps taken before this one,
# skipped ones included), never Python numbers fixed at trace time: a resumed run, or one
# whose step is already past a schedule's end, takes the values the step says.


def warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
  """KL warm-up (Sonderby et al. 2016): min(step / warmup_steps, 1), the share of its target
  a KL weight has at `step` (0 at the first step). f32[]."""
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def capacity_schedule(step: jax.Array, start: float, stop: float, steps: int) -> jax.Array:
  """C(step) = start + (stop - start) min(step / steps, 1): nats, f32[]."""
  return start + (stop - start) * jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)


def make_loss(cfg, model: VAE, dataset_size: int | None = None
              ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """The training loss of `cfg` (config.objective): loss_fn(params, rng, x, step) ->
  (value f32[], metrics of f32[]), x f32[B, H, W, C], step int32[] the optimizer step.

  Metrics: `loss`, the plain ELBO (`elbo_nats`, `log_lik_nats`, `kl_nats`), the KL weight at
  this step as `beta` (elbo: beta; capacity: gamma; beta_tcvae: tc_beta; all after warm-up),
  `capacity_nats` C(step) for capacity, `mi_nats`, `tc_nats`, `dwkl_nats` for beta_tcvae and
  `iwae_nats` for iwae. `dataset_size` N, the training examples, is needed by beta_tcvae.
  """
  kind, num_samples, free_bits, warmup_steps = (cfg.kind, cfg.num_samples, cfg.free_bits,
                                                 cfg.warmup_steps)
  if models.stochastic_layers(model) > 1 and (kind == "beta_tcvae" or free_bits):
    raise ValueError("beta_tcvae and free bits read one Gaussian posterior per latent dim, and a "
                     "two-layer model has none over its top code; use kind='elbo', 'capacity' "
                     "or 'iwae' without free bits")

  def weight(target: float, step: jax.Array) -> float | jax.Array:
    # Without warm-up the weight stays a Python number: the default loss is today's, bit for bit.
    return target * warmup(step, warmup_steps) if warmup_steps else target

  if kind == "elbo":
    beta_target = cfg.beta

    def loss_fn(params, rng, x, step):
      beta = weight(beta_target, step)
      value, metrics = loss(params, rng, x, model=model, beta=beta, num_samples=num_samples,
                            free_bits=free_bits)
      return value, dict(metrics, beta=jnp.asarray(beta, jnp.float32))
  elif kind == "capacity":
    gamma_target = cfg.capacity_gamma
    ramp = (cfg.capacity_start, cfg.capacity_max, cfg.capacity_steps)

    def loss_fn(params, rng, x, step):
      gamma = weight(gamma_target, step)
      capacity = capacity_schedule(step, *ramp)
      value, metrics = capacity_loss(params, rng, x, model=model, capacity=capacity,
                                     gamma=gamma, num_samples=num_samples, free_bits=free_bits)
      return value, dict(metrics, beta=jnp.asarray(gamma, jnp.float32), capacity_nats=capacity)
  elif kind == "beta_tcvae":
    if not dataset_size:
      raise ValueError("objective.kind='beta_tcvae' needs the dataset size: make_loss(..., "
                       "dataset_size=N)")
    targets = (cfg.tc_alpha, cfg.tc_beta, cfg.tc_gamma)

    def loss_fn(params, rng, x, step):
      alpha, beta, gamma = (weight(w, step) for w in targets)
      value, metrics = tcvae_loss(params, rng, x, model=model, dataset_size=dataset_size,
                                  alpha=alpha, beta=beta, gamma=gamma, num_samples=num_samples,
                                  free_bits=free_bits)
      return value, dict(metrics, beta=jnp.asarray(beta, jnp.float32))
  elif kind == "iwae":
    if warmup_steps or free_bits:
      raise ValueError("objective.kind='iwae' has no KL term to warm up or floor")

    def loss_fn(params, rng, x, step):
      del step  # no schedule
      return iwae_loss(params, rng, x, model=model, num_samples=num_samples)
  else:
    raise ValueError(f"unknown objective.kind {kind!r}; choose one of {KINDS}")
  return loss_fn


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
  chunk = min(chunk_size or num_samples, num_samples)
  num_chunks = -(-num_samples // chunk)
  mean, log_scale = model.apply(params, x, method=VAE.encode_bottom)

  def body(carry, i):
    lse, total = carry
    key, upper_rng = _layer_keys(jax.random.fold_in(rng, i), model)
    z = distributions.sample_diag_gaussian(key, mean, log_scale, chunk)
    log_w, _ = log_weights(params, x, z, mean, log_scale, model=model, log_lik_fn=log_lik_fn,
                           upper_rng=upper_rng)  # [chunk, B]
    # The last chunk may overrun K; its extra draws count for nothing.
    real = (i * chunk + jnp.arange(chunk) < num_samples)[:, None]
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(jnp.where(real, log_w, -jnp.inf), axis=0))
    return (lse, total + jnp.where(real, log_w, 0.0).sum(axis=0)), None

  init = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32))
  (lse, total), _ = jax.lax.scan(body, init, jnp.arange(num_chunks), unroll=unroll)
  return {"iwae": lse - math.log(num_samples), "elbo": total / num_samples}
