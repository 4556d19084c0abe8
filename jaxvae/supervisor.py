"""A thin parent for each process of a multi-process run, for the one loss a process cannot
report itself: process 0's, whose coordination service every other process depends on.

When the coordinator stops answering, jaxlib 0.10.2 ends each other process from a native thread
(LOG(FATAL) "Terminating process because the JAX distributed service detected fatal errors", a
stack trace, SIGABRT); a `missed_heartbeat_callback` cannot take that over (calling a Python
callback throws std::bad_cast converting the status). So train.py runs each process of a
multi-process run as a child of itself (`supervise`):

- the child's Python stderr (messages, the progress bar) is the terminal, as without a parent;
  its native stderr (file descriptor 2: XLA, gloo, absl's C++ log, Python's fatal-error dump)
  comes through a pipe and the parent copies it to the terminal line by line, except the native
  abort text, held back (from the first FATAL line, with the coordination agent's lines just
  before it);
- SIGINT and SIGTERM to the parent are passed on to the child (whose stop request takes the same
  signal again within a second as one request: a signal to the process group reaches both);
- the child dies with the parent (PR_SET_PDEATHSIG): a kill -9 of the parent kills the process;
- a child that aborted after losing the coordinator ends the parent with one `error:` line and
  EXIT_PEER_LOST, the abort text kept in WORKDIR/abort.process<I>.log; any other abort's text is
  shown as it would have been, and the parent exits with the child's status (128 + N for
  signal N).

This module imports no JAX: the parent never starts a backend.
"""

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time

EXIT_PEER_LOST = 75  # as jaxvae.parallel.EXIT_PEER_LOST
ENV_STDERR_FD = "JAXVAE_SUPERVISED_STDERR_FD"  # set in the child: its Python stderr's descriptor
ENV_PARENT = "JAXVAE_SUPERVISOR_PID"
_FATAL = re.compile(rb"^F\d{4} ")  # an absl FATAL line: the native abort text starts here
_HOLD_S = 2.0  # how long a coordination agent's error line waits for a FATAL line after it
# What the client says when it ends the process over the distributed service, and what it adds
# when the service itself (process 0) is out of reach.
_SERVICE_FATAL = b"the JAX distributed service detected fatal errors"
_COORDINATOR_GONE = (b"Failed to send RPC to coordination service", b"leader task")


def is_child() -> bool:
  return ENV_STDERR_FD in os.environ


def become_child() -> None:
  """In the child, before anything else: Python's stderr back on the parent's terminal, and
  death with the parent (Linux; elsewhere the child outlives a killed parent)."""
  sys.stderr = open(int(os.environ.pop(ENV_STDERR_FD)), "w", buffering=1,
                    encoding=sys.__stderr__.encoding, errors="backslashreplace")
  parent = int(os.environ.pop(ENV_PARENT))
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
  if os.getppid() != parent:  # the parent died before prctl
    os._exit(128 + signal.SIGKILL)


def supervise(describe_loss, abort_log: str) -> int:
  """Runs this program again as a child (see the module's docstring) and returns the status to
  exit with. `describe_loss(who)` makes the message for a lost coordinator (who: "process 0
  (the coordinator)"); `abort_log` is the file for the native abort text."""
  terminal = os.dup(sys.stderr.fileno())
  env = dict(os.environ, **{ENV_STDERR_FD: str(terminal), ENV_PARENT: str(os.getpid())})
  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], stderr=subprocess.PIPE,
                           pass_fds=(terminal,), env=env)
  os.close(terminal)
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda signum, frame: child.poll() is None and child.send_signal(signum))
  held = _copy_native_stderr(child.stderr.fileno(), sys.stderr.buffer)
  status = child.wait()
  text = b"".join(held)
  if status == EXIT_PEER_LOST and _SERVICE_FATAL in text:
    # The child reported the loss itself, and the client's abort raced its exit: the message
    # is out already, so the abort text goes to the log only.
    _keep(text, abort_log)
    return status
  if status >= 0:
    _show(held)
    return status
  if status == -signal.SIGABRT and _SERVICE_FATAL in text:
    who = ("process 0 (the coordinator)" if any(s in text for s in _COORDINATOR_GONE)
           else "another process")
    sys.stderr.write(f"error: {describe_loss(who)} ({_keep(text, abort_log)})\n")
    sys.stderr.flush()
    return EXIT_PEER_LOST
  _show(held)
  return 128 - status


def _copy_native_stderr(fd: int, out) -> list[bytes]:
  """Copies lines from `fd` to `out` until its end; returns the lines held back: the abort text
  and the coordination agent's error lines just before it (one not followed by a FATAL line
  within _HOLD_S is let through late)."""
  held, waiting, rest = [], [], b""  # waiting: (deadline, line) of coordination lines
  while True:
    timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting and not held else None
    chunk = os.read(fd, 1 << 16) if select.select([fd], [], [], timeout)[0] else None
    lines = []
    if chunk is not None:
      *lines, rest = (rest + chunk).split(b"\n")
      lines = [line + b"\n" for line in lines] + ([rest] if not chunk and rest else [])
    for line in lines:
      if held or _FATAL.match(line):
        held += [w for _, w in waiting] + [line]
        waiting = []
      elif line[:1] in (b"E", b"W") and b"coordination_service" in line:
        waiting.append((time.monotonic() + _HOLD_S, line))
      else:
        out.write(line)
    while waiting and not held and waiting[0][0] <= time.monotonic():
      out.write(waiting.pop(0)[1])
    out.flush()
    if chunk == b"":
      return held + [w for _, w in waiting]


def _show(lines: list[bytes]) -> None:
  sys.stderr.buffer.write(b"".join(lines))
  sys.stderr.flush()


def _keep(text: bytes, path: str) -> str:
  """Writes the abort text to `path`; returns where it is for the message."""
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
      f.write(text)
    return f"XLA's abort text is in {path}"
  except OSError as e:
    return f"XLA's abort text could not be kept in {path}: {e.strerror}"
