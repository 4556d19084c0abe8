"""The VAE-GAN (jaxvae/objectives/vae_gan.py) on Larsen et al.'s networks at a tiny width, on
the 8x8 digits: gradient routing, the balance, batch statistics through skips and resumes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_digits_config
from jaxvae import config as config_lib
from jaxvae import experiment, figures, restore, train
from jaxvae.errors import ConfigError
from jaxvae.objectives import vae_gan
from jaxvae.state import Keys

SHAPE = (8, 8, 1)


def _config(num_epochs: int = 1, **objective):
  config = tiny_digits_config(num_epochs)
  config.model.arch = "larsen"
  config.model.conv_channels, config.model.hidden = (4, 8), (16,)
  config.model.decoder_channels = (8, 4)
  config.model.likelihood = "gaussian"
  config.data.binarize = "none"
  config.objective.kind = "vae_gan"
  config.objective.disc_channels, config.objective.disc_hidden = (4, 8, 8), 16
  config.objective.feature_layer = 2
  config.objective.update(objective)
  config.log.tensorboard = False
  config_lib.validate(config)
  return config


def _params_and_batch(exp):
  params = exp.init_state(jax.random.key(0)).params
  x = jax.random.uniform(jax.random.key(1), (16,) + SHAPE)
  return params, x


def _sum(tree) -> float:
  return float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))


def test_each_network_learns_from_its_own_loss_only():
  # A wide margin opens both gates, so each gradient is its loss's alone.
  exp = experiment.build(_config(margin=100.0), SHAPE, 1000)
  obj, (params, x) = exp.objective, _params_and_batch(exp)
  rng = jax.random.key(2)
  got = jax.jit(obj.gradients)(params, rng, x, jnp.int32(0))
  eps_key, prior_key = jax.random.split(rng)
  noise = [jax.random.normal(k, (16, exp.model.code_dim)) for k in (eps_key, prior_key)]

  @jax.jit
  def reference(params):
    # The gradient of a weighted sum of terms is the pullback of those weights (0 elsewhere)
    # through the whole pass; one forward pass serves every sum.
    t, pullback = jax.vjp(lambda p: obj.terms(p["vae"], p["discriminator"], x, *noise)[0],
                          params)

    def term(weights, group):
      return pullback({k: jnp.asarray(weights.get(k, 0.0), v.dtype) for k, v in t.items()})[0][
          group]
    w = obj.cfg.recon_weight
    return {"enc": term({"kl": 1.0, "llike": 1.0}, "vae")["params"]["encoder"],
            "dec": term({"llike": w, "gen_loss": 1 - w}, "vae")["params"]["decoder"],
            "disc": term({"disc_loss": 1.0}, "discriminator"),
            "gan_to_encoder": term({"gen_loss": 1.0}, "vae")["params"]["encoder"],
            "llike_to_disc": term({"llike": 1.0}, "discriminator")}

  want = reference(params)
  vae_grads = got.grads["vae"]["params"]
  for name, mine in (("enc", vae_grads["encoder"]), ("dec", vae_grads["decoder"]),
                     ("disc", got.grads["discriminator"])):
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(want[name])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=name)
  # The routing matters: these gradients exist and are left out.
  assert _sum(want["gan_to_encoder"]) > 0 and _sum(want["llike_to_disc"]) > 0
  assert _sum(got.grads["vae"]["batch_stats"]) == 0
  assert set(got.collections) == {"vae", "discriminator"}
  assert float(got.metrics["update_decoder"]) == float(got.metrics["update_discriminator"]) == 1


@pytest.mark.parametrize("real,fake,dec,dis", [
    (0.7, 0.7, True, True),      # near equilibrium: both train
    (0.2, 0.7, True, False),     # the discriminator wins on the reals: it waits
    (0.7, 0.2, True, False),
    (1.2, 0.7, False, True),     # it loses: the decoder waits
    (0.2, 1.2, True, True),      # both would wait: both train
])
def test_the_balance_holds_back_the_winner(real, fake, dec, dis):
  got = vae_gan.balance(jnp.float32(real), jnp.float32(fake), 0.68, 0.35)
  assert (bool(got[0]), bool(got[1])) == (dec, dis)


def test_a_held_back_network_gets_no_gradient():
  for equilibrium, held, moved in ((100.0, "discriminator", "decoder"),
                                   (-100.0, "decoder", "discriminator")):
    exp = experiment.build(_config(equilibrium=equilibrium, margin=0.0), SHAPE, 1000)
    params, x = _params_and_batch(exp)
    got = jax.jit(exp.objective.gradients)(params, jax.random.key(2), x, jnp.int32(0))
    by_name = {"decoder": got.grads["vae"]["params"]["decoder"],
               "discriminator": got.grads["discriminator"]}
    assert _sum(by_name[held]) == 0 and _sum(by_name[moved]) > 0, equilibrium
    assert _sum(got.grads["vae"]["params"]["encoder"]) > 0  # the encoder always trains


def test_a_nonfinite_discriminator_is_skipped_alone_with_its_batch_statistics():
  # variant "vae": the discriminator only watches, so a NaN there cannot reach the VAE.
  exp = experiment.build(_config(variant="vae"), SHAPE, 1000)
  state = exp.init_state(jax.random.key(0))
  disc = state.params["discriminator"]
  bias = disc["params"]["Dense_1"]["bias"]
  disc = {**disc, "params": {**disc["params"], "Dense_1": {"kernel": disc["params"]["Dense_1"][
      "kernel"], "bias": bias.at[0].set(jnp.nan)}}}
  state = state.replace(params={**state.params, "discriminator": disc})
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16,) + SHAPE), jnp.uint8)
  new, metrics = jax.jit(exp.train_step())(state, x, jax.random.key(3))
  assert bool(metrics["skipped"]) and int(new.skips) == 1
  for a, b in zip(jax.tree.leaves((new.params["discriminator"], new.opt_state["discriminator"])),
                  jax.tree.leaves((disc, state.opt_state["discriminator"]))):
    np.testing.assert_array_equal(a, b)  # batch statistics included
  for col in ("params", "batch_stats"):  # the VAE's step went through
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new.params["vae"][col],
                           state.params["vae"][col])
    assert all(jax.tree.leaves(changed)), col


def _steps(num_steps: int):
  config = _config()
  config.num_steps, config.eval.every_steps, config.eval.batch_size = num_steps, 3, 400
  return config


def test_a_run_trains_resumes_bit_for_bit_and_evaluates_with_running_averages(tmp_path):
  whole = train.train_and_evaluate(_steps(6), str(tmp_path / "whole"))
  last = whole.history[-1]
  assert {"train/d_real", "train/d_recon", "train/d_sample", "train/llike",
          "train/update_decoder"} <= last.keys()
  assert np.isfinite(last["test/elbo_nats"])
  split = str(tmp_path / "split")
  train.train_and_evaluate(_steps(3), split)
  resumed = train.train_and_evaluate(_steps(6), split)
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  run = restore.restore_run(split)
  assert set(run.params) == {"params", "batch_stats"}
  paths = figures.draw_comparison([str(tmp_path / "whole"), split], str(tmp_path / "cmp"))
  for path in paths:  # drawn at their declared sizes
    name = os.path.splitext(os.path.basename(path))[0]
    with Image.open(path) as im:
      assert im.size == tuple(round(v * figures.DPI) for v in figures.FIGSIZES[name])
  fresh = experiment.build(_steps(6), SHAPE, 1500).init_state(Keys.from_seed(0).init)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         fresh.params["vae"]["batch_stats"], run.params["batch_stats"])
  assert all(jax.tree.leaves(changed))  # the running averages moved in training


def test_bad_settings_name_the_key():
  config = _config()
  config.objective.kind = "elbo"
  with pytest.raises(ConfigError, match="holds batch norm"):
    experiment.build(config, SHAPE, 1000)
  config = _config()
  config.model.arch = "mlp"
  with pytest.raises(ConfigError, match="config.model.arch='larsen'"):
    config_lib.validate(config)
  config = _config()
  config.objective.feature_layer = 4
  with pytest.raises(ConfigError, match="feature_layer=4"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="multiples of 4"):
    experiment.build(_config(), (10, 10, 1), 1000)


def test_the_cifar_config_builds_the_authors_networks():
  from configs import cifar10_vae_gan
  config = cifar10_vae_gan.get_config()
  config_lib.validate(config)
  config_lib.validate(cifar10_vae_gan.get_config("quarter"))
  exp = experiment.build(config, (32, 32, 3), 50000)
  params = jax.eval_shape(lambda key: exp.objective.init(key, (32, 32, 3)), jax.random.key(0))
  shapes = lambda tree: [leaf.shape for leaf in jax.tree.leaves(tree)
                         if len(leaf.shape) == 4]  # the conv kernels, by module name
  assert shapes(params["vae"]["params"]["encoder"]) == [(5, 5, 3, 64), (5, 5, 64, 128),
                                                        (5, 5, 128, 256)]
  assert shapes(params["vae"]["params"]["decoder"]) == [(5, 5, 256, 192), (5, 5, 192, 128),
                                                        (5, 5, 128, 32), (5, 5, 32, 3)]
  assert shapes(params["discriminator"]["params"]) == [(5, 5, 3, 32), (5, 5, 32, 128),
                                                       (5, 5, 128, 192), (5, 5, 192, 256)]
  assert params["vae"]["params"]["decoder"]["Dense_0"]["kernel"].shape == (128, 4 * 4 * 256)
