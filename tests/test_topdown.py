"""The top-down hierarchical VAE (jaxvae/topdown.py, `model.arch="topdown"`) and the
stabilizers it trains with (`optimizer.skip_grad_norm`, `optimizer.ema_decay`): its block lists,
its per-group KL against Monte Carlo, its initialization, a whole run through training,
evaluation, figures and the evaluate command."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import tiny_digits_config
from jaxvae import config as config_lib
from jaxvae import distributions, evaluate, experiment, models, optim, restore, report, sample
from jaxvae import figures, topdown
from jaxvae import train as train_lib

SHAPE = (8, 8, 1)  # the digits


def tiny_topdown_config(num_steps: int = 24):
  """The digits with a top-down model over 4x4 and 8x8: 3 latent groups, about 4k parameters,
  evaluated every 8 steps."""
  config = tiny_digits_config()
  config.num_steps = num_steps
  config.eval.every_steps = 8
  config.model.arch = "topdown"
  config.model.blocks_up = "8x1,8d2,4x1"
  config.model.blocks_down = "4x1,8m4,8x1"
  config.model.width = 16
  config.model.latent_channels = 2
  config.log.tensorboard = False
  config.optimizer.flatten = True
  return config


@functools.cache
def _model():
  """The tiny config's model and its initial parameters (built once: its compile is slow)."""
  model = models.make_model(tiny_topdown_config().model, SHAPE)
  return model, models.init_params(model, jax.random.key(0), SHAPE)


def _digits(n=6, seed=0):
  return (jax.random.uniform(jax.random.key(seed), (n,) + SHAPE) > 0.5).astype(jnp.float32)


def test_block_lists_are_read_and_bad_ones_refused_naming_the_key():
  assert topdown.parse_up("8x2,8d2,4x1") == ((8, 1), (8, 1), (8, 2), (4, 1))
  assert topdown.parse_down("1x1,4m1,4x2") == ((1, 0), (4, 1), (4, 0), (4, 0))
  assert topdown.spec_problem("8x1,8d2,4x1,4d4,1x1", "1x1,4m1,4x1,8m4,8x1", SHAPE) is None
  problems = {
      ("8x1,8d2,4x1", "4x1,8m4,8x1", (7, 7, 1)): "power-of-two side",
      ("8x1,8d2,2x1", "2x1,8m2", SHAPE): "a block at 2 where the pooling so far leaves 4x4",
      ("8x1,8d2,4x1", "2x1,8m2", SHAPE): "a block at 2, where the bottom-up pass has no",
      ("8x1,8d2,4x1", "4x1,8m2,8x1", SHAPE): "8m2 mixes in a resolution that no earlier block",
      ("8x1,8d2,4x1", "8x1,4x1", SHAPE): "must end at the image's resolution 8",
  }
  for (up, down, shape), message in problems.items():
    assert message in topdown.spec_problem(up, down, shape), (up, down)
  config = tiny_topdown_config()
  config.model.blocks_down = "1x1,4q1"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.blocks_down='1x1,4q1' is not a "
                                                   r"block list like"):
    config_lib.validate(config)
  config = tiny_topdown_config()
  config.model.likelihood = "gaussian"
  with pytest.raises(config_lib.ConfigError, match="needs a discrete likelihood"):
    config_lib.validate(config)
  config = tiny_topdown_config()
  config.objective.kind = "iwae"
  config.objective.num_samples = 2
  with pytest.raises(config_lib.ConfigError, match="trains with objective.kind in"):
    config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError, match="must end at the image's resolution 8"):
    bad = tiny_topdown_config()
    bad.model.blocks_down = "4x1"
    models.make_model(bad.model, SHAPE)


def test_kl_of_two_gaussians_matches_monte_carlo():
  rng = np.random.default_rng(0)
  mq, lq, mp, lp = (jnp.asarray(rng.normal(size=4) * s, jnp.float32) for s in (1, 0.5, 1, 0.5))
  z = mq + jnp.exp(lq) * jax.random.normal(jax.random.key(1), (200_000, 4))
  ratio = np.asarray(distributions.diag_gaussian_log_prob_per_dim(z, mq, lq)
                     - distributions.diag_gaussian_log_prob_per_dim(z, mp, lp))
  stderr = ratio.std(axis=0) / np.sqrt(len(ratio))
  kl = np.asarray(distributions.kl_diag_gaussians(mq, lq, mp, lp))
  assert np.all(np.abs(kl - ratio.mean(axis=0)) < 4 * stderr), (kl, ratio.mean(axis=0), stderr)
  np.testing.assert_allclose(distributions.kl_diag_gaussians(mq, lq, 0.0, 0.0),
                             distributions.kl_per_dim(mq, lq), rtol=1e-6)


def test_each_groups_analytic_kl_is_the_mean_of_its_log_ratio():
  """Given the draws above it, each group's KL is analytic; averaged over many draws it must
  equal the mean of log q(z_l|x, z_<l) - log p(z_l|z_<l) at the draws (the IWAE's weights)."""
  model, params = _model()
  # Perturb the zero-initialized priors so that p differs from N(0, I) in every group.
  params = jax.jit(lambda ps: jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape), ps))(params)
  x = _digits(2)
  draws = 600
  x_rep = jnp.broadcast_to(x, (draws,) + x.shape).reshape((-1,) + SHAPE)
  t = jax.jit(lambda p, k: model.apply(p, x_rep, k, method="terms"))(params, jax.random.key(3))
  kl, ratio = (np.asarray(v).reshape(draws, 2) for v in (t["kl"], t["log_ratio"]))
  stderr = ratio.std(axis=0) / np.sqrt(draws)
  assert np.all(np.abs(kl.mean(axis=0) - ratio.mean(axis=0)) < 4 * stderr + 1e-3)
  assert t["kl_groups"].shape == (2 * draws, model.num_groups)
  np.testing.assert_allclose(t["kl_groups"].sum(axis=-1), t["kl"], rtol=1e-5)
  log_w = jax.jit(lambda p, k: model.apply(p, x_rep[:2], k, method="log_weight"))(
      params, jax.random.key(3))
  np.testing.assert_allclose(log_w, t["log_lik"][:2] - t["log_ratio"][:2], rtol=1e-5)


def test_at_init_every_prior_is_standard_normal_and_adds_nothing():
  model, params = _model()
  for i in range(model.num_groups):
    last = params["params"]["decoder"][f"group_{i}"]["prior"]
    assert not np.any(np.asarray(last["expand"]["kernel"]))
  draw = jax.jit(lambda k, t: model.apply(params, k, 3, t, method="sample")["logits"])
  a, b, c = draw(jax.random.key(1), 0.0), draw(jax.random.key(2), 0.0), draw(jax.random.key(2), 1.0)
  np.testing.assert_array_equal(a, b)  # temperature 0: the prior means
  assert not np.allclose(a, c)
  reconstruct = jax.jit(lambda x: model.apply(params, x, method="reconstruct")["logits"])
  np.testing.assert_array_equal(reconstruct(_digits()), reconstruct(_digits()))
  assert model.has_convolutions and model.top_down
  with pytest.raises(TypeError, match="no single code"):
    model.code_dim


def test_track_ema_is_the_debiased_average_of_the_new_parameters_and_what_evaluation_reads():
  opt = config_lib.base_config().optimizer
  opt.ema_decay = 0.5
  tx = optim.make_optimizer(opt, 10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  seen = []
  for i in range(3):
    updates, state = tx.update({"w": jnp.full(3, float(i + 1))}, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(params["w"])
    # The initial parameters carry no weight: sum_i d^(t-i) p_i / sum_i d^(t-i).
    weights = 0.5 ** np.arange(len(seen))[::-1]
    ema = np.tensordot(weights, np.stack(seen), 1) / weights.sum()
    np.testing.assert_allclose(optim.ema_params(state, params)["w"], ema, rtol=1e-6)
  train_state = experiment.TrainState(jnp.int32(3), {"vae": params}, {"vae": state}, jnp.int32(0))
  np.testing.assert_array_equal(experiment.model_params(train_state)["w"],
                                optim.ema_params(state, params)["w"])
  assert optim.ema_params(optax.adam(1e-3).init(params), params) is None
  opt.flatten = True  # the average is kept raveled, and given back shaped like the parameters
  flat = optim.make_optimizer(opt, 10)
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  updates, state = flat.update({"w": jnp.ones(3), "b": jnp.ones(2)}, flat.init(params), params)
  new = optax.apply_updates(params, updates)
  got = optim.ema_params(state, params)  # after one update, the new parameters themselves
  assert jax.tree.structure(got) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, got, new)


def test_gradient_norms_over_the_threshold_skip_their_steps_until_the_run_stops(tmp_path):
  config = tiny_digits_config(num_epochs=1)
  config.optimizer.skip_grad_norm = 1e-6  # every gradient is larger
  config.optimizer.max_consecutive_skips = 3
  config.log.chunks_per_epoch = 46  # a chunk a step, so the run stops at the third
  with pytest.raises(train_lib.rundir.RunError,
                     match=r"3 training steps in a row .* or a gradient norm at least "
                           r"config.optimizer.skip_grad_norm=1e-06"):
    train_lib.train_and_evaluate(config, str(tmp_path / "skipped"))


@pytest.fixture(scope="module")
def topdown_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("topdown")
  config = tiny_topdown_config()
  config.optimizer.skip_grad_norm = 1e4
  config.optimizer.grad_clip_norm = 200.0
  config.optimizer.ema_decay = 0.9
  config.log.figures = True
  return workdir, train_lib.train_and_evaluate(config, str(workdir))


def test_a_topdown_run_trains_reports_each_groups_kl_and_draws_its_figures(topdown_run):
  workdir, result = topdown_run
  rows = result.history
  assert all(np.isfinite(r["test/bits_per_dim"]) for r in rows)
  assert rows[-1]["test/elbo_nats"] > rows[0]["test/elbo_nats"]
  groups = rows[-1]["test/kl_per_group_nats"]
  assert len(groups) == 3 and all(g >= 0 for g in groups)
  assert np.isclose(sum(groups), rows[-1]["test/kl_nats"], rtol=1e-4)
  assert rows[-1]["train/skipped_steps"] == 0
  assert 0 < rows[-1]["train/vae_grad_norm"] < 1e4
  drawn = set(os.listdir(os.path.join(workdir, "figures")))
  expected = ("data", "fig15_loss", "fig16_ssim", "fig17_reconstructions",
              *figures.TOP_DOWN_FIGURES)
  assert drawn == {f"{name}.png" for name in expected}
  for name in expected:
    with Image.open(os.path.join(workdir, "figures", f"{name}.png")) as im:
      assert im.size == tuple(round(v * figures.DPI) for v in figures.FIGSIZES[name])


def test_the_evaluate_command_scores_a_topdown_run_with_its_moving_average(topdown_run):
  workdir, _ = topdown_run
  run = restore.restore_run(str(workdir))
  ema = optim.ema_params(run.state.opt_state["vae"], run.state.params["vae"])
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), run.params, ema))
  result = evaluate.evaluate_run(run, iw_samples=8, name="topdown")
  vae = result["vae"]
  assert vae["iwae_nats"] >= vae["elbo_nats"] - 1.0  # K = 8 draws; one draw's ELBO is noisy
  assert len(result["kl_per_group_nats"]) == result["latent_groups"] == 3
  assert "pca" not in result and "active_units" not in vae
  text = report.report(result)
  assert "3 latent groups (top-down)" in text and "KL per latent group" in text
  json.dumps(result)
  samples = sample.prior_samples(run.model, run.params, jax.random.key(0), 4, 0.8)
  assert samples.shape == (4,) + SHAPE and float(samples.min()) >= 0 <= 1 >= float(samples.max())
