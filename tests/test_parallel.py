"""Data parallelism: the same program on 1 or 4 devices and on 2 processes gives the same run.

JAX fixes its devices when it starts, so every multi-device run is a subprocess: forced CPU
devices (JAX_NUM_CPU_DEVICES), or two local processes joined by jax.distributed over loopback
with gloo collectives.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO, tiny_digits_config
from jaxvae import restore, train

# Metrics and checkpoints only: figures (matplotlib) and TensorBoard are tested elsewhere.
TINY = ["--config", "configs/digits.py", "--config.model.hidden=(64,)",
        "--config.model.latent_dim=4", "--config.log.progress=False",
        "--config.log.figures=False", "--config.log.tensorboard=False"]
TIMEOUT_S = 240


def _env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_all(commands: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
  """Runs the commands side by side (they may wait on each other); kills all at the deadline."""
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd, env in zip(commands, envs)]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
          for p, (out, err) in zip(procs, outs)]


def _train(workdir, devices: int, *overrides) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "train.py", *TINY, "--workdir", str(workdir), *overrides]
  (p,) = _run_all([cmd], [_env(devices)])
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def _train_two_processes(workdir, *overrides) -> list[subprocess.CompletedProcess]:
  address = f"127.0.0.1:{_free_port()}"
  cmds = [[sys.executable, "train.py", *TINY, "--workdir", str(workdir), *overrides,
           f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
          for i in range(2)]
  procs = _run_all(cmds, [_env(1), _env(1)])
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"
  return procs


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(rows, ref_rows, rel):
  """Every train/ and test/ figure of every epoch, timings aside."""
  assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
  for r, ref in zip(rows, ref_rows):
    keys = [k for k in ref if k.startswith(("train/", "test/"))
            and not k.endswith(("seconds", "images_per_s"))]
    assert "train/loss" in keys and "test/elbo_nats" in keys
    for k in keys:
      assert r[k] == pytest.approx(ref[k], rel=rel, abs=0), (r["epoch"], k)


def _final_params(workdir) -> list[np.ndarray]:
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(restore.restore_run(str(workdir)).state.params)]


def _python(script: str, devices: int) -> dict:
  (p,) = _run_all([[sys.executable, "-c", textwrap.dedent(script)]], [_env(devices)])
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_batches_are_split_over_devices_and_the_state_is_replicated():
  out = _python("""
    import json
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from configs import digits
    from jaxvae import experiment, parallel, train
    from jaxvae import state as state_lib

    mesh = parallel.make_mesh()
    images = np.arange(200, dtype=np.uint8).reshape(200, 1, 1, 1)  # pixel value = index
    idx = np.random.default_rng(0).permutation(200)[:96].reshape(3, 32)
    batches = parallel.gather_batches(images, idx, mesh)
    shards_ok = all(s.data.shape == (3, 8, 1, 1, 1)
                    and np.array_equal(np.asarray(s.data)[..., 0, 0, 0], idx[s.index[:2]])
                    for s in batches.addressable_shards)

    config = digits.get_config()
    config.model.hidden, config.model.latent_dim = (32,), 4
    exp = experiment.build(config, (8, 8, 1), dataset_size=2 * config.batch_size)
    keys = state_lib.Keys.from_seed(0)
    state = jax.device_put(exp.init_state(keys.init), parallel.replicated(mesh))
    chunk = train.make_train_chunk(exp.train_step(), mesh, "scan")
    images = np.random.default_rng(1).integers(0, 256, (64, 8, 8, 1), np.uint8)
    batches = parallel.gather_batches(images, np.arange(64).reshape(2, 32), mesh)
    no_signal = parallel.signal_array(0, mesh)
    compiled = chunk.lower(state, batches, np.ones(2, bool), keys.train, no_signal).compile()
    state_in, batches_in = compiled.input_shardings[0][:2]
    state, _ = compiled(state, batches, np.ones(2, bool), keys.train, no_signal)
    try:
      parallel.check_batch_divides(30, mesh)
      message = ""
    except ValueError as e:
      message = str(e)
    print(json.dumps({
        "devices": len(mesh.devices.flat), "shards_ok": shards_ok,
        "batch_spec": str(batches_in.spec),
        "state_in_replicated": all(s.is_fully_replicated for s in jax.tree.leaves(state_in)),
        "state_out_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state)),
        "step": int(state.step), "message": message}))
  """, devices=4)
  assert out["devices"] == 4
  assert out["shards_ok"]  # each device holds exactly its 8 rows of each of the 3 batches
  assert out["batch_spec"] == "P(None, 'data')"
  assert out["state_in_replicated"] and out["state_out_replicated"]
  assert out["step"] == 2
  assert "config.batch_size=30 does not divide over 4 devices" in out["message"]
  assert "multiple of 4" in out["message"]


def test_each_process_gathers_only_its_own_rows_of_every_batch():
  script = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jaxvae import parallel
    parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import jax
    from jax.experimental import multihost_utils

    class Recording:
      def __init__(self, a):
        self.a, self.shape, self.read = a, a.shape, set()
      def __getitem__(self, i):
        self.read.update(np.asarray(i).ravel().tolist())
        return self.a[i]

    images = np.arange(64, dtype=np.uint8).reshape(64, 1, 1, 1)  # pixel value = index
    idx = np.random.default_rng(0).permutation(64)[:48].reshape(3, 16)
    recording = Recording(images)
    batches = parallel.gather_batches(recording, idx, parallel.make_mesh())
    full = np.asarray(multihost_utils.process_allgather(batches, tiled=True))
    print(json.dumps({"read": sorted(recording.read), "process": jax.process_index(),
                      "full": full[..., 0, 0, 0].tolist()}), flush=True)
    if jax.process_index() == 1:  # the coordinator's process exits first: both must still exit 0
      import time; time.sleep(2)
  """)
  address = f"127.0.0.1:{_free_port()}"
  procs = _run_all([[sys.executable, "-c", script, address, str(i)] for i in range(2)],
                   [_env(1), _env(1)])
  idx = np.random.default_rng(0).permutation(64)[:48].reshape(3, 16)
  for i, p in enumerate(procs):
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["process"] == i
    assert out["read"] == sorted(idx[:, 8 * i:8 * (i + 1)].ravel().tolist())
    assert out["full"] == idx.tolist()  # together the processes hold every batch in order


@pytest.mark.slow
def test_four_devices_follow_the_one_device_trajectory(tmp_path):
  one, four = tmp_path / "one", tmp_path / "four"
  config = tiny_digits_config(num_epochs=2)  # TINY's settings; this process has one device
  config.log.tensorboard = False
  train.train_and_evaluate(config, str(one))
  _train(four, 4, "--config.num_epochs=2")
  rows1, rows4 = _rows(one), _rows(four)
  assert [r["step"] for r in rows4] == [r["step"] for r in rows1] == [46, 92]
  # Per-device partial sums reorder the float additions of the batch mean, nothing else
  # (seen: 4e-8 relative in the metrics, 6e-8 in the parameters after 92 steps).
  _assert_same_metrics(rows4, rows1, rel=1e-5)
  for p1, p4 in zip(_final_params(one), _final_params(four)):
    np.testing.assert_allclose(p4, p1, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_they_resume(tmp_path):
  """A signal reaches one process (as a preempted host's would); both stop at the same chunk
  with one checkpoint, where before the other one hung in its next collective. Resumed, the
  two processes finish bitwise the run of one process on two devices (the same program, the
  gradient sum over gloo instead of in process), and only process 0 reports and writes."""
  # One step per chunk (46 in an epoch), so the stop lands mid-epoch 2.
  small = ["--config.log.chunks_per_epoch=1000", "--config.num_epochs=2"]
  reference, multi = tmp_path / "two_devices", tmp_path / "two_processes"
  _train(reference, 2, *small)
  address = f"127.0.0.1:{_free_port()}"
  cmds = [[sys.executable, "train.py", *TINY, "--workdir", str(multi), *small,
           f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]
          for i in range(2)]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd in cmds]
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not (multi / "metrics.jsonl").exists():  # epoch 1 written: epoch 2 is under way
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs[0][1][-3000:]
  assert "SIGTERM: saved checkpoint" in outs[0][0]
  stopped = restore.restore_run(str(multi))
  assert stopped.progress["epoch"] in (1, 2) and len(_rows(multi)) == stopped.progress["epoch"]

  resumed = _train_two_processes(multi, *small)
  assert f"resumed from step {int(stopped.state.step)}" in resumed[0].stdout
  assert "epoch" not in outs[1][0] + resumed[1].stdout  # only process 0 reports
  _assert_same_metrics(_rows(multi), _rows(reference), rel=0)  # each epoch written once
  for p, ref in zip(_final_params(multi), _final_params(reference)):
    np.testing.assert_array_equal(p, ref)


def test_initialize_needs_all_three_settings_or_none(monkeypatch):
  from jaxvae import parallel
  for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize() is False  # a single-process run: nothing to join
  with pytest.raises(ValueError, match="num_processes, process_id not set"):
    parallel.initialize(coordinator_address="127.0.0.1:1234")
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
    parallel.initialize(coordinator_address="127.0.0.1:1234", process_id=0)
