"""Trains a VAE: python train.py --config configs/cifar10.py --workdir runs/cifar10 [--config.key=value ...]

Running the same command with the same --workdir resumes from its latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxvae.train import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go as --config.key=value")
  if not flags.FLAGS.is_parsed() or flags.FLAGS["verbosity"].using_default_value:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
