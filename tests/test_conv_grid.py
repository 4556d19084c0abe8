"""The conv model with a code that has spatial extent (`model.arch="conv_grid"`): its shapes on
any image size, that each code cell sees only its neighbourhood, and a run through training and
the evaluate command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_conv_config
from jaxvae import config as config_lib
from jaxvae import evaluate, models, restore
from jaxvae import train as train_lib
from jaxvae.errors import ConfigError


def _model(shape, channels=(4, 8), z=3, likelihood="discretized_logistic"):
  cfg = config_lib.base_config().model
  cfg.arch, cfg.conv_channels, cfg.latent_channels, cfg.likelihood = (
      "conv_grid", channels, z, likelihood)
  return models.make_model(cfg, shape)


@pytest.mark.parametrize("shape,grid", [((32, 32, 3), (8, 8)), ((7, 9, 1), (2, 3)),
                                        ((13, 20, 2), (4, 5))])
def test_the_code_is_a_grid_at_the_last_conv_and_decodes_to_the_image_shape(shape, grid):
  model = _model(shape)
  assert model.encoder.grid == grid and model.code_dim == grid[0] * grid[1] * 3

  def encode_decode(x):
    params = models.init_params(model, jax.random.key(0), shape)
    mean, log_scale = model.apply(params, x, method=models.VAE.encode)
    return mean, log_scale, model.apply(params, mean, method=models.VAE.decode)

  mean, log_scale, obs = jax.eval_shape(encode_decode, jnp.zeros((2,) + shape))
  assert mean.shape == log_scale.shape == (2, model.code_dim)
  assert obs["mean"].shape == obs["log_scale"].shape == (2,) + shape


def test_each_code_cell_sees_only_its_neighbourhood_and_decodes_only_its_neighbourhood():
  shape = (32, 32, 1)
  model = _model(shape)
  params = models.init_params(model, jax.random.key(0), shape)
  encode = lambda x: model.apply(params, x, method=models.VAE.encode)[0].reshape(8, 8, 3)
  x = jax.random.uniform(jax.random.key(1), (1,) + shape)
  moved = encode(x.at[0, 31, 31, 0].add(1.0)) - encode(x)
  # The bottom-right pixel reaches the cells near it (two 4x4 stride-2 convs, a 3x3 head) and
  # no cell in the top-left: a dense code would change everywhere.
  assert float(jnp.abs(moved[-1, -1]).max()) > 0
  assert float(jnp.abs(moved[:5, :5]).max()) == 0
  decode = lambda z: model.apply(params, z, method=models.VAE.decode)["mean"][0, ..., 0]
  z = jnp.zeros((1, model.code_dim))
  changed = decode(z.reshape(1, 8, 8, 3).at[0, 0, 0].add(1.0).reshape(1, -1)) - decode(z)
  assert float(jnp.abs(changed[:4, :4]).max()) > 0
  assert float(jnp.abs(changed[16:, 16:]).max()) == 0


def test_the_grid_needs_positive_latent_channels():
  config = tiny_conv_config()
  config.model.arch, config.model.latent_channels = "conv_grid", 0
  with pytest.raises(ConfigError, match="latent_channels"):
    config_lib.validate(config)


def test_a_grid_code_run_trains_and_the_evaluate_command_reads_its_code(tmp_path):
  config = tiny_conv_config(num_epochs=3)
  config.model.arch, config.model.latent_channels = "conv_grid", 2
  config.log.tensorboard = False
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  rows = result.history
  assert rows[-1]["test/elbo_nats"] > rows[0]["test/elbo_nats"]
  run = restore.restore_run(str(tmp_path))
  assert run.model.code_dim == 2 * 2 * 2  # digits 8x8 -> 4x4 -> 2x2, two channels
  scored = evaluate.evaluate_run(run, iw_samples=4, name="grid")
  assert scored["latent_dim"] == 8 and len(scored["kl_per_dim_nats"]) == 8
  assert np.isfinite(scored["vae"]["iwae_nats"]) and scored["pca"]
