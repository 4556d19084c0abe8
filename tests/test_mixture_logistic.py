"""The mixture of discretized logistics (PixelCNN++'s likelihood, `model.likelihood=
mixture_logistic`): a distribution over the 256^C colours of a pixel, exact against a 50-digit
reference, stable at its edges, and the head every architecture gives it."""

import functools
import math
from decimal import MAX_EMAX, MIN_EMIN, Decimal, localcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from conftest import tiny_conv_config
from jaxvae import config as config_lib
from jaxvae import distributions as D
from jaxvae import models, train

LEVELS = np.arange(256) / 255


def _pixel(rng, m, c, log_scales=(-5.0, -1.0), coupling=True):
  """Random parameters of one pixel, float64: logits [M], means, log_scales [M, C], coeffs
  [M, 3] (C = 3 only; nonzero unless coupling=False)."""
  p = {"logits": rng.normal(0, 1.5, m), "means": rng.uniform(0.05, 0.95, (m, c)),
       "log_scales": rng.uniform(*log_scales, (m, c))}
  if c == 3:
    p["coeffs"] = np.tanh(rng.normal(0, 1, (m, 3))) if coupling else np.zeros((m, 3))
  return p


def _pixel_log_probs(p, colours, dtype=jnp.float32):
  """The implementation under test at N colours of one pixel's parameters: colours [N, C] in
  [0, 1] -> f64[N]. The colours lie along one image row, so they are N pixels of one example."""
  n = colours.shape[0]
  x = jnp.asarray(colours, dtype).reshape(1, 1, n, -1)
  obs = {k: jnp.broadcast_to(jnp.asarray(v, dtype), (1, 1, n) + v.shape) for k, v in p.items()}
  return np.asarray(D.mixture_logistic_pixel_log_probs(x, obs)[0], np.float64)


def _f32(p):
  """The parameters rounded to float32 and back: what the float32 implementation sees."""
  return {k: np.asarray(v, np.float32).astype(np.float64) for k, v in p.items()}


# ------------------------------------------------------------------- the 50-digit reference


def _ref_log_prob(p, levels) -> float:
  """log P(colour) of one pixel in 50-digit decimal arithmetic, written from the definition:
  colour `levels` (ints 0..255, one per channel); each component's channel c is a logistic of
  mean mu_c (plus PixelCNN++'s c0 r, or c1 r + c2 g, of the observed r, g) and scale
  exp(log_scale) binned on [k - 1/2, k + 1/2] / 255, the end bins open to +-infinity."""
  with localcontext() as ctx:
    ctx.prec, ctx.Emax, ctx.Emin = 50, MAX_EMAX, MIN_EMIN  # exp(1e8) of a far, tiny bin
    dec = lambda v: Decimal(float(v))
    sigmoid = lambda t: 1 / (1 + (-t).exp())
    levels = [int(k) for k in levels]
    x = [Decimal(k) / 255 for k in levels]
    logits = [dec(v) for v in p["logits"]]
    top = max(logits)
    weights = [(v - top).exp() for v in logits]
    total = Decimal(0)
    for m, w in enumerate(weights):
      prob = w / sum(weights)
      for c, k in enumerate(levels):
        mu = dec(p["means"][m][c])
        if c == 1:
          mu += dec(p["coeffs"][m][0]) * x[0]
        if c == 2:
          mu += dec(p["coeffs"][m][1]) * x[0] + dec(p["coeffs"][m][2]) * x[1]
        inv_s = (-dec(p["log_scales"][m][c])).exp()
        u = (x[c] + Decimal(1) / 510 - mu) * inv_s if k < 255 else None  # None: infinity
        l = (x[c] - Decimal(1) / 510 - mu) * inv_s if k > 0 else None
        if l is not None and l > 0:  # above the mean: survival function, 1 - F(t) = F(-t)
          prob *= sigmoid(-l) - (0 if u is None else sigmoid(-u))
        else:
          prob *= (1 if u is None else sigmoid(u)) - (0 if l is None else sigmoid(l))
      total += prob
    return float(total.ln())


@pytest.mark.parametrize("c", [1, 3])
def test_agrees_with_a_50_digit_reference_at_random_points(c):
  rng = np.random.default_rng(c)
  for trial in range(6):
    # Wide and narrow components; a third of the colours at the edge levels 0 and 255.
    p = _f32(_pixel(rng, 4, c, log_scales=(-7.0, 1.0)))
    colours = rng.integers(0, 256, (12, c))
    colours[:4, rng.integers(0, c)] = rng.choice([0, 255], 4)
    ours = _pixel_log_probs(p, colours / 255)
    ref = np.array([_ref_log_prob(p, k) for k in colours])
    # float32: the relative error of the standardized bin edges, up to |log P| of a few hundred.
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5, err_msg=f"trial {trial}")


# ----------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grey_mixture_sums_to_one_over_the_256_levels(seed):
  p = _pixel(np.random.default_rng(seed), 3, 1, log_scales=(-7.0, 0.5))
  with jax.enable_x64(True):
    log_p = _pixel_log_probs(p, LEVELS[:, None], jnp.float64)
  np.testing.assert_allclose(special.logsumexp(log_p), 0.0, atol=1e-12)


# XLA's default optimization here, whatever the suite's fast-compile flags: 1.9x faster.
@functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 3,
                                              "xla_cpu_use_fusion_emitters": True})
def _colour_marginals(p, reds):
  """sum over all 256^2 (g, b) of P(r, g, b), by the implementation, for each red level in
  `reds` f[R]: f[R], in the parameters' dtype (compiled: op by op took minutes)."""
  levels = jnp.arange(256, dtype=p["means"].dtype) / 255
  g, b = (v.ravel() for v in jnp.meshgrid(levels, levels, indexing="ij"))

  def one_red(r):
    x = jnp.stack([jnp.full_like(g, r / 255), g, b], -1).reshape(1, 1, g.size, 3)
    obs = {k: jnp.broadcast_to(v, (1, 1, g.size) + v.shape) for k, v in p.items()}
    return jnp.exp(D.mixture_logistic_pixel_log_probs(x, obs)[0]).sum()
  return jax.lax.map(one_red, reds)


def _red_marginal(p, r) -> float:
  """P(red level r) of the mixture, from its red channel alone (scipy, float64): the green and
  blue conditionals each sum to one, whatever r and g move their means by."""
  w = special.softmax(p["logits"])
  s = np.exp(p["log_scales"][:, 0])
  mu = p["means"][:, 0]
  upper = 1.0 if r == 255 else special.expit(((r + 0.5) / 255 - mu) / s)
  lower = 0.0 if r == 0 else special.expit(((r - 0.5) / 255 - mu) / s)
  return float((w * (upper - lower)).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_colour_mixture_sums_over_green_and_blue_to_the_red_marginal(seed):
  """The coupled channels, exactly: for red levels at both edges and inside, the
  implementation summed in float64 over all 65,536 (g, b) gives P(r). Fast; the full 256^3
  sum is the slow test below."""
  p = _pixel(np.random.default_rng(seed), 3, 3, log_scales=(-6.0, -1.0))
  reds = [0, 1, int(round(255 * p["means"][0, 0])), 254, 255]
  with jax.enable_x64(True):
    sums = np.asarray(_colour_marginals(p, jnp.asarray(reds, jnp.float64)))
  np.testing.assert_allclose(sums, [_red_marginal(p, r) for r in reds], rtol=1e-10, atol=1e-15)


@pytest.mark.slow
def test_colour_mixture_sums_to_one_over_all_256_cubed_colours():
  """The implementation itself, in float64 (jax.enable_x64), at every one of the 16.8M colours
  of one pixel with M = 2 coupled components: about 8 s on a shared 2-core CPU (M = 3 took
  1.5x that)."""
  p = _pixel(np.random.default_rng(0), 2, 3, log_scales=(-6.0, -1.0))
  with jax.enable_x64(True):
    total = float(np.sum(_colour_marginals(p, jnp.arange(256.0, dtype=jnp.float64))))
  np.testing.assert_allclose(total, 1.0, atol=1e-12)


# ------------------------------------------------------------------------ edges and extremes


def _obs(p, shape=(1, 1, 1)):
  """One pixel's parameters as a decoder output dict of float32 arrays, batch [1, 1, 1]."""
  return {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape + np.shape(v))
          for k, v in p.items()}


def test_edge_levels_take_the_tails():
  """x = 0 scores P(X <= 0.5/255) and x = 1 scores P(X > 254.5/255), from the CDF."""
  mu, log_s = np.array([[0.3], [0.8]]), np.array([[-3.0], [-4.0]])
  p = {"logits": np.array([0.4, -0.2]), "means": mu, "log_scales": log_s}
  w = special.softmax(p["logits"])
  s = np.exp(log_s[:, 0])
  below = special.expit((0.5 / 255 - mu[:, 0]) / s)
  above = special.expit(-(254.5 / 255 - mu[:, 0]) / s)
  for x, mass in ((0.0, below), (1.0, above)):
    ours = float(D.discretized_mixture_logistic_log_prob(jnp.full((1, 1, 1, 1), x), _obs(p))[0])
    np.testing.assert_allclose(ours, np.log((w * mass).sum()), rtol=1e-5)


@pytest.mark.parametrize("where", ["centre", "edge", "far"])
@pytest.mark.parametrize("log_scale", [-7.0, -20.0])
def test_tiny_scales_are_finite_and_exact_with_finite_gradients(where, log_scale):
  """A log-scale at the head's floor (-7, where soft_clamp with bound 7 tends) and far below,
  the mean exactly on the observed level's centre, on one of its bin's edges, or far from it."""
  k = np.array([[0, 128, 255]])  # the colour's levels
  offset = {"centre": 0.0, "edge": 0.5 / 255, "far": 0.3}[where]
  means = np.abs(k / 255 - offset)  # the edges: k = 0 reflects to +offset, 255 to 255 - offset
  p = {"logits": np.array([0.0]), "means": means, "log_scales": np.full((1, 3), log_scale),
       "coeffs": np.zeros((1, 3))}
  x = jnp.asarray(k / 255, jnp.float32).reshape(1, 1, 1, 3)
  log_p = lambda obs: D.discretized_mixture_logistic_log_prob(x, obs)[0]
  value, grads = jax.value_and_grad(log_p)(_obs(p))
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  if log_scale == -20.0 and where == "edge":
    return  # a scale of 2e-9, below float32's spacing near 1: which side of the edge is noise
  np.testing.assert_allclose(float(value), _ref_log_prob(_f32(p), k[0]), rtol=1e-5, atol=1e-5)


def test_huge_logits_pick_one_component_and_keep_gradients_finite():
  rng = np.random.default_rng(3)
  p = _pixel(rng, 3, 3)
  x = jnp.asarray([[[[0.2, 0.6, 1.0]]]], jnp.float32)
  log_p = lambda obs: D.discretized_mixture_logistic_log_prob(x, obs)[0]
  alone = {k: v[:1] for k, v in p.items()}
  for logits in ([1e30, -1e30, 0.0], [1e30, 1e30 * (1 - 1e-7), -1e30], [3e38, -3e38, 0.0]):
    value, grads = jax.value_and_grad(log_p)(_obs(dict(p, logits=np.array(logits))))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), logits
    if logits[1] < 0:  # component 0 has all the weight
      np.testing.assert_allclose(float(value), float(log_p(_obs(alone))), rtol=1e-6)
    assert np.isfinite(float(value))


def test_one_component_without_coupling_is_the_discretized_logistic():
  rng = np.random.default_rng(4)
  shape = (2, 5, 4, 3)
  x = jnp.asarray(rng.integers(0, 256, shape) / 255, jnp.float32)
  mean = jnp.asarray(rng.uniform(-0.1, 1.1, shape), jnp.float32)
  log_scale = jnp.asarray(rng.uniform(-8, 1, shape), jnp.float32)
  obs = {"logits": jnp.asarray(rng.normal(0, 1, shape[:3] + (1,)), jnp.float32),
         "means": mean[..., None, :], "log_scales": log_scale[..., None, :],
         "coeffs": jnp.zeros(shape[:3] + (1, 3))}
  np.testing.assert_allclose(D.discretized_mixture_logistic_log_prob(x, obs),
                             D.discretized_logistic_log_prob(x, mean, log_scale), rtol=1e-6)
  grey = {k: v[..., :1] for k, v in obs.items() if k != "coeffs"}
  np.testing.assert_allclose(D.discretized_mixture_logistic_log_prob(x[..., :1], grey),
                             D.discretized_logistic_log_prob(x[..., :1], mean[..., :1],
                                                             log_scale[..., :1]), rtol=1e-6)


def test_likelihood_mean_is_the_coupled_expectation_clipped():
  p = {"logits": np.log([0.25, 0.75]), "means": np.array([[0.2, 0.4, 0.5], [0.6, 0.1, 0.9]]),
       "log_scales": np.zeros((2, 3)), "coeffs": np.array([[0.5, -0.5, 1.0], [0.0, 0.0, 0.5]])}
  # Component 0: r 0.2, g 0.4 + 0.1, b 0.5 - 0.1 + 0.5; component 1: 0.6, 0.1, 0.9 + 0.05.
  want = 0.25 * np.array([0.2, 0.5, 0.9]) + 0.75 * np.array([0.6, 0.1, 0.95])
  np.testing.assert_allclose(D.likelihood_mean("mixture_logistic", _obs(p))[0, 0, 0], want,
                             rtol=1e-6)
  p["means"] = p["means"] + 1.0
  assert float(jnp.max(D.likelihood_mean("mixture_logistic", _obs(p)))) == 1.0


# ------------------------------------------------------------------------ the model head


@pytest.mark.parametrize("arch,shape", [("mlp", (8, 8, 3)), ("conv", (7, 9, 3)),
                                        ("conv", (8, 8, 1)), ("locatello", (16, 16, 3)),
                                        ("larsen", (16, 16, 3))])
def test_every_architecture_emits_the_mixture(arch, shape):
  import jaxvae.larsen  # noqa: F401  (registers the arch)
  cfg = config_lib.base_config().model
  cfg.arch, cfg.likelihood, cfg.mixtures, cfg.hidden, cfg.latent_dim = (
      arch, "mixture_logistic", 5, (16,), 3)
  cfg.conv_channels, cfg.decoder_channels = (4, 8), (8, 4)
  model = models.make_model(cfg, shape)
  assert D.mixture_logistic_channels(5, shape[-1]) == (50 if shape[-1] == 3 else 15)

  def decode(x):
    variables = model.init(jax.random.key(0), x)
    return model.apply(variables, x, mutable=["batch_stats"])[0] if model.has_batch_norm \
        else model.apply(variables, x)

  obs = jax.eval_shape(decode, jnp.zeros((2,) + shape))
  want = {"logits": (2,) + shape[:2] + (5,), "means": (2,) + shape[:2] + (5, shape[-1]),
          "log_scales": (2,) + shape[:2] + (5, shape[-1])}
  if shape[-1] == 3:
    want["coeffs"] = (2,) + shape[:2] + (5, 3)
  assert {k: v.shape for k, v in obs.items()} == want


def test_head_squashes_each_parameter_into_its_range():
  out = jnp.asarray(np.random.default_rng(5).normal(0, 50, (1, 2, 2, 20)), jnp.float32)
  obs = models.mixture_logistic_head(out, 3, 2, 7.0)
  np.testing.assert_array_equal(obs["logits"], out[..., :2])
  assert float(jnp.min(obs["means"])) >= 0 and float(jnp.max(obs["means"])) <= 1
  assert float(jnp.max(jnp.abs(obs["log_scales"]))) <= 7.0
  assert float(jnp.max(jnp.abs(obs["coeffs"]))) <= 1.0
  # Channel 2 + 2 * m + c is component m's mean of channel c.
  np.testing.assert_allclose(obs["means"][0, 0, 0, 1, 2], jax.nn.sigmoid(out[0, 0, 0, 2 + 3 + 2]))


def test_data_mean_output_bias_decodes_each_component_to_the_mean():
  cfg = config_lib.base_config().model
  cfg.likelihood, cfg.mixtures = "mixture_logistic", 2
  mean = np.array([[[0.25, 0.5, 0.9]]], np.float32)
  obs = models.mixture_logistic_head(jnp.asarray(models.output_bias(cfg, mean))[None], 3, 2, 7.0)
  np.testing.assert_allclose(obs["means"][0, 0, 0], np.stack([mean[0, 0]] * 2), rtol=1e-5)
  for key in ("logits", "log_scales", "coeffs"):
    assert not np.any(np.asarray(obs[key]))


def test_mixtures_key_is_checked_and_channels_other_than_1_or_3_are_refused():
  config = tiny_conv_config()
  config.model.likelihood, config.model.mixtures = "mixture_logistic", 0
  with pytest.raises(config_lib.ConfigError, match=r"config.model.mixtures=0 must be >= 1"):
    config_lib.validate(config)
  config.model.mixtures = 3
  with pytest.raises(config_lib.ConfigError, match=r"1 or 3 channels, and these have 2"):
    models.make_model(config.model, (8, 8, 2))


def test_a_tiny_run_trains_with_falling_bits_per_dim(tmp_path):
  config = tiny_conv_config(num_epochs=3)
  config.model.likelihood, config.model.mixtures = "mixture_logistic", 3
  config.data.binarize = "none"
  config.log.tensorboard = False
  rows = train.train_and_evaluate(config, str(tmp_path)).history
  bits = [r["test/bits_per_dim"] for r in rows]
  assert all(math.isfinite(b) for b in bits) and bits[-1] < bits[0], bits
  assert rows[-1]["train/skipped_steps"] == 0
