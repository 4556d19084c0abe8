"""docs/extending.md's three examples, run as the page shows them: an objective with a second
network and optimizer, a model, a dataset. Each is one module that registers itself."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_digits_config
from jaxvae import data, experiment, models, objectives, restore, train
from jaxvae import config as config_lib
from jaxvae.state import Keys

PAGE = (REPO / "docs" / "extending.md").read_text()


def _example(name: str) -> types.ModuleType:
  """The code block after `<!-- example: NAME -->` in docs/extending.md, run as a module."""
  code = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", PAGE, re.S).group(1)
  module = types.ModuleType(f"extending_{name}")
  exec(compile(code, f"docs/extending.md ({name})", "exec"), module.__dict__)
  return module


@pytest.fixture(scope="module")
def registered():
  """Runs the three examples (registering their kind, arch and source), then unregisters."""
  modules = {name: _example(name) for name in ("objective", "model", "dataset")}
  yield modules
  objectives.KINDS.pop("latent_critic")
  models.BUILDERS.pop("gated_mlp")
  data.LOADERS.pop("bars")


def _critic_config(num_epochs):
  config = tiny_digits_config(num_epochs)
  config.objective.kind, config.objective.critic_weight = "latent_critic", 0.5
  config.log.tensorboard = False
  return config


def test_the_objective_trains_two_groups_and_resumes_bit_for_bit(registered, tmp_path):
  whole = train.train_and_evaluate(_critic_config(3), str(tmp_path / "whole"))
  first_rows = whole.history[0]
  assert {"train/critic_loss", "train/critic_accuracy", "train/elbo_nats"} <= first_rows.keys()
  assert whole.history[-1]["train/critic_accuracy"] > 0.6  # it tells codes from prior draws
  assert whole.history[-1]["test/elbo_nats"] > whole.history[0]["test/elbo_nats"]
  fresh = experiment.build(_critic_config(3), (8, 8, 1), 1500).init_state(Keys.from_seed(0).init)
  for group in ("vae", "critic"):  # both groups trained, each with its own optimizer state
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), fresh.params[group],
                         whole.state.params[group])
    assert all(jax.tree.leaves(moved)), group
  assert set(whole.state.opt_state) == {"vae", "critic"}
  split = str(tmp_path / "split")
  train.train_and_evaluate(_critic_config(2), split)
  resumed = train.train_and_evaluate(_critic_config(3), split)
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(whole.state)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert list(restore.restore_run(split).state.params) == ["critic", "vae"]


def test_each_group_learns_from_its_own_loss_and_the_critic_never_reaches_the_vae(registered):
  exp = experiment.build(_critic_config(1), (8, 8, 1), 1500)
  params = exp.init_state(jax.random.key(0)).params
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
  step = jnp.int32(0)
  _, grads, _ = jax.jit(exp.objective.gradients)(params, jax.random.key(2), x, step)
  loss_of = lambda group: lambda p: exp.objective.gradients(p, jax.random.key(2), x, step)[0][group]
  critic_grads = jax.jit(jax.grad(loss_of("critic")))(params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(critic_grads["vae"]))
  for group in ("vae", "critic"):  # each group's update is its own loss's gradient, no other's
    own = jax.jit(jax.grad(loss_of(group)))(params)[group]
    for got, want in zip(jax.tree.leaves(grads[group]), jax.tree.leaves(own)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_the_model_and_the_dataset_train_through_the_config(registered, tmp_path):
  config = tiny_digits_config(num_epochs=2)
  config.model.arch, config.data.source = "gated_mlp", "bars"
  config.log.tensorboard = False
  config.eval.batch_size = 200
  config_lib.validate(config)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.history[-1]["test/elbo_nats"] > result.history[0]["test/elbo_nats"]
  run = restore.restore_run(str(tmp_path))
  assert isinstance(run.model.encoder, registered["model"].GatedMLPEncoder)
  assert run.dataset.name == "bars" and run.dataset.factor_names == ("orientation", "position")
  assert not run.model.has_convolutions


def test_a_network_that_does_not_say_whether_it_convolves_is_refused(registered):
  import flax.linen as nn

  class Silent(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x.reshape(x.shape[0], -1)), nn.Dense(2)(x.reshape(x.shape[0], -1))

  model = models.VAE(Silent(), registered["model"].GatedMLPDecoder(8, (8, 8, 1), 1), (8, 8, 1))
  with pytest.raises(TypeError, match="Silent must say whether it holds convolutions"):
    model.has_convolutions


def test_a_non_finite_group_is_skipped_while_the_others_step():
  import optax
  from jaxvae import step as step_lib
  from jaxvae.objectives import base
  from jaxvae.state import TrainState

  class TwoGroups(base.Objective):  # no `kind`: not registered
    def init(self, rng, image_shape):
      return {"a": jnp.ones(3), "b": jnp.ones(3)}

    def optimizers(self, steps_per_epoch):
      return {"a": optax.sgd(0.1), "b": optax.sgd(0.1)}

    def gradients(self, params, rng, x, step):
      loss_a = lambda p: (p ** 2).sum()
      loss_b = lambda p: jnp.log(p - 1.0).sum()  # -inf with inf gradients at p = 1
      losses = {"a": loss_a(params["a"]), "b": loss_b(params["b"])}
      grads = {"a": jax.grad(loss_a)(params["a"]), "b": jax.grad(loss_b)(params["b"])}
      return losses, grads, {"loss": losses["a"] + losses["b"]}

  config = tiny_digits_config()
  config.data.binarize = "none"
  objective = TwoGroups(config, None)
  params = objective.init(None, None)
  txs = objective.optimizers(1)
  state = TrainState(jnp.int32(0), params, {k: tx.init(params[k]) for k, tx in txs.items()},
                     jnp.int32(0))
  step = jax.jit(step_lib.make_train_step(objective, txs, config))
  x = jnp.zeros((2, 8, 8, 1), jnp.uint8)
  after, metrics = step(state, x, jax.random.key(0))
  np.testing.assert_allclose(after.params["a"], 0.8)  # 1 - 0.1 * 2
  np.testing.assert_array_equal(after.params["b"], 1.0)  # its update was skipped
  assert bool(metrics["skipped"]) and int(after.skips) == 1 and int(after.step) == 1
  healed = after.replace(params={"a": after.params["a"], "b": jnp.full(3, 2.0)})
  again, metrics = step(healed, x, jax.random.key(1))
  np.testing.assert_allclose(again.params["b"], 1.9)  # 2 - 0.1 / (2 - 1)
  assert not bool(metrics["skipped"]) and int(again.skips) == 0
