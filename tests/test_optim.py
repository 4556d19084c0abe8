"""The optimizer: Adam's keys, the learning-rate schedules, their checks, and exact resume."""

import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvae import config as config_lib
from jaxvae import optim, parallel, train
from tests.conftest import tiny_digits_config

IWAE_ENDS = (1, 4, 13, 40, 121, 364, 1093, 3280)


def _grads(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}


def _bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_default_keys_give_the_adam_of_before_bitwise():
  tx, ref = optim.make_optimizer(config_lib.base_config().optimizer, 46), optax.adam(1e-3)
  params = _grads(0)
  state, ref_state = tx.init(params), ref.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)  # old checkpoints restore
  for i in range(3):
    updates, state = tx.update(_grads(i + 1), state, params)
    ref_updates, ref_state = ref.update(_grads(i + 1), ref_state, params)
    assert _bytes(updates) == _bytes(ref_updates)
  assert _bytes(state) == _bytes(ref_state)


def _is_schedule(s):
  return isinstance(s, optax.ScaleByScheduleState)


def _lr(opt_cfg, steps_per_epoch, step):
  return float(optim.learning_rate(opt_cfg, steps_per_epoch)(jnp.int32(step)))


def test_iwae_schedule_is_the_papers_formula_at_each_stage():
  opt = config_lib.base_config().optimizer
  opt.schedule = "iwae"
  ends, rates = optim.schedule_stages(opt)
  assert ends == IWAE_ENDS and sum(3 ** i for i in range(8)) == 3280
  spe = 3000  # MNIST at batch 20
  for i, (start, end) in enumerate(zip((0,) + IWAE_ENDS[:-1], IWAE_ENDS)):
    want = float(np.float32(1e-3 * 10 ** (-i / 7)))  # Burda et al.: 3^i passes at this rate
    assert end - start == 3 ** i
    for step in (start * spe, end * spe - 1):
      assert _lr(opt, spe, step) == want, (i, step)
  assert _lr(opt, spe, 1093 * spe) == pytest.approx(1e-4, rel=1e-6)


def test_piecewise_schedule_and_the_optimizer_follows_it():
  opt = config_lib.base_config().optimizer
  opt.schedule, opt.stage_end_epochs, opt.stage_learning_rates = "piecewise", (2, 5), (0.1, 0.01)
  assert [_lr(opt, 10, s) for s in (0, 19, 20, 49)] == [np.float32(0.1)] * 2 + [
      np.float32(0.01)] * 2
  # Adam's first update of a gradient of ones is -lr / (1 + eps): at schedule count 20 the
  # second stage's rate, whatever Adam's own count.
  tx = optim.make_optimizer(opt, 10)
  params = {"w": jnp.zeros(4)}
  state = jax.tree.map(lambda s: s._replace(count=jnp.int32(20)) if _is_schedule(s) else s,
                       tx.init(params), is_leaf=_is_schedule)
  updates, _ = tx.update({"w": jnp.ones(4)}, state, params)
  np.testing.assert_allclose(updates["w"], -0.01 / (1 + 1e-8), rtol=1e-5)  # float32 moments


@pytest.mark.parametrize("changes,message", [
    ({"optimizer.eps": 0.0}, "config.optimizer.eps=0.0 must be a positive float"),
    ({"optimizer.eps": -1e-4}, "config.optimizer.eps=-0.0001 must be a positive float"),
    ({"optimizer.b1": 1.0}, "config.optimizer.b1=1.0 must be in [0, 1)"),
    ({"optimizer.b2": -0.1}, "config.optimizer.b2=-0.1 must be in [0, 1)"),
    ({"optimizer.schedule": "cosine"}, "config.optimizer.schedule='cosine' is not allowed"),
    ({"optimizer.schedule": "iwae", "num_epochs": 3281},
     "config.optimizer.schedule='iwae' ends at epoch 3280"),
    ({"optimizer.schedule": "piecewise", "optimizer.stage_end_epochs": (1, 3),
      "optimizer.stage_learning_rates": (1e-3, 1e-4), "num_epochs": 4},
     "ends at epoch 3 (stage ends (1, 3)) but config.num_epochs=4"),
    ({"optimizer.schedule": "piecewise"}, "needs one config.optimizer.stage_learning_rates"),
    ({"optimizer.schedule": "piecewise", "optimizer.stage_end_epochs": (2, 4),
      "optimizer.stage_learning_rates": (1e-3,)},
     "needs one config.optimizer.stage_learning_rates"),
    ({"optimizer.schedule": "piecewise", "optimizer.stage_end_epochs": (3, 2),
      "optimizer.stage_learning_rates": (1e-3, 1e-4)},
     "config.optimizer.stage_end_epochs=(3, 2) must be positive ints in increasing order"),
    ({"optimizer.schedule": "piecewise", "optimizer.stage_end_epochs": (2, 4),
      "optimizer.stage_learning_rates": (1e-3, 0.0)},
     "config.optimizer.stage_learning_rates=(0.001, 0.0) must be positive"),
])
def test_bad_optimizer_keys_stop_at_start_naming_the_key(changes, message):
  config = tiny_digits_config()
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


def _schedule_config():
  """Tiny digits (46 steps an epoch, 3 chunks of 16) on the IWAE schedule: epoch 1 is stage
  0, epoch 2 the start of stage 1."""
  config = tiny_digits_config(num_epochs=2)
  config.log.chunks_per_epoch = 3
  config.optimizer.schedule = "iwae"
  config.optimizer.eps = 1e-4
  return config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(("seconds", "_per_s"))}
            for line in f]


def test_a_run_stopped_mid_stage_resumes_the_schedule_bitwise(tmp_path, monkeypatch):
  reference = train.train_and_evaluate(_schedule_config(), str(tmp_path / "reference"))

  # SIGTERM as the first chunk sees it: the run stops after the second, mid-epoch 1 (stage 0).
  real, calls = parallel.signal_array, []
  def signal_array(signum, mesh):
    calls.append(signum)
    return real(signal.SIGTERM if len(calls) == 1 else signum, mesh)
  monkeypatch.setattr(parallel, "signal_array", signal_array)
  workdir = str(tmp_path / "stopped")
  stopped = train.train_and_evaluate(_schedule_config(), workdir)
  assert stopped.stopped_by == "SIGTERM" and int(stopped.state.step) == 32
  monkeypatch.setattr(parallel, "signal_array", real)

  resumed = train.train_and_evaluate(_schedule_config(), workdir)
  assert int(resumed.state.step) == 92
  counts = [int(s.count) for s in jax.tree.leaves(resumed.state.opt_state, is_leaf=_is_schedule)
            if _is_schedule(s)]
  assert counts == [92]
  assert _bytes(resumed.state) == _bytes(reference.state)
  assert _rows(workdir) == _rows(str(tmp_path / "reference"))
  assert math.isfinite(_rows(workdir)[-1]["test/elbo_nats"])


def test_a_run_in_steps_is_checked_against_the_schedule_in_epochs(tmp_path):
  config = tiny_digits_config(num_epochs=2)  # num_epochs is ignored once num_steps is set
  config.optimizer.schedule = "piecewise"
  config.optimizer.stage_end_epochs, config.optimizer.stage_learning_rates = (1,), (1e-3,)
  config.log.tensorboard = False
  config.num_steps = 46  # exactly epoch 1 of 46 steps: inside the schedule
  config_lib.validate(config)
  assert int(train.train_and_evaluate(config, str(tmp_path / "fits")).state.step) == 46
  config.num_steps = 47
  config_lib.validate(config)  # the epoch length is not known before the data is
  with pytest.raises(config_lib.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / "too_long"))
  assert ("ends at epoch 1 (stage ends (1,)) but config.num_steps=47 runs into epoch 2 (46 steps "
          "an epoch)") in str(e.value)
  assert os.listdir(tmp_path / "too_long") == []  # refused before writing anything
