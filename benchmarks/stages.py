"""Train a run to each of a list of epoch counts in turn and evaluate it at each one.

  python benchmarks/stages.py --workdir runs/mnist_vae --stages 1,4,13,40,121,364,1093,3280 \
      -- --config configs/mnist_iwae.py --config.data.path=../shared/data/mnist-png.tar.gz

For each stage E it runs `train.py ... --config.num_epochs=E` (which resumes the run from its
latest checkpoint, so extending a run lands on the same numbers as one run of E epochs) and
then `python -m jaxvae.evaluate --workdir DIR [--iw_samples K]`, keeping that stage's result as
DIR/eval_epoch_E.json and its wall times in DIR/stages.jsonl. A stage whose eval_epoch_E.json
exists is skipped, so the command can be stopped at any moment and rerun as it was: it goes on
from the last checkpoint. Made for schedules whose evaluation points are epoch counts, such as
the IWAE paper's stage boundaries (configs/mnist_iwae.py).
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("workdir", None, "The run's --workdir.")
flags.DEFINE_list("stages", None, "Epoch counts to train to and evaluate at, increasing.")
flags.DEFINE_integer("iw_samples", None, "K for the evaluation (default: the config's).")
flags.mark_flags_as_required(["workdir", "stages"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(command: list[str]) -> float:
  """Runs `command` from the repository root, output passed through; its wall seconds."""
  start = time.perf_counter()
  subprocess.run(command, cwd=REPO, check=True)
  return time.perf_counter() - start


def run_stages(workdir: str, stages: list[int], train_args: list[str], iw_samples: int | None,
               timed=_timed) -> None:
  """Trains and evaluates each stage whose eval_epoch_E.json is missing; `timed(command)` runs
  a command and returns its wall seconds."""
  if stages != sorted(set(stages)) or stages[0] < 1:
    raise app.UsageError(f"--stages={stages} must be increasing positive epoch counts")
  for epochs in stages:
    result = os.path.join(workdir, f"eval_epoch_{epochs}.json")
    if os.path.exists(result):
      continue
    train_s = timed([sys.executable, "train.py", *train_args, "--workdir", workdir,
                     f"--config.num_epochs={epochs}"])
    evaluate = [sys.executable, "-m", "jaxvae.evaluate", "--workdir", workdir]
    if iw_samples:
      evaluate.append(f"--iw_samples={iw_samples}")
    eval_s = timed(evaluate)
    shutil.copyfile(os.path.join(workdir, "eval.json"), result)
    with open(os.path.join(workdir, "stages.jsonl"), "a") as f:
      f.write(json.dumps({"epochs": epochs, "train_s": round(train_s, 1),
                          "eval_s": round(eval_s, 1)}) + "\n")


def main(argv):
  # Everything after `--` is train.py's own flags.
  run_stages(flags.FLAGS.workdir, [int(s) for s in flags.FLAGS.stages], argv[1:],
             flags.FLAGS.iw_samples)


if __name__ == "__main__":
  app.run(main)
