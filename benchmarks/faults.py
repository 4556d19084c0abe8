"""Faults survived, counted: short real runs killed at random moments, resumed, and compared
with an uninterrupted run.

  python benchmarks/faults.py --trials 50 --seed 0 --workdir /tmp/faults

Each trial starts `train.py` (configs/digits.py, a tiny MLP, 2 epochs of 187 steps of 8
images, figures and TensorBoard off) as one process or as two (gloo over loopback), waits for
a random moment of a random phase (training: the progress bar mid-epoch; evaluation: the bar
just closed; a checkpoint write: orbax's temporary directory present), sends SIGKILL or SIGTERM
to one process or to all, lets the survivors end, then reruns the same commands to the end. The
resumed run must match the uninterrupted reference bit for bit (final train state, PRNG keys,
progress, every metrics row but its timings) with no row of metrics.jsonl lost or duplicated.
With --disk_full_share (root: a small tmpfs), some one-process trials run in a file system
too small for their checkpoints, which is then enlarged before the rerun; with
--unreadable_share, some have their latest checkpoint (or the checkpoints directory) made
unreadable after a kill, the rerun without root's file-access override (setpriv), then the
access restored and the rerun repeated.

With --lost_process, every two-process trial SIGKILLs one process, process 0 (the coordinator)
and process 1 in turn.

Prints one line per trial and a JSON summary last: trials, kinds of fault, phases hit, resumed
bitwise, lost and duplicated rows, and how the survivors of a lost peer ended.
"""

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS_PER_EPOCH = 2, 1500 // 8
# One step per chunk, so the bar moves (and a stop can land) after every step.
ARGS = ["--config=configs/digits.py", "--config.model.hidden=(32,)",
        "--config.model.latent_dim=4", "--config.batch_size=8", f"--config.num_epochs={EPOCHS}",
        "--config.log.chunks_per_epoch=1000", "--config.log.figures=False",
        "--config.log.tensorboard=False"]
HEARTBEAT_S = 10
TIMEOUT_S = 600
_BAR = re.compile(r"epoch (\d+)/\d+: +\d+%\|[^|]*\| *(\d+)/(\d+)")
_BAR_CLOSED = re.compile(r"\r +\r")  # tqdm clearing its line (leave=False)
_UNTIMED = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("seconds", "_per_s"))}
                         for r in rows]


@dataclasses.dataclass
class Fault:
  processes: int      # 1 or 2
  signum: int         # SIGKILL or SIGTERM
  victims: tuple      # process ids sent the signal
  phase: str          # "train", "eval" or "checkpoint"
  epoch: int          # 1..EPOCHS
  at_step: int = 0    # train: the bar's step in the epoch to pass first

  def kind(self) -> str:
    who = "all" if len(self.victims) == self.processes else f"process {self.victims[0]}"
    return f"{signal.Signals(self.signum).name} {who} of {self.processes}"


def draw_fault(rng: random.Random, two_process_share: float, lost_process: int | None = None
               ) -> Fault:
  """A random fault; with `lost_process`, a two-process run loses that process (SIGKILL)."""
  processes = 2 if rng.random() < two_process_share else 1
  victims = tuple(range(processes)) if processes == 1 or rng.random() < 1 / 3 else (
      rng.randrange(processes),)
  signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
  if processes == 2 and lost_process is not None:
    victims, signum = (lost_process,), signal.SIGKILL
  # Evaluation and saves are hit at the run's end too.
  return Fault(processes, signum, victims, rng.choice(["train", "eval", "checkpoint"]),
               rng.randint(1, EPOCHS), rng.randint(1, STEPS_PER_EPOCH - 30))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _commands(workdir: str, processes: int) -> list[list[str]]:
  base = [sys.executable, "train.py", *ARGS, f"--workdir={workdir}"]
  if processes == 1:
    return [base]
  address = f"127.0.0.1:{_free_port()}"
  return [base + [f"--coordinator_address={address}", f"--num_processes={processes}",
                  f"--process_id={i}", f"--heartbeat_timeout={HEARTBEAT_S}"]
          for i in range(processes)]


def _env(processes: int, cache_dir: str | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_NUM_CPU_DEVICES=str(2 // processes))  # two devices in all: one program
  if cache_dir:  # multi-process runs turn it off themselves (jaxvae.parallel)
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


class Runs:
  """The processes of one run: process 0's stderr on a pseudo-terminal (so it draws its
  progress bar), every stream also kept in LOGDIR/<name>.p<i>.{out,err}."""

  def __init__(self, commands, env, logdir: str, name: str):
    self.terminal, child_end = pty.openpty()
    self.logs = [os.path.join(logdir, f"{name}.p{i}") for i in range(len(commands))]
    self.procs = [subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=open(log + ".out", "w"),
        stderr=child_end if i == 0 else open(log + ".err", "w"))
        for i, (cmd, log) in enumerate(zip(commands, self.logs))]
    os.close(child_end)
    self.seen, self.tail = "", ""
    self.ended_at = [None] * len(commands)

  def read(self, wait_s: float) -> str:
    """New terminal output within `wait_s` (also notes which processes ended, and when)."""
    new = ""
    if select.select([self.terminal], [], [], wait_s)[0]:
      try:
        new = os.read(self.terminal, 1 << 16).decode(errors="replace")
      except OSError:  # process 0 is gone and its terminal with it
        time.sleep(wait_s)
    self.seen += new
    self.tail = (self.tail + new)[-4096:]
    for i, p in enumerate(self.procs):
      if self.ended_at[i] is None and p.poll() is not None:
        self.ended_at[i] = time.monotonic()
    return new

  def wait(self, timeout_s: float) -> list:
    """Drains the terminal until every process ends; kills them all past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
      self.read(0.2)
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    self.read(0)
    os.close(self.terminal)
    with open(self.logs[0] + ".err", "w") as f:
      f.write(self.seen)
    return [p.returncode for p in self.procs]

  def stderr(self, i: int) -> str:
    with open(self.logs[i] + ".err") as f:
      return f.read()

  def stdout(self, i: int) -> str:
    with open(self.logs[i] + ".out") as f:
      return f.read()


def _unfinished_save(workdir: str, epoch: int | None = None) -> bool:
  path = os.path.join(workdir, "checkpoints")
  prefix = f"{epoch * STEPS_PER_EPOCH}." if epoch else ""
  return os.path.isdir(path) and any(
      ".orbax-checkpoint-tmp" in n and n.startswith(prefix) for n in os.listdir(path))


def _moment_reached(fault: Fault, runs: Runs, workdir: str, state: dict) -> bool:
  """Whether the fault's moment has come, from the bar and the checkpoint directory."""
  bars = _BAR.findall(runs.tail)
  if bars:
    state["bar"] = tuple(map(int, bars[-1]))
  epoch, done, total = state.get("bar", (0, 0, 0))
  if fault.phase == "train":
    return epoch == fault.epoch and fault.at_step <= done < total
  if fault.phase == "eval":  # the epoch's bar cleared (tqdm, leave=False): evaluating now
    last = list(_BAR.finditer(runs.tail))
    return bool(last) and int(last[-1].group(1)) == fault.epoch and (
        _BAR_CLOSED.search(runs.tail, last[-1].end()) is not None)
  return _unfinished_save(workdir, fault.epoch)


def inject(fault: Fault, runs: Runs, workdir: str) -> dict:
  """Waits for the fault's moment and sends the signal; returns what was hit."""
  state, deadline = {}, time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline and all(p.poll() is None for p in runs.procs):
    runs.read(0.002)
    if _moment_reached(fault, runs, workdir, state):
      rows = _rows(workdir)
      for i in fault.victims:
        runs.procs[i].send_signal(fault.signum)
      sent = time.monotonic()
      hit = fault.phase
      if fault.phase == "eval" and any(r["step"] == fault.epoch * STEPS_PER_EPOCH for r in rows):
        hit = "eval (row already written)"
      if fault.phase == "checkpoint" and not _unfinished_save(workdir, fault.epoch):
        hit = "checkpoint (save already finished)"
      return {"hit": hit, "sent": sent, "rows_before": rows}
  return {"hit": "missed (the run ended or stalled first)", "sent": None,
          "rows_before": _rows(workdir)}


def _rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def digest(workdir: str) -> str:
  """sha256 of the final checkpoint's arrays (train state and PRNG keys) and progress."""
  import jax
  import numpy as np
  from jaxvae import restore
  run = restore.restore_run(workdir)
  h = hashlib.sha256(json.dumps(run.progress, sort_keys=True).encode())
  for x in jax.tree.leaves((run.state, run.keys.as_dict())):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


def _survivors(fault: Fault, runs: Runs, rcs: list, sent: float | None) -> dict:
  """How the processes that were not killed ended, when a peer was SIGKILLed."""
  if fault.signum != signal.SIGKILL or len(fault.victims) == fault.processes or sent is None:
    return {}
  out = {}
  for i in set(range(fault.processes)) - set(fault.victims):
    err = runs.stderr(i)
    out[i] = {"lost": fault.victims[0], "rc": rcs[i],
              "seconds": round(runs.ended_at[i] - sent, 1)
              if runs.ended_at[i] else None,
              "errors": err.count("error: "),
              "clean": rcs[i] == 75 and err.count("error: ") == 1 and not any(
                  s in err for s in ("Traceback", "Fatal Python error", "Check failure"))}
  return out


def trial(n: int, fault: Fault, root: str, reference: dict, cache_dir: str) -> dict:
  workdir = os.path.join(root, f"trial{n:03d}")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  env = _env(fault.processes, cache_dir)
  commands = _commands(workdir, fault.processes)
  runs = Runs(commands, env, root, f"trial{n:03d}.killed")
  injected = inject(fault, runs, workdir)
  rcs = runs.wait(TIMEOUT_S)
  survivors = _survivors(fault, runs, rcs, injected["sent"])
  resumed = Runs(commands, env, root, f"trial{n:03d}.resumed")
  resumed_rcs = resumed.wait(TIMEOUT_S)
  result = {"trial": n, "kind": fault.kind(), "processes": fault.processes,
            "target": fault.phase, "phase": injected["hit"],
            "epoch": fault.epoch,
            "killed_rcs": rcs, "resumed_rcs": resumed_rcs, "survivors": survivors,
            **compare(workdir, reference, injected["rows_before"])}
  if result["bitwise"]:
    shutil.rmtree(workdir)
  return result


def compare(workdir: str, reference: dict, rows_before: list) -> dict:
  """Bitwise agreement with the reference; finished rows lost or duplicated."""
  rows = _rows(workdir)
  steps = collections.Counter(r["step"] for r in rows)
  finished = {r["step"] for r in rows_before}
  try:
    same_state = digest(workdir) == reference["digest"]
  except Exception as e:  # an unresumed run has no final checkpoint to read
    same_state = False
    print(f"  cannot restore {workdir}: {type(e).__name__}: {str(e)[:200]}", flush=True)
  return {"bitwise": same_state and _UNTIMED(rows) == reference["rows"],
          "lost_rows": sum(1 for s in finished | set(reference["steps"]) if steps[s] == 0),
          "duplicated_rows": sum(c - 1 for c in steps.values() if c > 1)}


def run_reference(root: str, processes: int, cache_dir: str) -> dict:
  """The uninterrupted run, or the one a previous invocation left complete in ROOT."""
  workdir = os.path.join(root, f"reference{processes}")
  if len(_rows(workdir)) != EPOCHS:
    shutil.rmtree(workdir, ignore_errors=True)
    runs = Runs(_commands(workdir, processes), _env(processes, cache_dir), root,
                f"reference{processes}")
    rcs = runs.wait(TIMEOUT_S)
    if any(rcs):
      sys.exit(f"the uninterrupted {processes}-process run failed ({rcs}); see {runs.logs}")
  rows = _rows(workdir)
  return {"digest": digest(workdir), "rows": _UNTIMED(rows), "steps": [r["step"] for r in rows]}


def disk_full_trial(n: int, rng: random.Random, root: str, reference: dict,
                    cache_dir: str) -> dict:
  """A one-process run in a tmpfs too small for its checkpoints (root only), then the same
  command again once the file system has room."""
  mount = os.path.join(root, f"trial{n:03d}.tmpfs")
  os.makedirs(mount, exist_ok=True)
  size_kib = rng.randrange(100, 400, 20)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mount], check=True)
  try:
    workdir = os.path.join(mount, "run")
    commands, env = _commands(workdir, 1), _env(1, cache_dir)
    runs = Runs(commands, env, root, f"trial{n:03d}.full")
    rcs = runs.wait(TIMEOUT_S)
    rows_before = _rows(workdir)
    errors = [line for line in (runs.stderr(0) + runs.stdout(0)).splitlines()
              if line.startswith("error: ")]
    subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
    resumed_rcs = Runs(commands, env, root, f"trial{n:03d}.resumed").wait(TIMEOUT_S)
    result = {"trial": n, "kind": f"disk full ({size_kib} KiB) of 1", "phase": "disk full",
              "epoch": None, "killed_rcs": rcs, "resumed_rcs": resumed_rcs, "survivors": {},
              "message": errors[-1][:300] if errors else runs.stderr(0)[-300:],
              "clean_message": len(errors) == 1 and "Traceback" not in runs.stderr(0),
              **compare(workdir, reference, rows_before)}
  finally:
    subprocess.run(["umount", mount], check=False)
  return result


# Root without the capabilities that override file permissions: chmod 000 then binds it.
_NO_FILE_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                     "--inh-caps=-dac_override,-dac_read_search", "--"]


def unreadable_trial(n: int, rng: random.Random, root: str, reference: dict,
                     cache_dir: str) -> dict:
  """A one-process run SIGKILLed in its last epoch; then its latest checkpoint, or the whole
  checkpoints directory, is made unreadable (chmod 000) and the command rerun: it must stop
  with one message. With the access restored, the rerun must resume bit for bit."""
  workdir = os.path.join(root, f"trial{n:03d}")
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  commands, env = _commands(workdir, 1), _env(1, cache_dir)
  fault = Fault(1, signal.SIGKILL, (0,), "train", EPOCHS, rng.randint(1, STEPS_PER_EPOCH - 30))
  runs = Runs(commands, env, root, f"trial{n:03d}.killed")
  injected = inject(fault, runs, workdir)
  killed_rcs = runs.wait(TIMEOUT_S)
  checkpoints = os.path.join(workdir, "checkpoints")
  complete = [d for d in os.listdir(checkpoints) if d.isdigit()]
  target = rng.choice(([os.path.join(checkpoints, max(complete, key=int))] if complete else [])
                      + [checkpoints])
  os.chmod(target, 0)
  try:
    denied = Runs([_NO_FILE_OVERRIDE + commands[0]], env, root, f"trial{n:03d}.denied")
    rcs = denied.wait(TIMEOUT_S)
  finally:
    os.chmod(target, 0o755)
  errors = [line for line in denied.stderr(0).splitlines() if line.startswith("error: ")]
  resumed_rcs = Runs(commands, env, root, f"trial{n:03d}.resumed").wait(TIMEOUT_S)
  what = "checkpoint" if target != checkpoints else "checkpoints directory"
  result = {"trial": n, "kind": f"unreadable {what} of 1", "phase": injected["hit"],
            "epoch": EPOCHS, "killed_rcs": killed_rcs, "denied_rcs": rcs,
            "resumed_rcs": resumed_rcs, "survivors": {},
            "message": errors[-1][:300] if errors else denied.stderr(0)[-300:],
            "clean_message": rcs == [1] and len(errors) == 1
            and "Traceback" not in denied.stderr(0),
            **compare(workdir, reference, injected["rows_before"])}
  if result["bitwise"]:
    shutil.rmtree(workdir)
  return result


def summarize(results: list[dict]) -> dict:
  survivors = [s for r in results for s in r["survivors"].values()]
  return {
      "trials": len(results),
      "kinds": dict(collections.Counter(r["kind"] for r in results)),
      "phases_hit": dict(collections.Counter(r["phase"] for r in results)),
      "resumed_bitwise": sum(r["bitwise"] for r in results),
      "lost_rows": sum(r["lost_rows"] for r in results),
      "duplicated_rows": sum(r["duplicated_rows"] for r in results),
      "resumed_rc_nonzero": sum(any(r["resumed_rcs"]) for r in results),
      "lost_peer_survivors": len(survivors),
      "lost_peer_one_message_exit_75": sum(s["clean"] for s in survivors),
      "lost_peer_max_seconds": max((s["seconds"] or 0 for s in survivors), default=None),
      "lost_coordinator_survivors": sum(s["lost"] == 0 for s in survivors),
      "lost_coordinator_one_message_exit_75": sum(s["clean"] and s["lost"] == 0
                                                  for s in survivors),
      "disk_full_or_unreadable_trials": sum("clean_message" in r for r in results),
      "disk_full_or_unreadable_one_message": sum(r.get("clean_message", False) for r in results),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=50)
  parser.add_argument("--deadline_s", type=float, default=float("inf"),
                      help="start no trial after this many seconds (the summary counts those run)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/jaxvae_faults")
  parser.add_argument("--two_process_share", type=float, default=0.5)
  parser.add_argument("--disk_full_share", type=float, default=0.1,
                      help="share of trials in a full tmpfs (needs root; 0 otherwise)")
  parser.add_argument("--unreadable_share", type=float, default=0.1,
                      help="share of trials with an unreadable checkpoint (needs root)")
  parser.add_argument("--lost_process", action="store_true",
                      help="every two-process trial SIGKILLs one process: 0 (the coordinator) "
                           "and 1 in turn")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  os.makedirs(args.workdir, exist_ok=True)
  cache_dir = os.path.join(args.workdir, "compilation_cache")
  root_only = (args.disk_full_share, args.unreadable_share) if os.geteuid() == 0 else (0, 0)
  if (args.disk_full_share or args.unreadable_share) and not any(root_only):
    print("no disk-full or unreadable trials: they need root (mount, setpriv)", flush=True)
  t0 = time.monotonic()
  references = {1: run_reference(args.workdir, 1, cache_dir)}
  if args.two_process_share:
    references[2] = run_reference(args.workdir, 2, cache_dir)
    print(f"references: one process on two devices and two processes agree bitwise: "
          f"{references[1]['digest'] == references[2]['digest']}", flush=True)
  results, harness_errors = [], []
  for n in range(args.trials):
    if time.monotonic() - t0 > args.deadline_s:
      break
    draw = rng.random()
    try:
      if draw < root_only[0]:
        result = disk_full_trial(n, rng, args.workdir, references[1], cache_dir)
      elif draw < sum(root_only):
        result = unreadable_trial(n, rng, args.workdir, references[1], cache_dir)
      else:
        lost = sum(r.get("processes") == 2 for r in results) % 2 if args.lost_process else None
        fault = draw_fault(rng, args.two_process_share, lost)
        result = trial(n, fault, args.workdir, references[fault.processes], cache_dir)
    except Exception as e:  # the harness's own failure: counted, and the next trial goes on
      result = {"trial": n, "harness_error": f"{type(e).__name__}: {e}"}
      print(json.dumps(result), flush=True)
      harness_errors.append(result)
      continue
    results.append(result)
    print(json.dumps(result), flush=True)
  summary = dict(summarize(results), harness_errors=len(harness_errors),
                 seconds=round(time.monotonic() - t0))
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
