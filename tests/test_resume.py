"""Real `python train.py` processes, killed and resumed: the finished run must not depend on
the interruption, bit for bit.

The killed runs draw their progress bar on a pseudo-terminal, so the test sees each chunk of
each epoch finish and can stop the process mid-epoch on purpose. Every process shares one
persistent compilation cache (created here), so only the first pays for compiling.
"""

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxvae import evaluate, parallel
from jaxvae import restore
from tests.conftest import REPO

# One step per chunk, so the bar moves (and a stop can land) after every step.
ARGS = ["--config=configs/digits.py", "--config.model.hidden=(32,)", "--config.model.latent_dim=4",
        "--config.batch_size=8", "--config.log.chunks_per_epoch=1000", "--config.num_epochs=4",
        "--config.log.figures=False", "--config.log.tensorboard=False"]
STEPS_PER_EPOCH = 1500 // 8
_BAR = re.compile(r"epoch (\d+)/\d+: +\d+%\|[^|]*\| *(\d+)/(\d+)")


@pytest.fixture(scope="module")
def env():
  return dict(os.environ)  # the session's compilation cache included (tests/conftest.py)


def _command(workdir):
  return [sys.executable, "train.py", *ARGS, f"--workdir={workdir}"]


def _run(workdir, env) -> str:
  """Runs the command to the end; returns its stdout."""
  proc = subprocess.run(_command(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


def _start_on_terminal(workdir, env):
  """Starts the command with stderr on a pseudo-terminal; returns (process, terminal fd)."""
  terminal, child_end = pty.openpty()
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=child_end, text=True)
  os.close(child_end)
  return proc, terminal


def _wait_for_bar(proc, terminal, epoch: int, min_done: int) -> int:
  """Reads the progress bar until it shows `epoch` between `min_done` steps and its end;
  returns the steps it shows done."""
  seen, deadline = "", time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if select.select([terminal], [], [], 0.5)[0]:
      try:
        seen = (seen + os.read(terminal, 1 << 16).decode(errors="replace"))[-4096:]
      except OSError:  # the child closed the terminal
        break
      shown = _BAR.findall(seen)
      if shown:
        e, done, total = map(int, shown[-1])
        if e == epoch and min_done <= done < total:
          return done
  pytest.fail(f"the bar never showed epoch {epoch} past step {min_done} (rc {proc.poll()}); "
              f"it last showed {seen[-300:]!r}")


def _finish(proc, terminal) -> str:
  """Drains the terminal (a child blocked writing its bar would never exit) until the process
  ends; returns its stdout."""
  while proc.poll() is None:
    if select.select([terminal], [], [], 0.5)[0]:
      try:
        os.read(terminal, 1 << 16)
      except OSError:
        proc.wait(timeout=120)
  os.close(terminal)
  return proc.stdout.read()


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _untimed(rows):
  return [{k: v for k, v in r.items() if not k.endswith(("seconds", "_per_s"))} for r in rows]


def _assert_same_run(workdir, reference):
  """Same final train state bit for bit, same progress, and the same metrics rows."""
  got, want = restore.restore_run(workdir), restore.restore_run(reference)
  assert got.progress == want.progress
  assert jax.tree.structure(got.state) == jax.tree.structure(want.state)
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(got.state)[0],
                        jax.tree.leaves(got.state), jax.tree.leaves(want.state)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), jax.tree_util.keystr(path[0])
  assert _untimed(_rows(workdir)) == _untimed(_rows(reference))
  assert [r["epoch"] for r in _rows(workdir)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  _run(workdir, env)
  return workdir


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, env, reference):
  """SIGKILLs the run in the middle of epoch 3, then reruns the same command."""
  workdir = str(tmp_path_factory.mktemp("killed"))
  proc, terminal = _start_on_terminal(workdir, env)
  done = _wait_for_bar(proc, terminal, epoch=3, min_done=10)
  proc.send_signal(signal.SIGKILL)
  _finish(proc, terminal)
  killed = {"rc": proc.returncode, "done": done, "rows": _rows(workdir),
            "checkpoints": sorted(os.listdir(os.path.join(workdir, "checkpoints")))}
  killed["stdout"] = _run(workdir, env)
  print(f"SIGKILL at epoch 3 after >= {done}/{STEPS_PER_EPOCH} steps; rows then: "
        f"{[r['epoch'] for r in killed['rows']]}; checkpoints then: {killed['checkpoints']}")
  return workdir, killed


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(killed_and_resumed,
                                                                     reference):
  workdir, killed = killed_and_resumed
  assert killed["rc"] == -signal.SIGKILL
  # The kill landed inside epoch 3: its row was never written.
  assert [r["epoch"] for r in killed["rows"]] == [1, 2]
  # Epoch 2's async save may still have been writing; then the run goes on from epoch 1's.
  finished = max(int(name) for name in killed["checkpoints"] if name.isdigit())
  assert finished in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)
  epoch = finished // STEPS_PER_EPOCH
  assert f"resumed from step {finished}, the end of epoch {epoch}" in killed["stdout"]
  if f"{2 * STEPS_PER_EPOCH}{'.orbax-checkpoint-tmp'}" in killed["checkpoints"]:
    assert "is a save that never finished" in killed["stdout"]
  if epoch == 1:
    assert (f"dropped 1 metrics.jsonl rows past step {STEPS_PER_EPOCH}, the last checkpointed"
            in killed["stdout"])
  _assert_same_run(workdir, reference)


def test_evaluating_the_resumed_run_reproduces_its_logged_metrics(killed_and_resumed):
  workdir, _ = killed_and_resumed
  run = restore.restore_run(workdir)
  assert run.progress["epoch"] == 4 and int(run.state.step) == 4 * STEPS_PER_EPOCH
  evaluator = evaluate.Evaluator(run.model, run.config, run.dataset.test, parallel.make_mesh())
  metrics = evaluator(run.params, run.keys.eval)
  last = _rows(workdir)[-1]
  logged = {k: last[f"test/{k}"] for k in metrics if f"test/{k}" in last}
  assert "elbo_nats" in logged and "kl_per_dim_nats" in logged
  for k, v in logged.items():  # one by one: approx takes no lists inside a dict
    assert metrics[k] == pytest.approx(v, rel=1e-6), k


def test_sigterm_saves_mid_epoch_and_resumes_exactly(tmp_path, env, reference):
  workdir = str(tmp_path)
  proc, terminal = _start_on_terminal(workdir, env)
  _wait_for_bar(proc, terminal, epoch=2, min_done=10)
  proc.send_signal(signal.SIGTERM)
  stdout = _finish(proc, terminal)
  assert proc.returncode == 128 + signal.SIGTERM, stdout
  assert "to resume: python train.py" in stdout and f"--workdir={workdir}" in stdout
  assert [r["epoch"] for r in _rows(workdir)] == [1]

  stopped = restore.restore_run(workdir)
  at = stopped.progress["step_in_epoch"]
  print(f"SIGTERM in epoch 2: checkpoint at step {at}/{STEPS_PER_EPOCH} of it")
  assert stopped.progress["epoch"] == 1 and 10 <= at < STEPS_PER_EPOCH
  assert int(stopped.state.step) == STEPS_PER_EPOCH + at
  assert stopped.progress["sums"]["steps"] == at  # the epoch's partial sums travel with it

  stdout = _run(workdir, env)
  assert f"resumed from step {STEPS_PER_EPOCH + at}, step {at} of {STEPS_PER_EPOCH} in epoch 2" in stdout
  _assert_same_run(workdir, reference)


def test_damaged_final_checkpoint_is_set_aside_and_its_epoch_replayed(tmp_path, env, reference):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  final = os.path.join(workdir, "checkpoints", str(4 * STEPS_PER_EPOCH))
  for root, _, files in os.walk(os.path.join(final, "arrays")):
    for name in files:
      if os.path.basename(root) == "d":  # the array data, cut as a full disk would
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)

  stdout = _run(workdir, env)
  assert f"{final} cannot be read" in stdout
  assert f"resumed from step {3 * STEPS_PER_EPOCH}, the end of epoch 3" in stdout
  assert os.path.isdir(os.path.join(workdir, "bad_checkpoints", str(4 * STEPS_PER_EPOCH)))
  _assert_same_run(workdir, reference)
