"""Trains a VAE: python train.py --config configs/cifar10.py --workdir runs/cifar10 [--config.key=value ...]

Running the same command with the same --workdir resumes from its latest checkpoint; Ctrl-C or
SIGTERM saves a checkpoint first and exits with status 128 + the signal number.

Several processes (e.g. one per GPU host) run the same command, each with its own
--process_id (or JAX_PROCESS_ID), the same --coordinator_address (process 0's host:port) and
--num_processes; under SLURM or Open MPI, --distributed reads all three from the cluster.
"""

import os
import shlex
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxvae import parallel
from jaxvae import restore
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
flags.DEFINE_bool("overwrite", False,
                  "Delete the run already in --workdir (even one of another config) and start over.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go as --config.key=value")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if parallel.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                         flags.FLAGS.process_id, auto_detect=flags.FLAGS.distributed):
    if not parallel.is_primary():
      sys.stdout = open(os.devnull, "w")  # process 0 reports for the whole run
  result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.overwrite)
  if result.stopped_by:
    command = [a for a in sys.argv if a.split("=")[0] not in ("--overwrite", "-overwrite")]
    print(f"to resume: {shlex.join(['python'] + command)}", flush=True)
    sys.exit(128 + signal.Signals[result.stopped_by].value)


if __name__ == "__main__":
  app.run(restore.exit_on_user_error(main))
