"""configs/mnist_iwae.py (Burda et al. 2016, Table 1): its model, the init options, the mean
image the decoder starts at, and a few real steps on the MNIST copy."""

import jax
import numpy as np
import pytest

from configs import mnist_iwae
from conftest import MNIST_TGZ, needs, tiny_digits_config
from jaxvae import config as config_lib
from jaxvae import data, evaluate, experiment, models, optim, parallel, train
from jaxvae import state as state_lib

MNIST_SHAPE = (28, 28, 1)


def _mnist_config():
  config = mnist_iwae.get_config()
  config.data.path = str(MNIST_TGZ)
  return config


def _params(model_cfg, shape, pixel_mean=None, abstract=False):
  """The initial parameters (their shapes only if `abstract`), compiled as one call."""
  model = models.make_model(model_cfg, shape, pixel_mean)
  init = lambda: models.init_params(model, jax.random.key(0), shape)["params"]
  return jax.eval_shape(init) if abstract else jax.jit(init)()


def test_config_is_the_papers_784_200_200_50_model():
  config = _mnist_config()
  config_lib.validate(config)
  params = _params(config.model, MNIST_SHAPE, np.full(MNIST_SHAPE, 0.5), abstract=True)
  shapes = jax.tree.map(lambda p: p.shape, params)
  assert shapes["encoder"] == {
      "Dense_0": {"kernel": (784, 200), "bias": (200,)},
      "Dense_1": {"kernel": (200, 200), "bias": (200,)},
      "mean": {"kernel": (200, 50), "bias": (50,)},
      "log_scale": {"kernel": (200, 50), "bias": (50,)}}
  assert shapes["decoder"] == {
      "Dense_0": {"kernel": (50, 200), "bias": (200,)},
      "Dense_1": {"kernel": (200, 200), "bias": (200,)},
      "Dense_2": {"kernel": (200, 784), "bias": (784,)}}
  encoder = (784 * 200 + 200) + (200 * 200 + 200) + 2 * (200 * 50 + 50)
  decoder = (50 * 200 + 200) + (200 * 200 + 200) + (200 * 784 + 784)
  assert encoder + decoder == 425_284 == models.count_params(params)
  model = models.make_model(config.model, MNIST_SHAPE, np.full(MNIST_SHAPE, 0.5))
  assert model.encoder.activation is model.decoder.activation is jax.numpy.tanh
  assert (model.likelihood, config.data.binarize) == ("bernoulli", "dynamic")
  assert (config.batch_size, config.num_epochs, config.eval.iw_samples) == (20, 3280, 5000)
  assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.999, 1e-4)
  assert optim.schedule_stages(config.optimizer)[0][-1] == config.num_epochs


def test_config_without_a_data_path_says_how_to_give_one():
  with pytest.raises(config_lib.ConfigError, match="needs config.data.path"):
    config_lib.validate(mnist_iwae.get_config())


@pytest.mark.parametrize("init", ["glorot_uniform", "lecun_normal"])
def test_kernel_init_draws_every_kernel_at_its_scale(init):
  cfg = _mnist_config().model
  cfg.kernel_init = init
  params = _params(cfg, MNIST_SHAPE, np.full(MNIST_SHAPE, 0.5))
  kernels = [k for path, k in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == "kernel"]
  assert len(kernels) == 7
  for w in map(np.asarray, kernels):
    fan_in, fan_out = w.shape
    if init == "glorot_uniform":  # U(-a, a), a = sqrt(6 / (fan_in + fan_out)): variance a^2 / 3
      limit = (6 / (fan_in + fan_out)) ** 0.5
      assert 0.99 * limit < np.abs(w).max() <= limit
      assert w.std() == pytest.approx(limit / 3 ** 0.5, rel=0.03)
    else:  # flax's default: a truncated normal of variance 1 / fan_in
      assert w.std() == pytest.approx(fan_in ** -0.5, rel=0.03)


def test_output_bias_starts_at_the_logit_of_the_training_mean():
  config = tiny_digits_config()  # 8x8, dynamically binarized, Bernoulli
  train_images = np.random.default_rng(0).integers(0, 256, (100, 8, 8, 1), np.uint8)
  train_images[:, 0] = 0  # a blank row, as MNIST's borders: the clip keeps its logit finite
  mean = data.pixel_mean(train_images, config.data.binarize)
  np.testing.assert_allclose(mean, train_images.mean(axis=0) / 255, rtol=1e-6)
  assert not np.asarray(_params(config.model, (8, 8, 1), mean)["decoder"]["Dense_1"]["bias"]).any()

  config.model.output_bias_init = "data_mean"
  bias = np.asarray(_params(config.model, (8, 8, 1), mean)["decoder"]["Dense_1"]["bias"])
  p = np.clip(mean.ravel().astype(np.float64), 1e-3, 1 - 1e-3)
  np.testing.assert_allclose(bias, np.log(p / (1 - p)), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="needs the training split's mean image"):
    models.make_model(config.model, (8, 8, 1))


def test_output_bias_decodes_to_the_mean_under_each_likelihood():
  cfg = config_lib.base_config().model
  mean = np.array([[[0.25, 0.5, 0.9]]], np.float32)  # [1, 1, 3]
  logit = np.log(mean / (1 - mean))
  for likelihood, decoder_mean, want in [
      ("bernoulli", "sigmoid", logit), ("gaussian", "sigmoid", logit),
      ("gaussian", "identity", mean),
      ("discretized_logistic", "sigmoid", np.concatenate([logit, 0 * logit], -1))]:
    cfg.likelihood, cfg.decoder_mean = likelihood, decoder_mean
    np.testing.assert_allclose(models.output_bias(cfg, mean), want, rtol=1e-6)


def test_pixel_mean_is_the_probability_of_a_one():
  images = np.array([0, 127, 128, 255], np.uint8).reshape(4, 1, 1, 1)
  assert data.pixel_mean(images, "threshold").item() == 0.5
  assert data.pixel_mean(images, "dynamic").item() == pytest.approx(510 / 255 / 4)


@pytest.mark.parametrize("key,value,message", [
    ("kernel_init", "he_normal", "config.model.kernel_init='he_normal' is not allowed"),
    ("output_bias_init", "ones", "config.model.output_bias_init='ones' is not allowed"),
])
def test_bad_init_keys_name_the_key(key, value, message):
  config = tiny_digits_config()
  config.model[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_data_mean_bias_needs_the_mlp_decoder():
  config = tiny_digits_config()
  config.model.arch, config.model.output_bias_init = "conv", "data_mean"
  with pytest.raises(config_lib.ConfigError, match="needs config.model.arch='mlp'"):
    config_lib.validate(config)


@pytest.mark.slow
@needs(MNIST_TGZ)
def test_a_few_steps_on_real_mnist_raise_the_elbo_from_the_mean_image():
  config = _mnist_config()
  config_lib.validate(config)
  ds = data.load(config.data)
  assert (ds.train.images.shape, ds.test.images.shape) == ((60000,) + MNIST_SHAPE,
                                                           (10000,) + MNIST_SHAPE)
  mean = data.pixel_mean(ds.train.images, config.data.binarize)
  assert mean.mean() == pytest.approx(0.1307, abs=1e-4)  # MNIST's mean pixel
  mesh = parallel.make_mesh()
  exp = experiment.build(config, ds.image_shape, len(ds.train.images), mean)
  model = exp.model
  keys = state_lib.Keys.from_seed(config.seed)
  state = jax.jit(exp.init_state)(keys.init)
  test = data.Split(ds.test.images[:10], ds.test.labels[:10])
  config.eval.iw_batch_size, config.eval.iw_chunk = 10, 50

  def test_iwae(params):  # K = 50 on 10 test images; the evaluate command's own code
    out = evaluate.iwae_on_split(model, params, config, test, mesh, keys.eval, num_samples=50)
    assert out["iwae"] > out["elbo"]
    return out["iwae"]

  # The decoder starts at the mean image: near the pixel marginals' -256 nats on these images,
  # far above zero logits' 784 ln(1/2) = -543 nats.
  before = test_iwae(state.params["vae"])
  assert before > -300
  chunk = train.make_train_chunk(exp.train_step(), mesh, "scan")
  idx, valid = jax.device_get(train.epoch_batches(keys.shuffle, 0, len(ds.train.images),
                                                  config.batch_size, 0, 20))
  elbos = []
  for i in range(2):
    batches = parallel.gather_batches(ds.train.images, idx[i], mesh)
    state, sums = chunk(state, batches, valid[i], keys.train, parallel.signal_array(0, mesh))
    assert int(sums["skipped_steps"]) == 0
    elbos.append(float(sums["elbo_nats"]) / int(sums["steps"]))
  assert int(state.step) == 40 and elbos[1] > elbos[0]
  assert test_iwae(state.params["vae"]) > before + 10
