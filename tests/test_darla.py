"""DARLA's vision stage: the sprites' domains, occlusion noise, the DAE and beta-VAE_DAE
objectives (a frozen second network), and zero-shot transfer of factor predictors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sprites_darla
from conftest import tiny_sprites_config
from jaxvae import checkpoint, data, disentanglement, evaluate, experiment, parallel, restore
from jaxvae import figures, sprites
from jaxvae import state as state_lib
from jaxvae import train as train_lib
from jaxvae.errors import ConfigError
from jaxvae.objectives import darla


def test_domains_change_appearance_only_and_depend_on_the_grid_index_alone():
  indices = np.array([5, 70_001, 400_123, 737_279])
  source = sprites.render(indices)
  sprite = source[..., 0] == 255
  for domain in sprites.DOMAINS:
    drawn = sprites.restyle(source.copy(), indices, domain)
    level = {"source": 255, "dim": 128}.get(domain, 255)
    assert np.all(drawn[..., 0][sprite] == level), domain
    background = drawn[..., 0][~sprite]
    assert (background.max() == 0) == (domain in ("source", "dim")), domain
    # One image alone is drawn as it is among others: a function of its own grid index.
    alone = sprites.restyle(sprites.render(indices[2:3]), indices[2:3], domain)
    np.testing.assert_array_equal(alone[0], drawn[2])
  noise = sprites.restyle(source.copy(), indices, "noise")[..., 0][~sprite]
  assert 0 < noise.max() <= sprites.NOISE_MAX and len(np.unique(noise)) > 100
  with pytest.raises(ValueError, match="'sepia' is not one of"):
    sprites.restyle(source, indices, "sepia")


def test_a_domain_dataset_keeps_the_images_order_and_factor_labels(tmp_path):
  config = tiny_sprites_config()
  config.data.cache_dir = str(tmp_path)
  source = data.load(config.data)
  config.data.sprites_domain = "stripes"
  stripes = data.load(config.data)
  np.testing.assert_array_equal(source.train.factors, stripes.train.factors)
  np.testing.assert_array_equal(source.test.factors, stripes.test.factors)
  np.testing.assert_array_equal(source.train.images == 255, stripes.train.images == 255)
  with pytest.raises(ConfigError, match="data.sprites_domain='stripes'.*set it to 'source'"):
    from jaxvae import config as config_lib
    config_lib.validate(config)


def test_occlusion_zeroes_one_uniform_rectangle_per_image():
  x = jnp.ones((4000, 12, 10, 1))
  out = np.asarray(darla.occlude(jax.random.key(0), x))[..., 0]
  hole = out == 0
  rows, cols = hole.any(axis=2), hole.any(axis=1)
  # The zeroed pixels are exactly the product of their rows and columns: one rectangle.
  np.testing.assert_array_equal(hole, rows[:, :, None] & cols[:, None, :])
  for line in [*rows, *cols]:  # contiguous rows and columns
    assert np.sum(np.diff(line.astype(int)) != 0) <= 2
  # Corners uniform on n = H + 1 values: E|r1 - r2| = (n^2 - 1) / 3n rows, and so for columns.
  expect = (168 / 39 / 12) * (120 / 33 / 10)
  assert hole.mean() == pytest.approx(expect, rel=0.05)
  assert np.all(out[~hole] == 1)


@pytest.fixture(scope="module")
def dae_run(tmp_path_factory):
  """A DAE trained for 20 steps on the tiny sprites."""
  workdir = str(tmp_path_factory.mktemp("dae"))
  config = tiny_sprites_config(num_steps=20)
  config.objective.kind = "dae"
  config.log.figures = False
  train_lib.train_and_evaluate(config, workdir)
  return workdir


def _dae_config(dae_workdir, layer="Dense_0"):
  config = tiny_sprites_config(num_steps=10)
  config.objective.kind, config.objective.beta = "beta_vae_dae", 3.0
  config.objective.dae_workdir, config.objective.dae_layer = dae_workdir, layer
  return config


def test_dae_run_logs_its_pixel_loss(dae_run):
  rows = [json.loads(line) for line in open(f"{dae_run}/metrics.jsonl")]
  assert rows[-1]["train/loss"] == pytest.approx(-rows[-1]["train/dae_log_lik_nats"])
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_beta_vae_dae_holds_the_dae_frozen_and_its_loss_is_features_plus_beta_kl(dae_run):
  config = _dae_config(dae_run)
  x = np.random.default_rng(0).integers(0, 2, (8, 64, 64, 1)).astype(np.uint8) * 255
  exp = experiment.build(config, (64, 64, 1), 1000)
  assert set(exp.optimizers) == {"vae"}  # the "dae" group is frozen
  state = exp.init_state(state_lib.Keys.from_seed(0).init)
  trained = checkpoint.read_group(dae_run, "vae")
  jax.tree.map(np.testing.assert_array_equal, state.params["dae"], trained)
  new, metrics = jax.jit(exp.train_step())(state, x, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, new.params["dae"], trained)
  assert not jax.tree.all(jax.tree.map(np.array_equal, new.params["vae"], state.params["vae"]))
  assert float(metrics["loss"]) == pytest.approx(
      float(metrics["dae_feature_sqerr"]) + 3.0 * float(metrics["kl_nats"]), rel=1e-5)
  # The plain ELBO is reported beside the loss, which is not one.
  assert float(metrics["elbo_nats"]) == pytest.approx(
      float(metrics["log_lik_nats"]) - float(metrics["kl_nats"]), rel=1e-5)
  assert float(metrics["loss"]) != pytest.approx(-float(metrics["elbo_nats"]), rel=1e-3)


def test_the_features_of_the_head_are_the_encoders_mean(dae_run):
  objective = experiment.build(_dae_config(dae_run, "mean"), (64, 64, 1), 1000).objective
  x = jax.random.uniform(jax.random.key(0), (3, 64, 64, 1))
  params = jax.tree.map(jnp.asarray, objective.dae.params)
  mean, _ = objective.dae.model.apply(params, x, method="encode")
  np.testing.assert_allclose(objective.dae.features(params, x), mean, rtol=1e-6)
  assert darla.encoder_layers(objective.dae.model, (64, 64, 1)) == ["Dense_0", "log_scale",
                                                                    "mean"]


def test_beta_vae_dae_refuses_a_missing_or_wrong_dae(dae_run, tmp_path):
  with pytest.raises(ConfigError, match="dae_workdir='' holds no config.json"):
    experiment.build(_dae_config(""), (64, 64, 1), 1000)
  with pytest.raises(ConfigError, match="dae_layer='Dense_7' is not a layer.*'Dense_0'"):
    experiment.build(_dae_config(dae_run, "Dense_7"), (64, 64, 1), 1000)
  with pytest.raises(ConfigError, match="do not fit the model of its config.json"):
    experiment.build(_dae_config(dae_run), (32, 32, 1), 1000)
  other = tiny_sprites_config()
  (tmp_path / "config.json").write_text(json.dumps(other.to_dict()))
  with pytest.raises(ConfigError, match="objective.kind='elbo', not 'dae'"):
    experiment.build(_dae_config(str(tmp_path)), (64, 64, 1), 1000)


def test_transfer_scores_predictors_trained_on_source_codes_on_other_domains():
  rng = np.random.default_rng(0)
  factors = np.stack([rng.integers(0, 3, 900), rng.integers(0, 4, 900)], axis=1)
  source = factors + 0.1 * rng.normal(size=factors.shape)
  shifted = source + np.array([0.0, 1.0])  # the second factor's latent moves by a class
  out = disentanglement.transfer(source[:600], factors[:600],
                                 {"source": source[600:], "same": source[600:].copy(),
                                  "shifted": shifted[600:]}, factors[600:], seed=0)
  for predictor in ("forest", "linear"):
    acc = out[predictor]
    assert np.all(acc["source"] > 0.95) and np.array_equal(acc["same"], acc["source"])
    assert acc["shifted"][0] > 0.95 and acc["shifted"][1] < 0.5


def test_transfer_of_a_run_and_its_table(tmp_path):
  config = tiny_sprites_config(num_steps=10)
  config.log.figures = False
  train_lib.train_and_evaluate(config, str(tmp_path))
  run = restore.restore_run(str(tmp_path))
  out = evaluate.transfer_of_run(run, ["dim", "noise"], parallel.make_mesh())
  assert out["domains"] == ["source", "dim", "noise"]
  assert (out["num_train"], out["num_test"]) == evaluate.factor_sample_sizes(1000)
  for by_domain in out["accuracy"].values():
    assert set(by_domain) == {"source", "dim", "noise"}
    assert all(0 <= v <= 1 for d in by_domain.values() for v in d["per_factor"].values())
  table = evaluate.transfer_markdown({"tiny": out})
  assert "| tiny | forest accuracy (%) |" in table and "| tiny | MIG |" in table
  evaluate.write_transfer(run, ["dim"], str(tmp_path))
  paths = figures.draw_transfer([str(tmp_path)], str(tmp_path / "out"))
  name = tmp_path.name
  assert [os.path.basename(p) for p in paths] == [
      "transfer.md", "transfer.png", f"domain_traversals_{name}.png", "compare_images.png"]
  assert json.loads((tmp_path / "out" / "transfer.json").read_text())[name]["domains"] == [
      "source", "dim"]


def test_the_darla_config_variants():
  assert sprites_darla.get_config("dae").objective.kind == "dae"
  assert sprites_darla.get_config("beta_vae").objective.beta == 4.0
  assert sprites_darla.get_config("vae").objective.kind == "elbo"
  assert sprites_darla.get_config("beta_vae_dae").objective.dae_layer == "Dense_1"
  with pytest.raises(ValueError, match="choose one of"):
    sprites_darla.get_config("darla")


def test_a_conv_dae_serves_an_mlp_vae(tmp_path):
  """The DAE is rebuilt from its own run's config: a conv DAE, J at a conv layer, for an MLP."""
  config = tiny_sprites_config(num_steps=2)
  config.objective.kind, config.model.arch = "dae", "conv"
  config.model.conv_channels, config.model.hidden = (4, 8), (16,)
  config.eval.every_steps, config.log.figures = 2, False
  config.data.sprites_subsample = 200  # the DAE need only exist: a fifth of the evaluation
  train_lib.train_and_evaluate(config, str(tmp_path))
  exp = experiment.build(_dae_config(str(tmp_path), "Conv_0"), (64, 64, 1), 1000)
  assert "Conv_0" in darla.encoder_layers(exp.objective.dae.model, (64, 64, 1))
  state = exp.init_state(state_lib.Keys.from_seed(0).init)
  x = jnp.zeros((2, 64, 64, 1), jnp.float32)
  features = jax.jit(exp.objective.dae.features)(state.params["dae"], x)
  assert features.shape == (2, 32 * 32 * 4)  # stride 2, 4 channels: overcomplete for 4,096 pixels
  # Compiled: op by op, every convolution of both networks would compile on its own.
  _, metrics = jax.jit(exp.train_step())(state, np.zeros((2, 64, 64, 1), np.uint8),
                                         jax.random.key(0))
  assert np.isfinite(float(metrics["dae_feature_sqerr"]))
