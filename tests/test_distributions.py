"""The posterior, the KL and every likelihood against closed forms and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from jaxvae import distributions as D


def test_kl_matches_monte_carlo_far_from_prior():
  # 64 posteriors per dim, means up to +-6 and scales from e^-3 to e^2.5 (far from N(0, 1)).
  rng = np.random.default_rng(0)
  mean = rng.uniform(-6, 6, (64, 1)).astype(np.float32)
  log_scale = rng.uniform(-3, 2.5, (64, 1)).astype(np.float32)
  analytic = np.asarray(D.kl_standard_normal(mean, log_scale))
  n = 200_000
  z = D.sample_diag_gaussian(jax.random.key(1), mean, log_scale, n)  # [n, 64, 1]
  log_ratio = np.asarray(D.diag_gaussian_log_prob(z, mean, log_scale)
                         - D.standard_normal_log_prob(z), np.float64)  # [n, 64]
  mc = log_ratio.mean(0)
  stderr = log_ratio.std(0) / np.sqrt(n)
  # 5 standard errors: a false alarm has probability ~6e-7 per posterior; float32 slack added.
  np.testing.assert_array_less(np.abs(mc - analytic), 5 * stderr + 1e-4 * (1 + np.abs(analytic)))


def test_kl_zero_at_prior_and_nonnegative():
  k = 7
  assert float(D.kl_standard_normal(jnp.zeros((1, k)), jnp.zeros((1, k)))[0]) == 0.0
  key_m, key_s = jax.random.split(jax.random.key(0))
  kl = D.kl_standard_normal(3 * jax.random.normal(key_m, (1000, k)),
                            2 * jax.random.normal(key_s, (1000, k)))
  assert kl.shape == (1000,)
  assert bool(jnp.all(kl >= 0))
  # Summed over dims, not averaged: k identical dims give k times one dim.
  one = D.kl_standard_normal(jnp.ones((1, 1)), jnp.full((1, 1), 0.3))
  many = D.kl_standard_normal(jnp.ones((1, k)), jnp.full((1, k), 0.3))
  np.testing.assert_allclose(many, k * one, rtol=1e-6)


def test_reparameterized_gradient_matches_closed_form():
  # f(z) = sum(z^2): E_q f = sum(mu^2 + sigma^2), so d/dmu = 2 mu and d/dlog_sigma = 2 sigma^2.
  mu = jnp.array([[0.5, -1.5, 2.0]])
  log_sigma = jnp.array([[-1.0, 0.0, 0.7]])

  def mc_objective(mu, log_sigma):
    z = D.sample_diag_gaussian(jax.random.key(3), mu, log_sigma, 400_000)
    return jnp.mean(jnp.sum(z ** 2, axis=-1))

  g_mu, g_ls = jax.grad(mc_objective, argnums=(0, 1))(mu, log_sigma)
  np.testing.assert_allclose(g_mu, 2 * mu, rtol=0.02, atol=0.01)
  np.testing.assert_allclose(g_ls, 2 * jnp.exp(2 * log_sigma), rtol=0.02, atol=0.01)


def test_gaussian_log_prob_against_scipy_and_paper_sse():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (3, 4, 4, 2)).astype(np.float32)
  mean = rng.uniform(0, 1, x.shape).astype(np.float32)
  log_scale = rng.normal(0, 1, x.shape).astype(np.float32)
  ours = np.asarray(D.gaussian_log_prob(x, mean, log_scale))
  ref = stats.norm.logpdf(x, mean, np.exp(log_scale)).reshape(3, -1).sum(-1)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  # sigma^2 = 1/2: -log p = SSE + (D/2) log(pi), the paper's SSE loss up to a constant.
  sse = ((x - mean) ** 2).reshape(3, -1).sum(-1)
  half = np.float32(0.5 * np.log(0.5))
  np.testing.assert_allclose(-D.gaussian_log_prob(x, mean, half), sse + 16 * np.log(np.pi), rtol=1e-5)


@pytest.mark.parametrize("logit", [-1000.0, -80.0, -3.0, 0.0, 2.5, 80.0, 1000.0])
def test_bernoulli_log_prob_is_exact_for_extreme_logits(logit):
  logits = jnp.full((1, 1, 1, 1), logit)
  for x in (0.0, 1.0):
    ours = float(D.bernoulli_log_prob(jnp.full((1, 1, 1, 1), x), logits)[0])
    ref = special.log_expit(logit) if x == 1 else special.log_expit(-logit)
    assert np.isfinite(ours)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,dist", [("logistic", stats.logistic), ("gaussian", stats.norm)])
@pytest.mark.parametrize("mean,log_scale", [(0.5, -2.0), (0.1, -6.0), (0.91, -9.0), (0.3, 3.0),
                                            (-2.0, -5.0), (3.0, -5.0)])
def test_discretized_likelihoods_against_scipy(kind, dist, mean, log_scale):
  fn = D.discretized_logistic_log_prob if kind == "logistic" else D.discretized_gaussian_log_prob
  levels = np.arange(256, dtype=np.float64) / 255
  x = jnp.asarray(levels, jnp.float32).reshape(256, 1, 1, 1)
  ours = np.asarray(fn(x, jnp.float32(mean), jnp.float32(log_scale)), np.float64)
  s = np.exp(log_scale)
  upper = np.where(levels == 1, np.inf, levels + 0.5 / 255)
  lower = np.where(levels == 0, -np.inf, levels - 0.5 / 255)
  # Float64 reference: difference of survival or cdf on the far side of the mean.
  mass = np.where(lower > mean, dist.sf(lower, mean, s) - dist.sf(upper, mean, s),
                  dist.cdf(upper, mean, s) - dist.cdf(lower, mean, s))
  assert np.all(np.isfinite(ours)), "a finite scale must give a finite log-mass"
  ok = mass > 1e-30  # where float64 itself underflows, only finiteness is checked
  np.testing.assert_allclose(ours[ok], np.log(mass[ok]), rtol=2e-4, atol=2e-4)
  # The 256 masses form a distribution.
  np.testing.assert_allclose(special.logsumexp(ours), 0.0, atol=1e-3)  # float32 bin edges


def test_soft_clamp_keeps_exp_finite():
  raw = jnp.array([-1e30, -50.0, 0.0, 50.0, 1e30])
  clamped = D.soft_clamp(raw, 7.0)
  assert bool(jnp.all(jnp.isfinite(jnp.exp(2 * clamped))))
  assert float(jnp.max(jnp.abs(clamped))) <= 7.0
  np.testing.assert_allclose(D.soft_clamp(jnp.float32(0.01), 7.0), 0.01, rtol=1e-5)
  kl = D.kl_standard_normal(jnp.zeros((1, 5)), D.soft_clamp(raw, 7.0)[None])
  assert bool(jnp.isfinite(kl[0]))


def test_bits_per_dim_conversion_by_hand():
  # -3072 * ln 2 nats over 3072 dims is exactly 1 bit/dim.
  np.testing.assert_allclose(D.bits_per_dim(-3072 * np.log(2.0), 3072), 1.0)
