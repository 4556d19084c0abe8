"""Checkpoints, resume rules and failure handling, in process (tests/test_resume.py kills
real training processes)."""

import functools
import gc
import glob
import errno
import hashlib
import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxvae import checkpoint, data, experiment, parallel, train
from jaxvae.objectives import beta_vae
from jaxvae import rundir
from jaxvae import state as state_lib
from jaxvae import config as config_lib
from tests.conftest import tiny_digits_config


@functools.cache
def _setup(hidden):
  """A tiny digits model, its initial state, its compiled step and a batch."""
  config = tiny_digits_config()
  config.model.hidden = hidden
  exp = experiment.build(config, (8, 8, 1), dataset_size=1500)
  keys = state_lib.Keys.from_seed(0)
  state = exp.init_state(keys.init)
  step = jax.jit(exp.train_step())
  return config, exp, keys, state, step, data.load(config.data).train.images[:32]


def _model_state(hidden=(32,), steps=1):
  """A tiny digits model and its train state after `steps` real updates."""
  config, exp, keys, state, step, x = _setup(hidden)
  for i in range(steps):
    state, _ = step(state, x, jax.random.fold_in(keys.train, i))
  return config, exp, keys, state


def _template(exp, keys):
  return exp.checkpoint_template(keys)


def _bitwise_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
          and all(np.asarray(x).dtype == np.asarray(y).dtype
                  and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb)))


def _tree_digest(path: str) -> str:
  h = hashlib.sha256()
  for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
    if os.path.isfile(f):
      h.update(os.path.relpath(f, path).encode())
      with open(f, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_round_trip_restores_the_full_state_bitwise(tmp_path):
  _, exp, keys, state = _model_state(steps=2)
  progress = {"epoch": 3, "step_in_epoch": 7, "sums": {"loss": 0.1 + 0.2, "steps": 7.0}}
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, 2, {"state": state, "keys": keys.as_dict()}, progress)
  manager.wait_until_finished()
  manager.close()

  sharding = parallel.replicated(parallel.make_mesh())
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  tree, restored_progress = checkpoint.restore(manager, 2, _template(exp, keys), sharding)
  manager.close()
  assert int(state.step) == 2 and int(state.opt_state["vae"][0].count) == 2  # a state worth saving
  assert _bitwise_equal(tree["state"], state)
  for name, key in keys.as_dict().items():
    back = tree["keys"][name]
    assert jax.dtypes.issubdtype(back.dtype, jax.dtypes.prng_key), name
    assert jax.random.key_impl(back) == jax.random.key_impl(key)
    assert np.array_equal(jax.random.key_data(back), jax.random.key_data(key))
  assert restored_progress == progress  # floats survive JSON exactly
  assert all(x.sharding == sharding for x in jax.tree.leaves(tree["state"]))


def test_restore_into_another_model_names_the_mismatch(tmp_path):
  _, _, keys, state = _model_state(hidden=(32,), steps=0)
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, 1, {"state": state, "keys": keys.as_dict()}, {"epoch": 1})
  manager.wait_until_finished()
  _, exp16, _, _ = _model_state(hidden=(16,), steps=0)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.restore(manager, 1, _template(exp16, keys))
  manager.close()
  assert ("state.params.vae.params.encoder.Dense_0.kernel is float32[64,32] in the checkpoint but "
          "float32[64,16] for this config") in str(e.value)


def _three_checkpoints(workdir: str, exp, keys, state):
  """Checkpoints at steps 1, 2, 3 whose params are state.params * step."""
  manager = checkpoint.make_manager(workdir, keep=5)
  states = {}
  for step in (1, 2, 3):
    states[step] = state.replace(params=jax.tree.map(lambda p: p * step, state.params))
    checkpoint.save(manager, step, {"state": states[step], "keys": keys.as_dict()},
                    {"epoch": step, "step_in_epoch": 0, "sums": {}})
    manager.wait_until_finished()
  manager.close()
  return states


def _damage(step_dir: str):
  """Truncates every array data file: what a disk filling up mid-write leaves."""
  files = [f for f in glob.glob(os.path.join(step_dir, "arrays", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


# Orbax leaves an asyncio task behind when a damaged array fails to read; these tests collect
# it (gc) so its warning is raised, and ignored, here rather than in a later test.
_UNREAD_ARRAY_TASK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_UNREAD_ARRAY_TASK
def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, capsys):
  _, exp, keys, state = _model_state()
  states = _three_checkpoints(str(tmp_path), exp, keys, state)
  ckpts = tmp_path / "checkpoints"
  _damage(str(ckpts / "3"))
  damaged_digest = _tree_digest(str(ckpts / "3"))
  os.makedirs(ckpts / "4.orbax-checkpoint-tmp" / "arrays")  # a save the process never finished

  manager = checkpoint.make_manager(str(tmp_path), keep=5)
  step, tree, progress = checkpoint.restore_latest(manager, _template(exp, keys))
  out = capsys.readouterr().out
  assert step == 2 and progress["epoch"] == 2
  assert _bitwise_equal(tree["state"], states[2])
  assert "cannot be read" in out and "resuming from step 2" in out and "never finished" in out
  # Both are kept, untouched, where no later save can collide with them.
  assert _tree_digest(str(tmp_path / "bad_checkpoints" / "3")) == damaged_digest
  assert (tmp_path / "bad_checkpoints" / "4.orbax-checkpoint-tmp").is_dir()
  assert manager.all_steps() == [1, 2]
  checkpoint.save(manager, 3, {"state": states[3], "keys": keys.as_dict()}, {"epoch": 3})
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2, 3]
  manager.close()
  gc.collect()


@_UNREAD_ARRAY_TASK
def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  _, exp, keys, state = _model_state()
  _three_checkpoints(str(tmp_path), exp, keys, state)
  for step in (1, 2, 3):
    _damage(str(tmp_path / "checkpoints" / str(step)))
  before = _tree_digest(str(tmp_path))
  manager = checkpoint.make_manager(str(tmp_path), keep=5)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* can be read"):
    checkpoint.restore_latest(manager, _template(exp, keys))
  manager.close()
  gc.collect()
  assert _tree_digest(str(tmp_path)) == before


def test_unreadable_checkpoints_stop_with_one_clear_error(tmp_path, monkeypatch):
  """A checkpoint this user may not read (chmod 000; root here, so the refusals are faked) is
  set aside, but one it may not move either stops the run, as does an unreadable checkpoints
  directory: each with a CheckpointError naming the path and the fix, nothing moved."""
  _, exp, keys, state = _model_state()
  _three_checkpoints(str(tmp_path), exp, keys, state)
  ckpts = str(tmp_path / "checkpoints")
  manager = checkpoint.make_manager(str(tmp_path), keep=5)
  listdir, denied = os.listdir, set()

  def guarded_listdir(path="."):
    if os.fspath(path) in denied:
      raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
    return listdir(path)

  def no_rename(src, dst):
    raise PermissionError(errno.EACCES, "Permission denied", src)

  monkeypatch.setattr(os, "listdir", guarded_listdir)
  monkeypatch.setattr(os, "rename", no_rename)
  denied.add(os.path.join(ckpts, "3"))
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.restore_latest(manager, _template(exp, keys))
  assert f"checkpoint {ckpts}/3 cannot be read (PermissionError" in str(error.value)
  assert "cannot be moved aside" in str(error.value) and f"chmod -R u+rwX {ckpts}/3" in str(
      error.value)
  denied.add(ckpts)
  with pytest.raises(checkpoint.CheckpointError, match=f"{ckpts} cannot be read or changed "
                     r"\(Permission denied: .*chmod -R u\+rwX"):
    checkpoint.restore_latest(manager, _template(exp, keys))
  monkeypatch.undo()
  manager.close()
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]


def test_non_finite_step_is_skipped_and_counted():
  _, _, keys, state, step, x = _setup((32,))
  leaves, treedef = jax.tree.flatten(state.params)
  poisoned = state.replace(params=jax.tree.unflatten(
      treedef, [leaves[0].at[0].set(jnp.nan)] + leaves[1:]))

  after1, m1 = step(poisoned, x, keys.train)
  after2, m2 = step(after1, x, keys.train)
  assert bool(m1["skipped"]) and bool(m2["skipped"])
  assert _bitwise_equal(after2.params, poisoned.params)
  assert _bitwise_equal(after2.opt_state, poisoned.opt_state)
  assert (int(after2.step), int(after2.skips)) == (2, 2)

  healed = after2.replace(params=state.params)
  after3, m3 = step(healed, x, keys.train)
  assert not bool(m3["skipped"]) and int(after3.skips) == 0 and int(after3.step) == 3
  assert not _bitwise_equal(after3.params, state.params)
  assert np.isfinite(float(m3["loss"]))


def _nan_gradients(monkeypatch):
  """Makes `beta_vae.beta_elbo_loss` finite but its gradient with respect to the first parameter NaN
  (d/dp sqrt(0 * |p|) = inf * 0)."""
  real_loss = beta_vae.beta_elbo_loss

  def loss(params, rng, x, **kwargs):
    value, metrics = real_loss(params, rng, x, **kwargs)
    return value + jnp.sqrt(0.0 * jnp.abs(jax.tree.leaves(params)[0]).sum()), metrics

  monkeypatch.setattr(beta_vae, "beta_elbo_loss", loss)


def _step_with_nan_gradients(monkeypatch, mode: str):
  """A compiled train step in skip mode `mode` whose gradients are NaN and loss finite."""
  config, exp, keys, state, _, x = _setup((32,))
  _nan_gradients(monkeypatch)
  config = config.copy_and_resolve_references()
  config.optimizer.skip_nonfinite = mode
  return jax.jit(experiment.build(config, (8, 8, 1), dataset_size=1500).train_step()), state, x, keys


@pytest.mark.parametrize("mode,skipped", [("grads", True), ("loss", False), ("off", False)])
def test_skip_nonfinite_modes_check_what_they_say(monkeypatch, mode, skipped):
  step, state, x, keys = _step_with_nan_gradients(monkeypatch, mode)
  after, m = step(state, x, keys.train)
  assert np.isfinite(float(m["loss"]))
  assert bool(m["skipped"]) == skipped and int(after.step) == 1
  params_finite = all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(after.params))
  assert params_finite == skipped  # an unchecked NaN gradient reaches the parameters
  if skipped:
    assert _bitwise_equal(after.params, state.params) and int(after.skips) == 1


def test_skip_on_loss_skips_a_non_finite_loss(monkeypatch):
  config, exp, keys, state, _, x = _setup((32,))
  config = config.copy_and_resolve_references()
  config.optimizer.skip_nonfinite = "loss"
  step = jax.jit(experiment.build(config, (8, 8, 1), dataset_size=1500).train_step())
  leaves, treedef = jax.tree.flatten(state.params)
  poisoned = state.replace(params=jax.tree.unflatten(
      treedef, [leaves[0].at[0].set(jnp.nan)] + leaves[1:]))
  after, m = step(poisoned, x, keys.train)
  assert bool(m["skipped"]) and _bitwise_equal(after.params, poisoned.params)


def test_resume_rules_split_frozen_and_allowed_keys():
  saved = json.loads(tiny_digits_config().to_json_best_effort())
  current = tiny_digits_config()
  current.num_epochs = 9
  current.log.chunks_per_epoch = 3
  current.optimizer.max_consecutive_skips = 5
  current.model.latent_dim = 3
  current.optimizer.learning_rate = 0.1
  current.seed = 4
  frozen, allowed = config_lib.resume_changes(saved, json.loads(current.to_json_best_effort()))
  assert frozen == {"model.latent_dim": (4, 3), "optimizer.learning_rate": (1e-3, 0.1),
                    "seed": (0, 4)}
  assert allowed == {"num_epochs": (2, 9), "log.chunks_per_epoch": (10, 3),
                     "optimizer.max_consecutive_skips": (20, 5)}
  # A key newer than the saved run is no change at its default, and frozen otherwise.
  del saved["model"]["decoder_mean"]
  assert config_lib.resume_changes(saved, json.loads(tiny_digits_config().to_json_best_effort())) \
      == ({}, {})
  changed = tiny_digits_config()
  changed.model.decoder_mean = "identity"
  frozen, _ = config_lib.resume_changes(saved, json.loads(changed.to_json_best_effort()))
  assert frozen == {"model.decoder_mean": ("<absent>", "identity")}


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
  """A finished 1-epoch tiny digits run; tests copy its workdir before touching it."""
  workdir = str(tmp_path_factory.mktemp("one_epoch"))
  result = train.train_and_evaluate(tiny_digits_config(num_epochs=1), workdir)
  return workdir, result


def _copy(workdir, tmp_path) -> str:
  dst = str(tmp_path / "run")
  shutil.copytree(workdir, dst)
  return dst


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _no_compute(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("data.load ran: the check must come before any compute")
  monkeypatch.setattr(data, "load", refuse)


def test_frozen_key_change_is_refused_before_compute(one_epoch_run, tmp_path, monkeypatch):
  workdir = _copy(one_epoch_run[0], tmp_path)
  before = _tree_digest(workdir)
  config = tiny_digits_config(num_epochs=3)
  config.model.latent_dim = 3
  config.batch_size = 16
  _no_compute(monkeypatch)
  with pytest.raises(rundir.RunError) as e:
    train.train_and_evaluate(config, workdir)
  assert "batch_size: 32 in the run, 16 now" in str(e.value)
  assert "model.latent_dim: 4 in the run, 3 now" in str(e.value)
  assert "--overwrite" in str(e.value)
  assert _tree_digest(workdir) == before


def test_overwrite_deletes_the_old_run_then_starts_over(one_epoch_run, tmp_path, monkeypatch):
  workdir = _copy(one_epoch_run[0], tmp_path)
  config = tiny_digits_config()
  config.model.latent_dim = 3
  _no_compute(monkeypatch)
  with pytest.raises(AssertionError, match="data.load ran"):  # got past the workdir check
    train.train_and_evaluate(config, workdir, overwrite=True)
  assert not any(os.path.exists(os.path.join(workdir, name)) for name in rundir.RUN_FILES)


def test_unwritable_workdir_fails_before_compute(tmp_path, monkeypatch):
  _no_compute(monkeypatch)
  (tmp_path / "a_file").write_text("")
  with pytest.raises(rundir.RunError, match="cannot be written"):
    train.train_and_evaluate(tiny_digits_config(), str(tmp_path / "a_file" / "run"))
  if os.geteuid() != 0:  # root writes through permission bits
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(rundir.RunError, match="cannot be written"):
      train.train_and_evaluate(tiny_digits_config(), str(locked))


def _poison(monkeypatch, fraction: float, record: list):
  """Makes `beta_vae.beta_elbo_loss` non-finite on a pseudo-random `fraction` of the steps, and
  records each step's choice (from inside the compiled step)."""
  real_loss = beta_vae.beta_elbo_loss

  def loss(params, rng, x, **kwargs):
    value, metrics = real_loss(params, rng, x, **kwargs)
    bad = jax.random.uniform(jax.random.fold_in(rng, 7)) < fraction
    jax.debug.callback(lambda b: record.append(bool(b)), bad)
    scale = jnp.where(bad, jnp.nan, 1.0)
    return value * scale, {k: v * scale for k, v in metrics.items()}

  monkeypatch.setattr(beta_vae, "beta_elbo_loss", loss)


def test_sporadic_non_finite_steps_are_skipped_and_counted(one_epoch_run, tmp_path, monkeypatch):
  workdir = _copy(one_epoch_run[0], tmp_path)
  record = []
  _poison(monkeypatch, 0.25, record)
  train.train_and_evaluate(tiny_digits_config(num_epochs=2), workdir)
  rows = _rows(workdir)
  assert [r["epoch"] for r in rows] == [1, 2]
  assert rows[0]["train/skipped_steps"] == 0
  assert len(record) == 46 and 0 < sum(record) < 46
  assert rows[1]["train/skipped_steps"] == sum(record)
  assert np.isfinite(rows[1]["train/loss"]) and np.isfinite(rows[1]["test/elbo_nats"])


def test_too_many_skips_stop_with_the_last_checkpoint_intact(one_epoch_run, tmp_path,
                                                             monkeypatch):
  workdir = _copy(one_epoch_run[0], tmp_path)
  ckpt_digest = _tree_digest(os.path.join(workdir, "checkpoints"))
  _poison(monkeypatch, 1.0, [])
  config = tiny_digits_config(num_epochs=3)
  config.optimizer.max_consecutive_skips = 4  # may change on resume
  with pytest.raises(rundir.RunError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "non-finite" in message and "max_consecutive_skips=4" in message
  assert "last good checkpoint, step 46, is intact" in message
  assert _tree_digest(os.path.join(workdir, "checkpoints")) == ckpt_digest
  assert [r["epoch"] for r in _rows(workdir)] == [1]
  with open(os.path.join(workdir, "config_changes.jsonl")) as f:
    change = json.loads(f.readline())
  assert change == {"step": 46, "epoch": 1, "changes": {
      "num_epochs": [1, 3], "optimizer.max_consecutive_skips": [20, 4]}}


def test_first_signal_asks_to_stop_and_a_second_acts_at_once():
  # From the handlers a python process starts with, whatever earlier tests' libraries set.
  original = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
              signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
  try:
    with pytest.raises(KeyboardInterrupt):
      with train._StopRequest() as stop:
        # raise_signal, not os.kill: with JAX's threads about, a process-wide signal may land
        # on another thread and reach the Python handler only after the block is left.
        signal.raise_signal(signal.SIGTERM)  # runs the Python handler before returning
        assert stop.signum == signal.SIGTERM  # still alive, asked to stop
        # The same signal again at once: one request delivered twice (to a process group and
        # passed on by a multi-process run's supervising parent), not a second one.
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  finally:
    for signum, handler in original.items():
      signal.signal(signum, handler)


def test_skipping_off_changes_no_figure_and_stops_at_a_non_finite_loss(one_epoch_run, tmp_path,
                                                                     monkeypatch):
  config = tiny_digits_config(num_epochs=1)
  config.optimizer.skip_nonfinite = "off"
  workdir = str(tmp_path / "off")
  train.train_and_evaluate(config, workdir)
  # Without non-finite steps the check only ever kept the new values: the same run, up to how
  # XLA fuses the two programs (bitwise under some compile flags, a float32 rounding under others).
  (row,), (ref,) = _rows(workdir), _rows(one_epoch_run[0])
  assert row.keys() == ref.keys()
  for key in row:
    if "seconds" not in key and "per_s" not in key:
      np.testing.assert_allclose(row[key], ref[key], rtol=1e-6, err_msg=key)

  ckpt_digest = _tree_digest(os.path.join(workdir, "checkpoints"))
  _poison(monkeypatch, 1.0, [])
  config.num_epochs = 2
  with pytest.raises(rundir.RunError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "skip_nonfinite='off'" in message and "last checkpoint, step 46, is intact" in message
  assert _tree_digest(os.path.join(workdir, "checkpoints")) == ckpt_digest
  assert len(_rows(workdir)) == 1


def test_unchecked_nan_gradients_stop_the_run_before_any_checkpoint_holds_them(
    one_epoch_run, tmp_path, monkeypatch):
  config = tiny_digits_config(num_epochs=1)
  config.optimizer.skip_nonfinite = "loss"
  workdir = str(tmp_path / "loss")
  train.train_and_evaluate(config, workdir)
  ckpt_digest = _tree_digest(os.path.join(workdir, "checkpoints"))
  _nan_gradients(monkeypatch)
  config.num_epochs = 2
  with pytest.raises(rundir.RunError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "parameters became non-finite in epoch 2" in message
  assert "skip_nonfinite='loss'" in message and "last checkpoint, step 46, is intact" in message
  assert _tree_digest(os.path.join(workdir, "checkpoints")) == ckpt_digest


def test_a_failed_background_save_stops_the_run_at_once_with_one_clear_error(tmp_path,
                                                                               monkeypatch, capfd,
                                                                               caplog):
  """A full disk, simulated: every save after the first (step 46) fails in orbax's writer
  thread, as it writes the JSON items (progress and metrics). Orbax's own reports of it (each
  with a traceback) go to a file the message names, not to the terminal."""
  original = ocp.handlers.JsonCheckpointHandler._save_fn

  async def full_disk(self, item, directory):
    if "/checkpoints/46." not in str(directory):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "progress"))
    return await original(self, item, directory)

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", full_disk)
  config = tiny_digits_config(num_epochs=4)
  config.log.tensorboard = False
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "No space left on device" in message and "The last good checkpoint is step 46" in message
  assert "free space" in message and "rerun the same command" in message
  reports = tmp_path / "checkpoint_errors.log"
  assert f"orbax's own reports: {reports}" in message
  assert "Traceback" in reports.read_text() and "No space left on device" in reports.read_text()
  terminal = capfd.readouterr()
  assert "Traceback" not in terminal.err + terminal.out, terminal.err[-3000:]
  assert not [r for r in caplog.records if r.exc_info or "No space" in r.getMessage()]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len(rows) < 4  # it stopped in the epoch after the failed save, not at the end
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", original)
  resumed = train.train_and_evaluate(config, str(tmp_path))  # space freed: the same command
  assert int(resumed.state.step) == 4 * 46 and [r["epoch"] for r in resumed.history][0] == 2


def test_a_mid_period_save_logs_no_orbax_warning(tmp_path, caplog):
  _, _, keys, state = _model_state(steps=1)
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  with caplog.at_level(logging.WARNING):
    checkpoint.save(manager, 1, {"state": state, "keys": keys.as_dict()},
                    {"epoch": 0, "step_in_epoch": 1, "sums": {}})
    checkpoint.close(manager)
  assert not [r for r in caplog.records if "tracked_metric" in r.getMessage()]
  assert os.path.isdir(tmp_path / "checkpoints" / "1")


def test_a_checkpoint_from_before_named_groups_restores_into_the_vae_group(tmp_path):
  """Before parameter groups had names, the state held the model's parameters and one
  optimizer state directly: such a checkpoint restores into the group "vae", bitwise."""
  _, exp, keys, state = _model_state(steps=1)
  old = state.replace(params=state.params["vae"], opt_state=state.opt_state["vae"])
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, 1, {"state": old, "keys": keys.as_dict()},
                  {"epoch": 0, "step_in_epoch": 1, "sums": {}})
  checkpoint.close(manager)
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  with pytest.raises(checkpoint.CheckpointError, match="state.params.vae.params.encoder"):
    checkpoint.restore(manager, 1, _template(exp, keys))  # no legacy layout given
  step, tree, _ = checkpoint.restore_latest(manager, _template(exp, keys),
                                            legacy=exp.legacy_checkpoint(_template(exp, keys)))
  assert step == 1 and _bitwise_equal(tree["state"], state)
  manager.close()
