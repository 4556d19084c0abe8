"""Trains a VAE: python train.py --config configs/cifar10.py --workdir runs/cifar10 [--config.key=value ...]

Running the same command with the same --workdir resumes from its latest checkpoint; Ctrl-C or
SIGTERM saves a checkpoint first and exits with status 128 + the signal number.

Several processes (e.g. one per GPU host) run the same command, each with its own
--process_id (or JAX_PROCESS_ID), the same --coordinator_address (process 0's host:port) and
--num_processes; under SLURM or Open MPI, --distributed reads all three from the cluster. When a
process stops answering (killed, its host lost), the others end within --heartbeat_timeout
seconds with one message naming it and exit status 75; rerunning every command resumes. Each
process of a multi-process run runs as a child of itself (jaxvae/supervisor.py): losing process
0, the coordinator, aborts the others natively, and the parent turns that into the same message.
"""

import os
import shlex
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxvae import parallel
from jaxvae import restore
from jaxvae import supervisor
from jaxvae.train import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and figures.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 in a multi-process run (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1 (or JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed", False,
                  "Join a multi-process run whose settings JAX detects (SLURM, Open MPI, TPU).")
flags.DEFINE_integer("heartbeat_timeout", parallel.HEARTBEAT_TIMEOUT_S,
                     "Seconds without a heartbeat after which a process of a multi-process run "
                     "counts as lost and the others stop.")
flags.DEFINE_bool("overwrite", False,
                  "Delete the run already in --workdir (even one of another config) and start over.")
flags.mark_flags_as_required(["config", "workdir"])


def _resume_command() -> str:
  """This process's command line, less --overwrite: what resumes the run."""
  command = [a for a in sys.argv if a.split("=")[0] not in ("--overwrite", "-overwrite")]
  return shlex.join(["python"] + command)


def _last_checkpoint(workdir: str) -> str:
  """The newest complete checkpoint in WORKDIR (orbax renames a save's directory to its step
  only once every process has written it)."""
  path = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
  return f"step {max(steps)} in {path}" if steps else f"none yet in {path}"


def _lost_peer_message(who: str, me: str | None = None) -> str:
  """The one message of a process whose peer `who` is lost; `me` names this process (by
  default from JAX, which the supervising parent has not started)."""
  workdir = flags.FLAGS.workdir
  me = me or f"process {jax.process_index()}"
  return (f"{who} of this multi-process run stopped answering (killed, or its host lost), so "
          f"{me} stopped too. The last complete checkpoint is "
          f"{_last_checkpoint(workdir)} (a save cut short is set aside on resume); start every "
          f"process again with its own command to resume, this one's: {_resume_command()}")


def _train(config, workdir: str, overwrite: bool):
  """train_and_evaluate, ending this process with one message when another process is lost."""
  try:
    result = train_and_evaluate(config, workdir, overwrite)
  except BaseException as e:
    if parallel.peer_failure(e):
      parallel.exit_peer_lost(parallel.lost_peer(e))
    parallel.stop_watching()
    raise
  parallel.finish()
  return result


def _supervise() -> int:
  """Runs this process of a multi-process run as a child (jaxvae/supervisor.py), which ends with
  one message rather than XLA's abort when process 0, the coordinator, is lost."""
  index = flags.FLAGS.process_id
  if index is None and os.environ.get(parallel.ENV_PROCESS_ID, "").isdigit():
    index = int(os.environ[parallel.ENV_PROCESS_ID])
  me = "this process" if index is None else f"process {index}"
  name = f"abort.process{index}.log" if index is not None else f"abort.{os.getpid()}.log"
  return supervisor.supervise(lambda who: _lost_peer_message(who, me),
                              os.path.join(flags.FLAGS.workdir, name))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go as --config.key=value")
  settings = (flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
  if supervisor.is_child():
    supervisor.become_child()
  elif parallel.requested(*settings, auto_detect=flags.FLAGS.distributed):
    sys.exit(_supervise())
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if parallel.initialize(*settings, auto_detect=flags.FLAGS.distributed,
                         heartbeat_timeout_s=flags.FLAGS.heartbeat_timeout):
    if not parallel.is_primary():
      sys.stdout = open(os.devnull, "w")  # process 0 reports for the whole run
    parallel.watch_peers(_lost_peer_message)
  result = _train(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.overwrite)
  if result.stopped_by:
    print(f"to resume: {_resume_command()}", flush=True)
    sys.exit(128 + signal.Signals[result.stopped_by].value)


if __name__ == "__main__":
  app.run(restore.exit_on_user_error(main))
