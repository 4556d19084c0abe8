"""Faults of multi-process runs: a process killed without warning ends the others with one
message, the persistent compilation cache cannot take a multi-process CPU run down, and a few
random faults of benchmarks/faults.py resume bit for bit.

Every multi-process run here is two local processes joined over loopback (see
tests/test_parallel.py), with a short heartbeat so that a lost peer is noticed in seconds.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from jaxvae import restore
from test_parallel import TINY, _env, _free_port, _rows, _run_all

HEARTBEAT_S = 5
# The bare peers below are idle between barriers (no compiling), so a shorter one is safe there.
PEER_HEARTBEAT_S = 2

# Two processes in a loop of barriers (collectives), or process 0 waiting outside any collective
# (as in a checkpoint barrier), each watching its peer as train.py does.
PEER_SCRIPT = textwrap.dedent("""
  import sys, time
  from jaxvae import parallel
  address, process_id, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  parallel.initialize(address, 2, process_id, heartbeat_timeout_s=%d)
  parallel.watch_peers(lambda who: f"{who} stopped answering; resume from step 7")
  print("ready", flush=True)
  try:
    i = 0
    while True:
      if mode == "waiting" and process_id == 0:
        time.sleep(1)
      else:
        parallel.barrier(f"step {i}")
        i += 1
  except Exception as e:
    if parallel.peer_failure(e):
      parallel.exit_peer_lost(parallel.lost_peer(e))
    raise
""" % PEER_HEARTBEAT_S)


def _start_peers(mode: str) -> list[subprocess.Popen]:
  address = f"127.0.0.1:{_free_port()}"
  env = _env(1)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # they compile nothing; process 0 would say so first
  procs = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, address, str(i), mode],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  with _reaped(procs, on_error_only=True):
    for p in procs:  # both joined: killing one earlier would stall the other's initialize
      line = p.stdout.readline().strip()
      assert line == "ready", line
  return procs


@contextlib.contextmanager
def _reaped(procs, on_error_only: bool = False):
  """Yields `procs`; on leaving (or only on an exception), kills and reaps whichever still runs,
  so a failed check never leaves a peer looping or a test waiting on its pipe."""
  try:
    yield procs
  except BaseException:
    _reap(procs)
    raise
  if not on_error_only:
    _reap(procs)


def _reap(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.communicate()


def _kill_peer(procs, victim: int = 1) -> str:
  """SIGKILLs process `victim` and waits for the other; returns its stderr. The deadline is
  for a hang only (the run's own bound is the heartbeat timeout)."""
  procs[victim].send_signal(signal.SIGKILL)
  return procs[1 - victim].communicate(timeout=HEARTBEAT_S + 120)[1]


@pytest.mark.parametrize("mode", ["collective", "waiting"])
def test_a_peer_killed_without_warning_ends_the_other_with_one_message(mode):
  """In a collective the survivor learns at once (gloo's connection closes); waiting outside
  one, from the coordinator after the heartbeat timeout. Either way: one line, exit 75, no
  stack trace, where XLA used to abort with hundreds of lines."""
  with _reaped(_start_peers(mode)) as procs:
    time.sleep(0.5)
    err = _kill_peer(procs)
  assert procs[0].returncode == 75, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip() and "Gloo" not in line
           and "recoverable task feature" not in line]
  assert lines == ["error: process 1 stopped answering; resume from step 7"], err[-3000:]


PROGRAM = textwrap.dedent("""
  import json, sys
  import numpy as np
  from jaxvae import parallel
  parallel.initialize(sys.argv[1], 2, int(sys.argv[2]))
  import jax, jax.numpy as jnp
  mesh = parallel.make_mesh()
  x = jax.make_array_from_callback((4, 16), parallel.batch_sharded(mesh),
                                   lambda i: np.arange(32, dtype=np.float32).reshape(2, 16))
  out = jax.jit(lambda x: (jnp.sum(x, 0), jnp.max(x)))(x)
  print(json.dumps({"cache": jax.config.jax_enable_compilation_cache,
                    "out": [np.asarray(o).tolist() for o in out]}), flush=True)
""")


def test_a_second_two_process_cpu_run_with_the_compilation_cache_set_works(tmp_path):
  """A first run used to fill the cache from process 0 alone, and the second to abort in gloo
  (process 0 running cached programs, process 1 fresh ones); now the cache is not used with
  several CPU processes, said once by process 0, and both runs agree."""
  env = {**_env(1), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),  # caching every program
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  runs = []
  for _ in range(2):
    address = f"127.0.0.1:{_free_port()}"
    procs = _run_all([[sys.executable, "-c", PROGRAM, address, str(i)] for i in range(2)],
                     [env, env])
    for p in procs:
      assert p.returncode == 0, p.stderr[-3000:]
    runs.append(procs)
  for procs in runs:
    said = [p.stdout.count("persistent compilation cache") for p in procs]
    assert said == [1, 0]
    assert "jax-ml/jax#38445" in procs[0].stdout
    outs = [json.loads(p.stdout.strip().splitlines()[-1]) for p in procs]
    assert outs[0] == outs[1] and outs[0]["cache"] is False
  assert json.loads(runs[0][0].stdout.splitlines()[-1]) == json.loads(
      runs[1][0].stdout.splitlines()[-1])
  cache = tmp_path / "cache"
  assert not cache.exists() or not any(cache.iterdir())  # nothing cached to disagree on


@pytest.mark.slow
def test_train_py_killed_peer_message_names_the_checkpoint_and_the_command(tmp_path):
  """The real command: process 1 SIGKILLed after epoch 1's checkpoint; process 0 stops with
  one message naming that checkpoint and the command that resumes."""
  workdir = tmp_path / "run"
  address = f"127.0.0.1:{_free_port()}"
  cmds = [[sys.executable, "train.py", *TINY, "--workdir", str(workdir), "--config.num_epochs=2",
           f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
           f"--heartbeat_timeout={HEARTBEAT_S}"] for i in range(2)]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for cmd in cmds]
  with _reaped(procs):
    deadline = time.monotonic() + 240
    while not (workdir / "checkpoints" / "46").exists():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.05)
    err = _kill_peer(procs)
  assert procs[0].returncode == 75, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in err and "Fatal Python error" not in err, err
  assert errors[0].startswith("error: process 1 of this multi-process run stopped answering")
  assert "The last complete checkpoint is step " in errors[0]
  assert f"{workdir}/checkpoints" in errors[0] and "--process_id=0" in errors[0]
  # Running both commands again resumes from that checkpoint: the same two-process resume as
  # test_parallel's SIGTERM test, which checks it bit for bit.


def _start_train_py(workdir, *overrides) -> list[subprocess.Popen]:
  """Both processes of a two-process train.py run, once epoch 1's checkpoint (step 46) is
  complete; process 0 leads a process group of its own (its parent and child, as a shell's job
  would be)."""
  address = f"127.0.0.1:{_free_port()}"
  cmds = [[sys.executable, "train.py", *TINY, "--workdir", str(workdir), *overrides,
           f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
           f"--heartbeat_timeout={HEARTBEAT_S}"] for i in range(2)]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, process_group=0 if i == 0 else None)
           for i, cmd in enumerate(cmds)]
  with _reaped(procs, on_error_only=True):
    deadline = time.monotonic() + 240
    while not (workdir / "checkpoints" / "46").exists():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.05)
  return procs


@pytest.mark.slow
def test_train_py_killed_coordinator_ends_the_other_with_one_message_naming_its_checkpoint(
    tmp_path):
  """kill -9 of process 0, whose coordination service process 1 depends on: jaxlib aborts
  process 1 natively (a FATAL line, a stack trace, SIGABRT), and its supervising parent
  (jaxvae/supervisor.py) turns that into one message naming process 0, the checkpoint and the
  command, exit 75, the abort text in the workdir. Process 1 may see the loss in Python first
  and say so itself; then the abort text, if it comes before the exit, goes to the log too.
  The checkpoint it names restores; test_parallel's SIGTERM test resumes such a two-process
  run bit for bit."""
  workdir = tmp_path / "run"
  with _reaped(_start_train_py(workdir, "--config.num_epochs=2")) as procs:
    err = _kill_peer(procs, victim=0)
  assert procs[1].returncode == 75, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip() and "Gloo" not in line]
  assert len(lines) == 1 and lines[0].startswith(
      "error: process 0 (the coordinator) of this multi-process run stopped answering"), err
  assert "process 1 stopped too" in lines[0] and "--process_id=1" in lines[0]
  step = int(re.search(r"The last complete checkpoint is step (\d+) in (\S+) ", lines[0])[1])
  assert f"{workdir}/checkpoints" in lines[0]
  abort_log = workdir / "abort.process1.log"
  if "XLA's abort text" in lines[0]:
    assert f"XLA's abort text is in {abort_log}" in lines[0]
    assert "detected fatal errors" in abort_log.read_text()
  assert int(restore.restore_run(str(workdir)).state.step) == step


@pytest.mark.slow
def test_train_py_ctrl_c_to_a_process_group_stops_the_run_with_a_checkpoint(tmp_path):
  """SIGINT to process 0's group, as a Ctrl-C: its supervising parent and the child both get
  it, and the parent, which must not die of it (its child would die with it), passes it on.
  The child takes the two as one request (often they reach its handler as one anyway, its main
  thread being in XLA; the rest is _StopRequest.REPEAT_S), so both processes stop with a
  checkpoint, where a second request would end the child at once, unsaved."""
  workdir = tmp_path / "run"
  with _reaped(_start_train_py(workdir, "--config.num_epochs=3")) as procs:
    os.killpg(procs[0].pid, signal.SIGINT)
    outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, outs[0][1][-3000:]
  assert "SIGINT: saved checkpoint" in outs[0][0], outs[0][0][-2000:]


RACING_CHILD = textwrap.dedent("""
    import os, sys
    from jaxvae import supervisor
    if not supervisor.is_child():
      sys.exit(supervisor.supervise(lambda who: f"{who} was lost", sys.argv[1]))
    supervisor.become_child()
    print("error: the child's own message", file=sys.stderr)
    os.write(2, b"E1208 00:00:00.000000 1 coordination_service_agent.cc:289] Polled an error\\n"
                b"F1208 00:00:00.000001 1 client.h:80] Terminating process because the JAX "
                b"distributed service detected fatal errors. Failed to send RPC\\n")
    sys.exit(75)
""")


def test_an_abort_text_racing_the_childs_own_loss_message_stays_off_the_terminal(tmp_path):
  """Process 1 can see process 0's loss in Python first (its own one-line message, exit 75)
  while jaxlib's client thread writes its abort text before the exit: that text goes to the
  abort log, not after the message (seen once in the killed-coordinator test)."""
  log = tmp_path / "abort.process1.log"
  p = subprocess.run([sys.executable, "-c", RACING_CHILD, str(log)], cwd=REPO, text=True,
                     capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert p.returncode == 75
  assert p.stderr.splitlines() == ["error: the child's own message"], p.stderr
  assert "detected fatal errors" in log.read_text()


@contextlib.contextmanager
def _small_tmpfs(path, size_kib: int):
  """A tmpfs of `size_kib` KiB at `path` (root only: the test skips without it)."""
  path.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()[:200]}")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_train_py_on_a_full_disk_stops_with_one_line_on_the_terminal(tmp_path):
  """A real full disk (a 200 KiB tmpfs): orbax's writer threads, asyncio and TensorStore's late
  callbacks report it with a few hundred lines of tracebacks; the terminal shows one `error:`
  line, which names the file that keeps them. With room, the same command resumes."""
  with _small_tmpfs(tmp_path / "disk", 200) as disk:
    cmd = [sys.executable, "train.py", *TINY, "--workdir", str(disk / "run"),
           "--config.num_epochs=3"]
    (full,) = _run_all([cmd], [_env(1)])
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.splitlines() == [full.stderr.strip()], full.stderr[-3000:]
    assert full.stderr.startswith("error: saving a checkpoint in ") and (
        "failed (No space left on device; orbax's own reports: " in full.stderr)
    reports = full.stderr.split("orbax's own reports: ")[1].split(")")[0]
    assert "Traceback" in open(reports).read()
    os.remove(reports)  # in the temporary directory when the full disk refused it
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    (resumed,) = _run_all([cmd], [_env(1)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _rows(disk / "run")] == [1, 2, 3]


@pytest.mark.slow
def test_the_fault_benchmark_resumes_its_trials_bitwise(tmp_path):
  """A random fault of a one-process run (the long benchmark mixes in two-process runs and a
  full disk): the resumed run equals the uninterrupted one bit for bit, no row lost or twice."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/faults.py", "--trials=1", "--seed=3",
       "--two_process_share=0", "--disk_full_share=0", "--unreadable_share=0",
       f"--workdir={tmp_path}"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  trials, summary = lines[:-1], lines[-1]
  assert summary["trials"] == len(trials) == 1
  assert not trials[0]["phase"].startswith("missed"), trials
  assert summary["resumed_bitwise"] == 1, trials
  assert summary["lost_rows"] == summary["duplicated_rows"] == 0
  assert sum(summary["kinds"].values()) == 1
