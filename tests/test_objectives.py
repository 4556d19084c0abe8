"""The ELBO against an exactly solvable model, its reductions, the training objectives and
the models' shapes."""

import functools
import math
import re
import signal

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from configs import cifar10
from jaxvae import distributions, experiment, models, objectives, train
from jaxvae import elbo as elbo_lib
from jaxvae.objectives import beta_tcvae, beta_vae
from jaxvae.objectives import iwae as iwae_lib
from jaxvae import config as config_lib
from jaxvae import restore
from jaxvae.config import base_config
from tests.conftest import tiny_digits_config
from tests.test_resume import _rows, _untimed

# ----------------------------------------------------------------------------- PPCA
# z ~ N(0, I_K), x | z ~ N(W z + b, s^2 I_D). With orthogonal columns of W the exact
# posterior is diagonal: N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I.
D_SHAPE, K, S = (2, 2, 1), 2, 0.5


class LinearEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    mean = nn.Dense(K, name="mean")(x.reshape(x.shape[0], -1))
    raw = self.param("raw_log_scale", nn.initializers.zeros, (K,))
    return mean, jnp.broadcast_to(raw, mean.shape)


class LinearDecoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    return nn.Dense(int(np.prod(D_SHAPE)))(z).reshape((z.shape[0],) + D_SHAPE)


def _ppca():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(4, K)))
  c = np.array([2.0, 0.7])
  w, b = q * c, rng.normal(size=4)
  model = models.VAE(LinearEncoder(), LinearDecoder(), D_SHAPE, "gaussian", "fixed", S,
                     log_scale_bound=7.0, decoder_mean="identity")
  m_diag = c ** 2 + S ** 2
  a = (w / m_diag).T  # M^-1 W^T, [K, D]
  post_log_scale = 0.5 * np.log(S ** 2 / m_diag)
  return model, w, b, a, post_log_scale


def _params(w, b, enc_kernel, enc_bias, log_scale):
  raw = 7.0 * np.arctanh(log_scale / 7.0)  # undo the soft clamp
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return {"params": {
      "encoder": {"mean": {"kernel": f32(enc_kernel), "bias": f32(enc_bias)},
                  "raw_log_scale": f32(raw)},
      "decoder": {"Dense_0": {"kernel": f32(w.T), "bias": f32(b)}}}}


def _elbo_samples(model, params, x, n=40_000):
  """n independent one-sample ELBO estimates for the single image x (n copies in a batch)."""
  batch = jnp.broadcast_to(jnp.asarray(x, jnp.float32).reshape((1,) + D_SHAPE), (n,) + D_SHAPE)
  elbo = jax.jit(elbo_lib.elbo, static_argnames=("model",))
  return np.asarray(elbo(params, jax.random.key(7), batch, model=model), np.float64)


def test_elbo_equals_log_evidence_at_exact_posterior_and_is_below_elsewhere():
  model, w, b, a, post_ls = _ppca()
  x = np.array([0.3, -1.2, 2.0, 0.5])
  log_px = stats.multivariate_normal.logpdf(x, b, w @ w.T + S ** 2 * np.eye(4))

  exact = _params(w, b, a.T, -a @ b, post_ls)
  e = _elbo_samples(model, exact, x)
  stderr = e.std() / np.sqrt(len(e))
  assert abs(e.mean() - log_px) < 5 * stderr + 1e-3, (e.mean(), log_px, stderr)

  # A worse q: shifted mean and wrong scales. Exact ELBO = log p(x) - KL(q || posterior).
  post_mean, post_s = a @ (x - b), np.exp(post_ls)
  q_shift, q_ls = np.array([0.4, -0.3]), post_ls + np.array([0.5, -0.4])
  off = _params(w, b, a.T, -a @ b + q_shift, q_ls)
  e_off = _elbo_samples(model, off, x)
  q_s = np.exp(q_ls)
  kl_gap = np.sum(np.log(post_s / q_s) + (q_s ** 2 + q_shift ** 2) / (2 * post_s ** 2) - 0.5)
  assert kl_gap > 0.1
  stderr = e_off.std() / np.sqrt(len(e_off))
  assert abs(e_off.mean() - (log_px - kl_gap)) < 5 * stderr + 1e-3
  assert e_off.mean() < log_px - 0.05
  del post_mean


# ----------------------------------------------------------------------------- reductions


def _small_model(likelihood="gaussian"):
  cfg = base_config().model
  cfg.hidden, cfg.latent_dim, cfg.likelihood = (16,), 3, likelihood
  model = models.make_model(cfg, (4, 4, 3))
  return model, models.init_params(model, jax.random.key(0), (4, 4, 3))


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "discretized_logistic"])
def test_loss_per_example_is_independent_of_batch_size(likelihood):
  model, params = _small_model(likelihood)
  x = jax.random.uniform(jax.random.key(1), (1, 4, 4, 3))
  if likelihood == "bernoulli":
    x = jnp.round(x)
  if likelihood == "discretized_logistic":
    x = jnp.round(x * 255) / 255
  # 64 copies with one draw each use the same normals as one copy with 64 draws, so a
  # mean-over-batch reduction gives identical losses; a sum would be 64 times larger.
  loss = jax.jit(beta_vae.beta_elbo_loss, static_argnames=("model", "num_samples"))
  batch_loss, m_batch = loss(params, jax.random.key(2), jnp.repeat(x, 64, 0), model=model)
  single_loss, m_single = loss(params, jax.random.key(2), x, model=model, num_samples=64)
  np.testing.assert_allclose(batch_loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(m_batch["kl_nats"], m_single["kl_nats"], rtol=1e-5)
  assert float(m_batch["elbo_nats"]) == pytest.approx(-float(batch_loss), rel=1e-6)


def test_beta_weights_only_the_kl_and_reported_elbo_ignores_it():
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  loss = jax.jit(beta_vae.beta_elbo_loss, static_argnames=("model",))
  l1, m1 = loss(params, jax.random.key(2), x, model=model, beta=1.0)
  l4, m4 = loss(params, jax.random.key(2), x, model=model, beta=4.0)
  np.testing.assert_allclose(l4 - l1, 3.0 * m1["kl_nats"], rtol=1e-5)
  np.testing.assert_allclose(m4["elbo_nats"], m1["elbo_nats"], rtol=1e-6)


# ----------------------------------------------------------------------------- objectives


def _objective(**overrides):
  cfg = base_config().objective
  cfg.update(overrides)
  return cfg


def make_loss(cfg, model, dataset_size=None):
  """The "vae" group's loss (params, rng, x, step) -> (value, metrics) of objective `cfg`."""
  config = base_config()
  config.objective = cfg
  return objectives.make(config, model, dataset_size).loss


def test_default_objective_is_todays_loss_bit_for_bit_plus_its_beta():
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  loss_fn = jax.jit(make_loss(_objective(beta=4.0), model))
  value, metrics = loss_fn(params, jax.random.key(2), x, jnp.int32(5))
  loss = jax.jit(beta_vae.beta_elbo_loss, static_argnames=("model",))
  want, want_metrics = loss(params, jax.random.key(2), x, model=model, beta=4.0)
  assert np.asarray(value).tobytes() == np.asarray(want).tobytes()
  assert {k: float(v) for k, v in metrics.items()} == dict(
      {k: float(v) for k, v in want_metrics.items()}, beta=4.0)


@pytest.mark.parametrize("overrides", [
    dict(kind="elbo", beta=4.0, warmup_steps=60),
    dict(kind="capacity", capacity_start=1.0, capacity_max=9.0, capacity_steps=80,
         capacity_gamma=30.0, warmup_steps=60),
])
def test_schedules_are_traced_functions_of_the_step(overrides):
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  cfg = _objective(**overrides)
  loss_fn = jax.jit(make_loss(cfg, model))
  for step in (0, 1, 7, 30, 59, 60, 79, 80, 1000, 123_456):
    value, m = loss_fn(params, jax.random.key(2), x, jnp.int32(step))
    ramp = min(step / 60, 1.0)
    if cfg.kind == "elbo":
      assert float(m["beta"]) == pytest.approx(4.0 * ramp, rel=1e-6)
      want = -(m["log_lik_nats"] - m["beta"] * m["kl_nats"])
    else:
      capacity = 1.0 + 8.0 * min(step / 80, 1.0)
      assert float(m["beta"]) == pytest.approx(30.0 * ramp, rel=1e-6)
      assert float(m["capacity_nats"]) == pytest.approx(capacity, rel=1e-6)
      want = -m["log_lik_nats"] + m["beta"] * abs(m["kl_nats"] - capacity)
    assert float(value) == pytest.approx(float(want), rel=1e-5)
  assert loss_fn._cache_size() == 1  # one trace: the step is an argument, not a constant


def test_free_bits_floor_each_dims_batch_mean_kl_and_report_the_true_kl():
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  mean, log_scale = model.apply(params, x, method=models.VAE.encode)
  kl_dims = np.asarray(distributions.kl_per_dim(mean, log_scale).mean(0))
  floor = float(np.median(kl_dims))  # some dims below, some above
  assert (kl_dims < floor).any() and (kl_dims > floor).any()
  loss = jax.jit(functools.partial(beta_vae.beta_elbo_loss, rng=jax.random.key(2), x=x, model=model),
                 static_argnames=("beta", "free_bits"))
  value, m = loss(params, free_bits=floor)
  _, plain = loss(params)
  assert float(m["kl_nats"]) == pytest.approx(float(plain["kl_nats"]), rel=1e-6)
  want = -float(m["log_lik_nats"]) + np.maximum(kl_dims, floor).sum()
  assert float(value) == pytest.approx(want, rel=1e-5)
  # Above every dim's KL the floor is a constant: only the likelihood has a gradient.
  grad = lambda **kw: jax.jit(jax.grad(lambda p: loss(p, **kw)[0]))(params)
  for g, want_g in zip(jax.tree.leaves(grad(free_bits=10 * kl_dims.max())),
                       jax.tree.leaves(grad(beta=0.0))):
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)


_tc_decomposition = jax.jit(beta_tcvae.tc_decomposition, static_argnums=3)


def _mws_reference(z, mean, log_scale, n):
  """log q(z) and sum_d log q(z_d) by the reference beta-TCVAE's MWS formula, in float64 loops."""
  z, mean, s = (np.asarray(a, np.float64) for a in (z, mean, np.exp(log_scale)))
  num_draws, b, _ = z.shape
  log_qz, log_prod = np.zeros((num_draws, b)), np.zeros((num_draws, b))
  for l in range(num_draws):
    for i in range(b):
      pairs = stats.norm.logpdf(z[l, i], mean, s)  # [B (j), K]
      log_qz[l, i] = logsumexp(pairs.sum(-1)) - math.log(b * n)
      log_prod[l, i] = (logsumexp(pairs, axis=0) - math.log(b * n)).sum()
  return log_qz, log_prod


def test_tc_decomposition_follows_the_mws_formula_and_sums_to_the_monte_carlo_kl():
  key_m, key_s, key_z = jax.random.split(jax.random.key(0), 3)
  mean = jax.random.normal(key_m, (16, 3))
  log_scale = 0.3 * jax.random.normal(key_s, (16, 3)) - 0.5
  z = mean + jnp.exp(log_scale) * jax.random.normal(key_z, (2, 16, 3))
  n = 1000
  tc = _tc_decomposition(z, mean, log_scale, n)
  log_qz, log_prod = _mws_reference(z, mean, log_scale, n)
  log_qz_x = stats.norm.logpdf(np.asarray(z, np.float64), mean, np.exp(log_scale)).sum(-1)
  log_pz = stats.norm.logpdf(np.asarray(z, np.float64)).sum(-1)
  np.testing.assert_allclose(float(tc["mi"]), (log_qz_x - log_qz).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(tc["tc"]), (log_qz - log_prod).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(tc["dwkl"].sum()), (log_prod - log_pz).mean(), rtol=1e-5)
  # MI + TC + DWKL telescopes to E[log q(z|x) - log p(z)] at the same draws.
  total = float(tc["mi"] + tc["tc"] + tc["dwkl"].sum())
  assert total == pytest.approx((log_qz_x - log_pz).mean(), rel=1e-5)


def test_tc_decomposition_of_independent_factorized_posteriors():
  # MWS's log(B N) puts constant offsets on the terms (see tc_decomposition); their truth
  # is the estimate less these.
  n, k = 1000, 2
  offset = {"mi": math.log(n), "tc": (k - 1) * math.log(n), "dwkl": -math.log(n)}  # dwkl: per dim
  # One posterior for every example: x says nothing about z, and z's dims are independent,
  # so MI = TC = 0 and MWS reads exactly its offsets.
  mean, log_scale = jnp.full((64, k), 0.3), jnp.full((64, k), -0.7)
  z = mean + jnp.exp(log_scale) * jax.random.normal(jax.random.key(0), (3, 64, k))
  tc = _tc_decomposition(z, mean, log_scale, n)
  assert float(tc["mi"]) == pytest.approx(offset["mi"], rel=1e-5)
  assert float(tc["tc"]) == pytest.approx(offset["tc"], rel=1e-5)
  # Posteriors N(m_i, 0.5^2 I) of n examples with means m_i ~ N(0, I): the aggregate is
  # N(0, 1.25 I), so TC = 0, MI = k/2 log 5, DWKL = (0.25 - log 1.25) / 2 per dim. With each
  # mean repeated in both dims the aggregate has correlation 0.8: TC = -log(1 - 0.64) / 2 and
  # MI = log(9) / 2. With the whole data set in the batch the estimates come close.
  rng = np.random.default_rng(0)
  dwkl = 0.5 * (0.25 - math.log(1.25))
  for means, want in ((rng.normal(size=(n, k)), {"mi": k / 2 * math.log(5), "tc": 0.0}),
                      (np.repeat(rng.normal(size=(n, 1)), k, 1),
                       {"mi": math.log(9) / 2, "tc": -0.5 * math.log(1 - 0.64)})):
    mean = jnp.asarray(means, jnp.float32)
    z = mean + 0.5 * jax.random.normal(jax.random.key(1), (4, n, k))
    tc = _tc_decomposition(z, mean, jnp.full((n, k), math.log(0.5)), n)
    assert float(tc["mi"]) - offset["mi"] == pytest.approx(want["mi"], abs=0.05)
    assert float(tc["tc"]) - offset["tc"] == pytest.approx(want["tc"], abs=0.03)
    np.testing.assert_allclose(np.asarray(tc["dwkl"]) - offset["dwkl"], dwkl, atol=0.01)


def test_tcvae_loss_weighs_its_three_terms():
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  cfg = _objective(kind="beta_tcvae", tc_alpha=2.0, tc_beta=6.0, tc_gamma=0.5)
  value, m = jax.jit(make_loss(cfg, model, dataset_size=100))(
      params, jax.random.key(2), x, jnp.int32(0))
  want = -m["log_lik_nats"] + 2.0 * m["mi_nats"] + 6.0 * m["tc_nats"] + 0.5 * m["dwkl_nats"]
  assert float(value) == pytest.approx(float(want), rel=1e-5)
  assert float(m["beta"]) == 6.0
  assert float(m["elbo_nats"]) == pytest.approx(float(m["log_lik_nats"] - m["kl_nats"]), rel=1e-6)
  # Free bits above every dim's DWKL leave it a constant: MWS's raw values sit log N lower.
  floored = _objective(kind="beta_tcvae", tc_alpha=2.0, tc_beta=6.0, tc_gamma=0.5, free_bits=30.0)
  no_dwkl = _objective(kind="beta_tcvae", tc_alpha=2.0, tc_beta=6.0, tc_gamma=0.0)
  (value, m), grads = jax.jit(jax.value_and_grad(make_loss(floored, model, 100),
                                                 has_aux=True))(params, jax.random.key(2), x, 0)
  k = 3  # latent dims of _small_model
  want = (-m["log_lik_nats"] + 2.0 * m["mi_nats"] + 6.0 * m["tc_nats"]
          + 0.5 * k * (30.0 - math.log(100)))
  assert float(value) == pytest.approx(float(want), rel=1e-5)
  want_grads = jax.jit(jax.grad(lambda p: make_loss(no_dwkl, model, 100)(
      p, jax.random.key(2), x, 0)[0]))(params)
  for g, want_g in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="dataset size"):
    make_loss(cfg, model)
  with pytest.raises(ValueError, match="N >= the batch"):
    make_loss(cfg, model, dataset_size=4)(params, jax.random.key(2), x, 0)


def _iwae_by_hand(params, x, eps):
  """The IWAE loss of the PPCA model (linear encoder and decoder) and its gradient, written
  out in float64: x f64[B, D], eps f64[k, B, K] the standard normal draws."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]
  enc_w, enc_b = p["encoder"]["mean"]["kernel"], p["encoder"]["mean"]["bias"]
  raw = p["encoder"]["raw_log_scale"]
  dec_w, dec_b = p["decoder"]["Dense_0"]["kernel"], p["decoder"]["Dense_0"]["bias"]
  log_sigma = 7.0 * np.tanh(raw / 7.0)
  mean = x @ enc_w + enc_b
  z = mean + np.exp(log_sigma) * eps
  resid = x - (z @ dec_w + dec_b)  # [k, B, D]
  half_log_2pi = 0.5 * np.log(2 * np.pi)
  log_w = ((-0.5 * resid ** 2 / S ** 2 - np.log(S) - half_log_2pi).sum(-1)
           + (-0.5 * z ** 2 - half_log_2pi).sum(-1)
           - (-0.5 * eps ** 2 - log_sigma - half_log_2pi).sum(-1))  # [k, B]
  k, b = log_w.shape
  value = -np.mean(logsumexp(log_w, axis=0) - np.log(k))
  # d loss = -1/B sum_b sum_k softmax_k(log w) d log w_k; z = mean + sigma eps.
  c = -np.exp(log_w - logsumexp(log_w, axis=0)) / b  # [k, B]
  g_z = resid @ dec_w.T / S ** 2 - z  # d log w / dz
  g_log_sigma = (c[..., None] * (g_z * np.exp(log_sigma) * eps + 1.0)).sum((0, 1))
  grads = {"encoder": {"mean": {"kernel": np.einsum("kb,bd,kbj->dj", c, x, g_z),
                                "bias": np.einsum("kb,kbj->j", c, g_z)},
                       "raw_log_scale": g_log_sigma * (1.0 - np.tanh(raw / 7.0) ** 2)},
           "decoder": {"Dense_0": {"kernel": np.einsum("kb,kbj,kbd->jd", c, z, resid) / S ** 2,
                                   "bias": np.einsum("kb,kbd->d", c, resid) / S ** 2}}}
  return value, {"params": grads}


def test_iwae_loss_and_gradient_match_a_hand_computation():
  model, w, b, a, post_ls = _ppca()
  rng = np.random.default_rng(1)
  params = _params(w * 0.8, b, a.T + 0.1, rng.normal(size=K) * 0.2, post_ls + [0.3, -0.2])
  x = rng.normal(size=(3, 4))
  k, key = 5, jax.random.key(3)
  eps = np.asarray(jax.random.normal(key, (k, 3, K)), np.float64)  # sample_diag_gaussian's draws
  loss = lambda p: iwae_lib.iwae_loss(p, key, jnp.asarray(x.reshape((3,) + D_SHAPE), jnp.float32),
                                        model=model, num_samples=k)
  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  want, want_grads = _iwae_by_hand(params, x, eps)
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert float(metrics["iwae_nats"]) == pytest.approx(-want, rel=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for (path, g), want_g in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, want_g, rtol=2e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_one_sample_iwae_is_the_elbo_with_a_monte_carlo_kl():
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  key = jax.random.key(2)

  def mc_elbo_loss(p):
    t = elbo_lib.elbo_terms(p, key, x, model=model)
    mc_kl = (distributions.diag_gaussian_log_prob(t["z"][0], t["mean"], t["log_scale"])
             - distributions.standard_normal_log_prob(t["z"][0]))
    return -jnp.mean(t["log_lik"] - mc_kl)

  iwae = lambda p: iwae_lib.iwae_loss(p, key, x, model=model, num_samples=1)[0]
  (value, grads), (want_value, want_grads) = (jax.jit(jax.value_and_grad(f))(params)
                                              for f in (iwae, mc_elbo_loss))
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    (dict(kind="capacity", capacity_start=5.0, capacity_max=2.0), "objective.capacity_max=2.0"),
    (dict(kind="capacity", capacity_steps=0), "objective.capacity_steps=0"),
    (dict(kind="capacity", capacity_gamma=0.0), "objective.capacity_gamma=0.0"),
    (dict(kind="capacity", beta=4.0),
     "objective.beta=4.0 weights the KL of kind='elbo' and 'beta_vae_dae' only"),
    (dict(free_bits=-0.5), "objective.free_bits=-0.5"),
    (dict(warmup_steps=-1), "objective.warmup_steps=-1"),
    (dict(kind="iwae", num_samples=1), "num_samples=1 with kind='iwae' is the single-sample ELBO"),
    (dict(kind="iwae", num_samples=5, warmup_steps=100), "objective.warmup_steps=100"),
    (dict(kind="iwae", num_samples=5, free_bits=0.5), "objective.free_bits=0.5"),
    (dict(kind="vae"), "objective.kind='vae' is not allowed"),
])
def test_bad_objective_configs_are_refused_naming_the_key(overrides, message):
  config = tiny_digits_config()
  config.objective.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)
  config = tiny_digits_config()
  config.objective.kind, config.batch_size = "beta_tcvae", 1
  with pytest.raises(config_lib.ConfigError, match="config.batch_size=1"):
    config_lib.validate(config)


@pytest.mark.parametrize("kind,extra", [
    ("elbo", ("beta",)), ("capacity", ("beta", "capacity_nats")),
    ("beta_tcvae", ("beta", "mi_nats", "tc_nats", "dwkl_nats")), ("iwae", ("iwae_nats",))])
def test_every_objective_trains_and_sums_its_metrics(kind, extra):
  config = tiny_digits_config()
  config.objective.kind, config.objective.num_samples = kind, 1 + (kind == "iwae")
  config_lib.validate(config)
  exp = experiment.build(config, (8, 8, 1), dataset_size=1500)
  state = exp.init_state(jax.random.key(0))
  step = jax.jit(exp.train_step())
  x = jax.random.randint(jax.random.key(1), (32, 8, 8, 1), 0, 256).astype(jnp.uint8)
  after, metrics = step(state, x, jax.random.key(2))
  elbo_keys = ("loss", "elbo_nats", "log_lik_nats", "kl_nats")
  assert set(metrics) == {*elbo_keys, *extra, "skipped", "skips"}
  assert not bool(metrics["skipped"]) and int(after.step) == 1
  assert all(np.isfinite(float(metrics[k])) for k in (*elbo_keys, *extra))


def test_capacity_with_warmup_stopped_midway_resumes_bit_for_bit(tmp_path, monkeypatch):
  """A run stopped by SIGTERM mid-warm-up and resumed equals one that never stopped."""
  config = tiny_digits_config(num_epochs=1)
  config.log.chunks_per_epoch = 12  # 46 steps in chunks of 4
  config.objective.kind, config.objective.warmup_steps = "capacity", 30
  config.objective.capacity_max, config.objective.capacity_steps = 5.0, 40
  config.objective.capacity_gamma = 30.0
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(config, reference)

  stopped = str(tmp_path / "stopped")
  read_chunk, reads = train._read_chunk, []

  def read_and_signal(*args):
    reads.append(1)
    if len(reads) == 1:  # once: a second signal would act at once
      signal.raise_signal(signal.SIGTERM)  # the run stops a few chunks on, at a boundary
    return read_chunk(*args)

  monkeypatch.setattr(train, "_read_chunk", read_and_signal)
  assert train.train_and_evaluate(config, stopped).stopped_by == "SIGTERM"
  monkeypatch.setattr(train, "_read_chunk", read_chunk)
  at = int(restore.restore_run(stopped).state.step)
  assert 0 < at < 30  # inside the warm-up and the capacity ramp
  train.train_and_evaluate(config, stopped)

  got, want = restore.restore_run(stopped), restore.restore_run(reference)
  for a, b in zip(jax.tree.leaves(got.state), jax.tree.leaves(want.state)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  rows = _untimed(_rows(stopped))
  assert rows == _untimed(_rows(reference)) and len(rows) == 1
  # The epoch's mean schedule values: steps 0..45 of the two ramps.
  steps = np.arange(46)
  assert rows[0]["train/beta"] == pytest.approx(np.mean(30.0 * np.minimum(steps / 30, 1)), rel=1e-5)
  assert rows[0]["train/capacity_nats"] == pytest.approx(np.mean(5.0 * np.minimum(steps / 40, 1)),
                                                         rel=1e-5)


# ----------------------------------------------------------------------------- models


def test_paper_model_has_table1_parameter_count():
  config = cifar10.get_config()
  model = models.make_model(config.model, (32, 32, 3))
  params = models.init_params(model, jax.random.key(0), (32, 32, 3))
  assert models.count_params(params) == 3_543_552
  sizes = {"/".join(str(getattr(p, "key", p)) for p in path): leaf.size
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  # Table 1, layer by layer (kernel + bias).
  assert sizes["params/encoder/Dense_0/kernel"] + sizes["params/encoder/Dense_0/bias"] == 1_573_376
  assert sizes["params/encoder/mean/kernel"] + sizes["params/encoder/mean/bias"] == 131_328
  assert sizes["params/encoder/log_scale/kernel"] + sizes["params/encoder/log_scale/bias"] == 131_328
  assert sizes["params/decoder/Dense_0/kernel"] + sizes["params/decoder/Dense_0/bias"] == 131_584
  assert sizes["params/decoder/Dense_1/kernel"] + sizes["params/decoder/Dense_1/bias"] == 1_575_936


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_compiled_init_draws_the_same_bits_as_op_by_op_init(arch):
  cfg = base_config().model
  cfg.arch, cfg.hidden, cfg.latent_dim, cfg.conv_channels = arch, (16,), 3, (4,)
  model = models.make_model(cfg, (8, 8, 1))
  compiled = models.init_params(model, jax.random.key(5), (8, 8, 1))
  eager = model.init(jax.random.key(5), jnp.zeros((1, 8, 8, 1)))
  assert jax.tree.structure(compiled) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("shape,likelihood", [((8, 8, 1), "gaussian"), ((7, 7, 1), "gaussian"),
                                              ((32, 32, 3), "discretized_logistic"),
                                              ((13, 20, 2), "gaussian")])
def test_conv_model_reconstructs_any_image_shape(shape, likelihood):
  cfg = base_config().model
  cfg.arch, cfg.hidden, cfg.conv_channels, cfg.latent_dim = "conv", (32,), (8, 16), 5
  cfg.likelihood = likelihood
  model = models.make_model(cfg, shape)

  def encode_decode(x):
    params = models.init_params(model, jax.random.key(0), shape)
    mean, log_scale = model.apply(params, x, method=models.VAE.encode)
    return mean, log_scale, model.apply(params, mean, method=models.VAE.decode)

  # Shapes only: tracing checks every layer's shapes without compiling the program.
  mean, log_scale, obs = jax.eval_shape(encode_decode, jnp.zeros((3,) + shape))
  assert mean.shape == log_scale.shape == (3, 5)
  assert obs["mean"].shape == (3,) + shape
  assert jnp.broadcast_shapes(obs["log_scale"].shape, (3,) + shape) == (3,) + shape


def test_nearest_upsample_is_half_pixel_nearest_resize_without_a_gather():
  rng = np.random.default_rng(0)

  @functools.partial(jax.jit, static_argnums=2)
  def upsample_and_vjp(x, g, size):
    up, vjp = jax.vjp(lambda x: models.nearest_upsample(x, size, axis=1), x)
    return up, vjp(g)[0]

  for m in (1, 2, 3, 4, 7, 8):
    for size in sorted({m, m + 1, 2 * m - 1, 2 * m} - {0}):
      x, g = (rng.normal(size=s).astype(np.float32) for s in ((2, m, 3, 4), (2, size, 3, 4)))
      src = (2 * np.arange(size) + 1) * m // (2 * size)  # floor((i + 1/2) m / size)
      up, grad = upsample_and_vjp(x, g, size)
      np.testing.assert_array_equal(up, x[:, src])
      grad_ref = np.zeros_like(x)
      np.add.at(grad_ref, (slice(None), src), g)  # at most two terms: exact in any order
      np.testing.assert_array_equal(grad, grad_ref)
      # resize's float32 formula may round an exact tie either way; elsewhere they agree.
      if all((2 * i + 1) * m % (2 * size) for i in range(size)):
        np.testing.assert_array_equal(up, jax.image.resize(x, g.shape, "nearest"))
  hlo = jax.jit(jax.grad(lambda x: models.nearest_upsample(x, 7, axis=1).sum())).lower(
      jnp.ones((2, 4, 3, 4))).compile().as_text()
  assert not re.search(r" (gather|scatter)\(", hlo)
  with pytest.raises(ValueError, match="from 4 to between 4 and 8, not 9"):
    models.nearest_upsample(jnp.ones((2, 4, 3, 4)), 9, axis=1)


def test_learned_observation_scales_are_parameters_of_the_right_shape():
  cfg = base_config().model
  cfg.hidden, cfg.latent_dim = (8,), 2
  for obs_scale, shape in (("learned_global", ()), ("learned_pixel", (4, 4, 3))):
    cfg.obs_scale = obs_scale
    params = models.init_params(models.make_model(cfg, (4, 4, 3)), jax.random.key(0), (4, 4, 3))
    assert params["params"]["obs_log_scale"].shape == shape


def test_scale_head_cannot_overflow_with_huge_weights():
  model, params = _small_model()
  huge = jax.tree.map(lambda p: p * 1e4, params)
  loss = jax.jit(beta_vae.beta_elbo_loss, static_argnames=("model",))
  _, m = loss(huge, jax.random.key(0), jnp.ones((2, 4, 4, 3)), model=model)
  assert all(bool(jnp.isfinite(v)) for v in m.values())


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_bfloat16_compute_runs_the_layers_in_bfloat16_and_keeps_float32_elsewhere(arch):
  cfg = base_config().model
  cfg.arch, cfg.hidden, cfg.latent_dim, cfg.conv_channels = arch, (32,), 4, (8,)
  f32_model = models.make_model(cfg, (8, 8, 3))
  cfg.compute_dtype = "bfloat16"
  bf16_model = models.make_model(cfg, (8, 8, 3))
  params = models.init_params(bf16_model, jax.random.key(0), (8, 8, 3))
  same = models.init_params(f32_model, jax.random.key(0), (8, 8, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))

  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 3))
  loss_fn = lambda p, model: beta_vae.beta_elbo_loss(p, jax.random.key(2), x, model=model)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, bf16_model)[0]))(params)
  products = {"dot_general": [], "conv_general_dilated": []}

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in products:
        products[e.primitive.name].append(tuple(v.aval.dtype for v in e.invars))
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  # Every dense product, forward and both backward ones, except the gradient of the data that
  # enters the MLP, which nothing asks for; convolutions forward.
  dense = products["dot_general"]
  assert len(dense) == 3 * (2 * len(cfg.hidden) + 3) - (arch == "mlp")
  assert set(dense) == {(jnp.dtype(jnp.bfloat16),) * 2}
  convs = products["conv_general_dilated"]
  assert (arch == "mlp") == (not convs)
  assert sum(dtypes == (jnp.dtype(jnp.bfloat16),) * 2 for dtypes in convs) == 2 * len(cfg.conv_channels) * (arch == "conv")

  # Compiled: op by op, every small convolution would compile on its own.
  (bf16_loss, metrics), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, bf16_model),
                                                           has_aux=True))(params)
  (f32_loss, _), f32_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, f32_model),
                                                        has_aux=True))(params)
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(f32_grads)):
    assert g.dtype == jnp.float32
    assert float(jnp.linalg.norm(g - g32)) < 3e-2 * float(jnp.linalg.norm(g32))
  # bfloat16 keeps 8 bits of mantissa: the loss agrees to well under a percent, not exactly.
  assert float(bf16_loss) == pytest.approx(float(f32_loss), rel=1e-2)
  assert float(bf16_loss) != float(f32_loss)
