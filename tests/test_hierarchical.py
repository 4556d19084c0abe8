"""The two-stochastic-layer VAE (models.HierarchicalVAE, configs/mnist_iwae.py:2): its layers,
its log-weights against a hand computation, its bounds against the marginal likelihood by
quadrature, and a whole run through training, evaluation and figures."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from configs import mnist_iwae
from conftest import tiny_digits_config
from jaxvae import config as config_lib
from jaxvae import report
from jaxvae import distributions, evaluate, models
from jaxvae import elbo as elbo_lib
from jaxvae.objectives import iwae as iwae_lib
from jaxvae import restore
from jaxvae import train as train_lib

MNIST_SHAPE = (28, 28, 1)
TINY_SHAPE = (2, 2, 1)  # four binary pixels: 16 possible images


def test_mnist_iwae_2_is_burdas_two_layer_model():
  config = mnist_iwae.get_config("2")
  config.data.path = "unused.tar.gz"
  config_lib.validate(config)
  model = models.make_model(config.model, MNIST_SHAPE, np.full(MNIST_SHAPE, 0.5))
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), MNIST_SHAPE))
  shapes = jax.tree.map(lambda p: p.shape, params["params"])

  def mlp(widths, heads=True):  # the layers of an MLP with two Gaussian heads, or one output
    layers = {f"Dense_{i}": {"kernel": (a, b), "bias": (b,)}
              for i, (a, b) in enumerate(zip(widths[:-2], widths[1:-1]))}
    if heads:
      return layers | {h: {"kernel": widths[-2:], "bias": widths[-1:]} for h in ("mean", "log_scale")}
    return layers | {f"Dense_{len(widths) - 2}": {"kernel": widths[-2:], "bias": widths[-1:]}}

  assert shapes == {"encoder": mlp((784, 200, 200, 100)),            # q(h1|x)
                    "upper_encoder": mlp((100, 100, 100, 50)),       # q(h2|h1)
                    "upper_decoder": mlp((50, 100, 100, 100)),       # p(h1|h2)
                    "decoder": mlp((100, 200, 200, 784), heads=False)}  # p(x|h1), logits
  assert models.count_params(params) == 521_084
  assert model.stochastic_layers == 2 and model.code_dim == 50
  # Everything else is the one-layer protocol's.
  assert model.likelihood == "bernoulli" and config.num_epochs == 3280


def _tiny_model(middle_dim=2, latent_dim=2, noise=0.5):
  config = tiny_digits_config()
  m = config.model
  m.hidden, m.latent_dim, m.middle_dim, m.middle_hidden = (3,), latent_dim, middle_dim, (3,)
  m.activation = "tanh"
  model = models.make_model(m, TINY_SHAPE)
  params = models.init_params(model, jax.random.key(7), TINY_SHAPE)
  # Non-zero biases everywhere, so the test sees every term (init leaves them at zero), and
  # log-scale heads held near 0 (sigma in about (0.5, 2)), so every density fits the grids.
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(8), len(leaves))
  leaves = [(p + noise * jax.random.normal(k, p.shape))
            * (0.3 if "log_scale" in jax.tree_util.keystr(path) else 1.0)
            for (path, p), k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


def _np_gaussian_mlp(p, h):
  """numpy MLPEncoder with tanh: (mean, log_scale soft-clamped at 7)."""
  for i in range(len(p) - 2):
    h = np.tanh(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
  raw = h @ p["log_scale"]["kernel"] + p["log_scale"]["bias"]
  return h @ p["mean"]["kernel"] + p["mean"]["bias"], 7.0 * np.tanh(raw / 7.0)


def _np_logits(p, h):
  n = len(p)
  for i in range(n - 1):
    h = np.tanh(h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
  return h @ p[f"Dense_{n - 1}"]["kernel"] + p[f"Dense_{n - 1}"]["bias"]


def _np_log_normal(z, mean, log_scale):
  return np.sum(-0.5 * ((z - mean) / np.exp(log_scale)) ** 2 - log_scale
                - 0.5 * math.log(2 * math.pi), axis=-1)


def _np_log_bernoulli(x, logits):
  return np.sum(x * logits - np.logaddexp(0.0, logits), axis=-1)


def test_iwae_loss_is_the_two_layer_importance_bound_by_hand():
  model, params = _tiny_model()
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  x = np.array([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], np.float64)
  k = 4
  value, metrics = iwae_lib.iwae_loss(params, jax.random.key(3),
                                        jnp.asarray(x.reshape((3,) + TINY_SHAPE), jnp.float32),
                                        model=model, num_samples=k)
  # The draws by hand: the key splits into the h1 draws' and the h2 draws', h2 one per h1.
  bottom, upper = jax.random.split(jax.random.key(3))
  eps1 = np.asarray(jax.random.normal(bottom, (k, 3, 2)), np.float64)
  eps2 = np.asarray(jax.random.normal(upper, (1, k * 3, 2))[0], np.float64).reshape(k, 3, 2)
  m1, s1 = _np_gaussian_mlp(p["encoder"], x)
  h1 = m1 + np.exp(s1) * eps1                                          # q(h1|x)
  m2, s2 = _np_gaussian_mlp(p["upper_encoder"], h1)
  h2 = m2 + np.exp(s2) * eps2                                          # q(h2|h1)
  pm1, ps1 = _np_gaussian_mlp(p["upper_decoder"], h2)                  # p(h1|h2)
  log_w = (_np_log_bernoulli(x, _np_logits(p["decoder"], h1)) + _np_log_normal(h1, pm1, ps1)
           + _np_log_normal(h2, 0.0, 0.0) - _np_log_normal(h1, m1, s1)
           - _np_log_normal(h2, m2, s2))                              # [k, 3]
  iwae = np.mean(logsumexp(log_w, axis=0) - math.log(k))
  assert float(value) == pytest.approx(-iwae, rel=1e-5)
  assert float(metrics["iwae_nats"]) == pytest.approx(iwae, rel=1e-5)
  # Its ELBO metric: the same draws, with the model's KL estimate (as kind='elbo' reports it):
  # log q(h1|x) - log p(h1|h2) + KL(q(h2|h1) || N(0, I)), the top term analytic.
  log_lik = _np_log_bernoulli(x, _np_logits(p["decoder"], h1))
  kl_top = np.sum(0.5 * (m2 ** 2 + np.exp(2 * s2) - 1) - s2, axis=-1)
  kl = _np_log_normal(h1, m1, s1) - _np_log_normal(h1, pm1, ps1) + kl_top
  assert float(metrics["elbo_nats"]) == pytest.approx((log_lik - kl).mean(), rel=1e-5)
  assert float(metrics["kl_nats"]) == pytest.approx(kl.mean(), rel=1e-5)


def _quadrature(model, params, x):
  """log p(x) and the ELBO of one tiny image x f64[4] on a grid over (h1, h2), both 1-D."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  grid = np.linspace(-12, 12, 1201)
  step = grid[1] - grid[0]
  h1, h2 = np.meshgrid(grid, grid, indexing="ij")           # [G1, G2]
  h1c, h2c = h1.reshape(-1, 1), h2.reshape(-1, 1)
  pm, ps = _np_gaussian_mlp(p["upper_decoder"], h2c)
  log_joint = (_np_log_bernoulli(x, _np_logits(p["decoder"], h1c))
               + _np_log_normal(h1c, pm, ps) + _np_log_normal(h2c, 0.0, 0.0))
  log_px = logsumexp(log_joint) + 2 * math.log(step)
  m1, s1 = _np_gaussian_mlp(p["encoder"], x[None])
  m2, s2 = _np_gaussian_mlp(p["upper_encoder"], h1c)
  log_q = _np_log_normal(h1c, m1, s1) + _np_log_normal(h2c, m2, s2)
  elbo = np.sum(np.exp(log_q) * (log_joint - log_q)) * step ** 2
  mass = np.sum(np.exp(log_q)) * step ** 2
  assert mass == pytest.approx(1.0, abs=1e-6)  # the grid holds all of q
  return log_px, elbo


def test_elbo_and_importance_weights_meet_quadrature():
  model, params = _tiny_model(middle_dim=1, latent_dim=1, noise=0.4)
  x = np.array([1.0, 0.0, 1.0, 1.0])
  log_px, elbo = _quadrature(model, params, x)
  assert elbo < log_px - 1.0  # a gap that the importance weights must close
  image = jnp.asarray(x.reshape((1,) + TINY_SHAPE), jnp.float32)
  n = 100_000
  # The training ELBO, one draw per example for n copies of x: its mean within 4 standard
  # errors of the quadrature ELBO (the KL: a Monte Carlo h1 term plus an analytic h2 term).
  t = elbo_lib.elbo_terms(params, jax.random.key(1), jnp.repeat(image, n, axis=0), model=model)
  per_draw = np.asarray(t["log_lik"] - t["kl"], np.float64)
  assert abs(per_draw.mean() - elbo) < 4 * per_draw.std() / math.sqrt(n)
  # The log-weights of n draws: their mean is an ELBO, the log of the mean weight log p(x),
  # each within 4 standard errors (the second by the delta method).
  bottom, upper = jax.random.split(jax.random.key(2))
  mean, log_scale = model.apply(params, image, method=models.VAE.encode_bottom)
  z = distributions.sample_diag_gaussian(bottom, mean, log_scale, n)
  log_w, _ = iwae_lib.log_weights(params, image, z, mean, log_scale, model=model,
                                    upper_rng=upper)
  log_w = np.asarray(log_w[:, 0], np.float64)
  assert abs(log_w.mean() - elbo) < 4 * log_w.std() / math.sqrt(n)
  w = np.exp(log_w - log_w.max())
  assert abs(logsumexp(log_w) - math.log(n) - log_px) < 4 * w.std() / w.mean() / math.sqrt(n)
  # The evaluate command's bound (chunked draws) lands there too.
  bound = iwae_lib.iwae_bound(params, jax.random.key(3), image, model=model,
                                num_samples=20_000, chunk_size=5000)
  assert float(bound["iwae"][0]) == pytest.approx(log_px, abs=0.05)
  assert float(bound["elbo"][0]) == pytest.approx(elbo, abs=0.05)


@pytest.mark.parametrize("overrides,message", [
    ({"model.middle_dim": 4, "model.arch": "conv"}, "needs config.model.arch='mlp'"),
    ({"model.middle_hidden": (8,)}, "config.model.middle_dim=0 has none"),
    ({"model.middle_dim": -1}, "config.model.middle_dim=-1 must be >= 0"),
    ({"model.middle_dim": 4, "objective.kind": "beta_tcvae"}, "kind='beta_tcvae'"),
    ({"model.middle_dim": 4, "objective.free_bits": 0.5}, "free_bits"),
])
def test_bad_two_layer_settings_name_the_key(overrides, message):
  config = tiny_digits_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_a_two_layer_run_trains_evaluates_and_draws(tmp_path):
  config = tiny_digits_config(num_epochs=3)
  config.model.middle_dim, config.model.middle_hidden, config.model.latent_dim = 6, (16,), 2
  config.log.figures = True
  train_lib.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  elbos = [r["test/elbo_nats"] for r in rows if "test/elbo_nats" in r]
  assert len(elbos) == 3 and elbos[-1] > elbos[0]
  assert len(rows[-1]["test/kl_per_dim_nats"]) == 2  # the top code's dims
  for name in ("fig19_prior_samples.png", "fig17_reconstructions.png", "latent_traversals.png"):
    assert (tmp_path / "figures" / name).exists()
  run = restore.restore_run(str(tmp_path))
  assert isinstance(run.model, models.HierarchicalVAE)
  result = evaluate.evaluate_run(run, iw_samples=50)
  vae = result["vae"]
  assert vae["iwae_nats"] > vae["iwae_elbo_nats"]
  # The command scores the last epoch's ELBO again with the same key.
  assert vae["elbo_nats"] == pytest.approx(elbos[-1], rel=1e-5)
  bottom, top = vae["active_units_per_layer"]
  assert 0 <= bottom <= 6 and top == vae["active_units"] <= 2
  assert len(result["kl_per_dim_nats"]) == 2
  # The table and eval.json say how the two-layer figures are estimated.
  assert "h2 ~ q(h2|h1)" in result["estimators"]["elbo_nats"]
  table = report.format_table(dict(result, run="two layers"))
  assert "estimated KL" in table
  assert re.search(rf"active units per layer +{bottom} \+ {top} ", table)
