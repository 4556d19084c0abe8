"""The dSprites configs and their models: disentanglement_lib's conv nets (arch "locatello"),
the beta-VAE MLP with a deeper decoder (model.decoder_hidden), and a few training steps each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sprites_beta_vae, sprites_locatello
from jaxvae import config as config_lib
from jaxvae import data, experiment, loops, models, parallel
from jaxvae import state as state_lib
from jaxvae import train as train_lib

SPRITE = (64, 64, 1)


def _abstract_params(model, shape):
  """The model's parameters as shapes, never allocated."""
  return jax.eval_shape(lambda key: models.init_params(model, key, shape), jax.random.key(0))


def _param_sizes(model, shape) -> dict[str, int]:
  """{"encoder/Conv_0": parameters of that layer}."""
  flat = jax.tree_util.tree_flatten_with_path(_abstract_params(model, shape)["params"])[0]
  sizes = {}
  for path, leaf in flat:
    layer = "/".join(p.key for p in path[:-1])
    sizes[layer] = sizes.get(layer, 0) + int(np.prod(leaf.shape))
  return sizes


def _encode_decode(model, shape, batch=3):
  """(mean, log_scale, likelihood parameters) for a batch of zeros, shapes only."""
  def run(x):
    params = models.init_params(model, jax.random.key(0), shape)
    mean, log_scale = model.apply(params, x, method=models.VAE.encode)
    return mean, log_scale, model.apply(params, mean, method=models.VAE.decode)
  return jax.eval_shape(run, jax.ShapeDtypeStruct((batch,) + shape, jnp.float32))


def test_locatello_arch_is_disentanglement_libs_conv_encoder_and_deconv_decoder():
  model = models.make_model(sprites_locatello.get_config().model, SPRITE)
  conv = lambda k, c_in, c_out: k * k * c_in * c_out + c_out
  dense = lambda n_in, n_out: n_in * n_out + n_out
  assert _param_sizes(model, SPRITE) == {
      "encoder/Conv_0": conv(4, 1, 32), "encoder/Conv_1": conv(4, 32, 32),
      "encoder/Conv_2": conv(2, 32, 64), "encoder/Conv_3": conv(2, 64, 64),
      "encoder/Dense_0": dense(4 * 4 * 64, 256),
      "encoder/mean": dense(256, 10), "encoder/log_scale": dense(256, 10),
      "decoder/Dense_0": dense(10, 256), "decoder/Dense_1": dense(256, 4 * 4 * 64),
      "decoder/ConvTranspose_0": conv(4, 64, 64), "decoder/ConvTranspose_1": conv(4, 64, 32),
      "decoder/ConvTranspose_2": conv(4, 32, 32), "decoder/ConvTranspose_3": conv(4, 32, 1)}
  assert sum(_param_sizes(model, SPRITE).values()) == 690_517
  mean, log_scale, obs = _encode_decode(model, SPRITE)
  assert mean.shape == log_scale.shape == (3, 10)
  assert obs["logits"].shape == (3,) + SPRITE and obs["logits"].dtype == jnp.float32


def test_locatello_arch_fits_other_multiples_of_16_and_refuses_the_rest():
  cfg = sprites_locatello.get_config().model
  cfg.likelihood = "discretized_logistic"  # two outputs per channel
  _, _, obs = _encode_decode(models.make_model(cfg, (32, 48, 3)), (32, 48, 3))
  assert obs["mean"].shape == obs["log_scale"].shape == (3, 32, 48, 3)
  with pytest.raises(ValueError, match=r"arch='locatello' needs .* multiples of 16.* not 28x28"):
    models.make_model(cfg, (28, 28, 1))


def test_locatello_arch_in_bfloat16_convolves_in_bfloat16_and_returns_float32():
  cfg = sprites_locatello.get_config().model
  cfg.compute_dtype = "bfloat16"
  model = models.make_model(cfg, SPRITE)
  params = _abstract_params(model, SPRITE)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = jax.ShapeDtypeStruct((2,) + SPRITE, jnp.float32)
  jaxpr = jax.make_jaxpr(model.apply)(params, x)  # traced only: XLA:CPU's bf16 convs are slow
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 8  # 4 convolutions and 4 transposed ones
  assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in convs)
  assert jax.eval_shape(model.apply, params, x)["logits"].dtype == jnp.float32


def test_decoder_hidden_gives_the_decoder_its_own_widths_from_z_outward():
  cfg = sprites_beta_vae.get_config().model
  sizes = _param_sizes(models.make_model(cfg, SPRITE), SPRITE)
  # Higgins et al. 2017 (dSprites): 4096-1200-1200 -> z = 10 -> 1200-1200-1200-4096.
  assert sizes == {"encoder/Dense_0": 4096 * 1200 + 1200, "encoder/Dense_1": 1200 * 1200 + 1200,
                   "encoder/mean": 1200 * 10 + 10, "encoder/log_scale": 1200 * 10 + 10,
                   "decoder/Dense_0": 10 * 1200 + 1200, "decoder/Dense_1": 1200 * 1200 + 1200,
                   "decoder/Dense_2": 1200 * 1200 + 1200, "decoder/Dense_3": 1200 * 4096 + 4096}
  assert sum(sizes.values()) == 14_196_516
  cfg.hidden, cfg.decoder_hidden = (8,), (5, 7)
  for arch in ("mlp", "conv"):
    cfg.arch = arch
    model = models.make_model(cfg, (8, 8, 1))
    decoder = _abstract_params(model, (8, 8, 1))["params"]["decoder"]
    assert decoder["Dense_0"]["kernel"].shape == (10, 5)
    assert decoder["Dense_1"]["kernel"].shape == (5, 7)
  cfg.decoder_hidden = ()  # the default mirrors hidden
  assert _param_sizes(models.make_model(cfg, (8, 8, 1)), (8, 8, 1))["decoder/Dense_0"] == 10 * 8 + 8


def test_decoder_hidden_of_non_positive_widths_is_refused():
  config = sprites_beta_vae.get_config()
  config.model.decoder_hidden = (1200, 0)
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.decoder_hidden=\(1200, 0\)"):
    config_lib.validate(config)


def test_configs_hold_their_papers_settings():
  beta = sprites_beta_vae.get_config()
  assert (beta.objective.beta, beta.batch_size, beta.model.latent_dim) == (4.0, 64, 10)
  locatello = sprites_locatello.get_config()
  assert (locatello.num_steps, locatello.batch_size, locatello.optimizer.learning_rate,
          locatello.objective.beta) == (300_000, 64, 1e-4, 1.0)
  for config in (beta, locatello):
    config_lib.validate(config)
    assert config.data.source == "sprites" and config.model.likelihood == "bernoulli"


@pytest.mark.parametrize("module", [
    sprites_beta_vae, pytest.param(sprites_locatello, marks=pytest.mark.slow)])
def test_config_trains_a_few_steps_on_a_tiny_subset(module, tmp_path):
  """The config's data, objective, optimizer and model (the MLP narrowed, its deeper decoder
  kept) through the trainer's compiled chunk; batches of 8, as XLA:CPU convolves slowly in it."""
  config = module.get_config()
  config.data.sprites_subsample, config.batch_size = 16, 8
  if config.model.arch == "mlp":
    config.model.hidden, config.model.decoder_hidden = (32, 32), (32, 32, 32)
  config.data.cache_dir = str(tmp_path)
  config_lib.validate(config)
  ds = data.load(config.data)
  data.check_pixels_fit(ds, config.model.likelihood, config.data.binarize)
  mesh = parallel.make_mesh()
  exp = experiment.build(config, ds.image_shape, 16)
  keys = state_lib.Keys.from_seed(config.seed)
  state = jax.jit(exp.init_state)(keys.init)
  before = jax.device_get(state.params)
  chunk = train_lib.make_train_chunk(exp.train_step(), mesh, loops.resolve(config, mesh, exp.model))
  idx, valid = train_lib.epoch_batches(keys.shuffle, 0, 16, 8, start=0, chunk_steps=3)
  assert valid.tolist() == [[True, True, False]]  # the epoch's 2 steps, in a padded chunk
  state, sums = chunk(state, parallel.gather_batches(ds.train.images, np.asarray(idx[0]), mesh),
                      valid[0], keys.train, parallel.signal_array(0, mesh))
  assert int(state.step) == 2 and int(sums["steps"]) == 2 and int(sums["skipped_steps"]) == 0
  assert np.isfinite(float(sums["loss"])) and bool(sums["params_finite"])
  after = jax.device_get(state.params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)))
