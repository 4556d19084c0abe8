"""A trained run rebuilt from its WORKDIR for the evaluate, figures and sample commands."""

import dataclasses
import functools
import json
import os
import sys

import ml_collections
from absl import app, flags, logging

from jaxvae import checkpoint, data, experiment, models, parallel
from jaxvae import config as config_lib
from jaxvae.errors import ConfigError
from jaxvae.rundir import RunError
from jaxvae.state import Keys, TrainState


@dataclasses.dataclass
class TrainedRun:
  """A trained run restored from its workdir, ready for evaluation and figures."""
  config: ml_collections.ConfigDict
  dataset: data.Dataset
  experiment: experiment.Experiment
  state: TrainState
  keys: Keys
  progress: dict  # epoch, step_in_epoch of the restored checkpoint

  @property
  def model(self) -> models.VAE:
    return self.experiment.model

  @property
  def params(self):
    """The model's parameters (the group "vae", or their moving average when the run keeps
    one: `experiment.model_params`)."""
    return experiment.model_params(self.state)


def restore_run(workdir: str, step: int | None = None) -> TrainedRun:
  """Rebuilds the experiment and data of WORKDIR from its config.json and restores a
  checkpoint (the latest unless `step` is given)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunError(f"{workdir} holds no config.json; give the --workdir of a jaxvae run "
                   "(train one with train.py first)")
  with open(path) as f:
    saved = json.load(f)
  # Laid over today's defaults, so a run saved before a key existed still restores.
  config = config_lib.base_config()
  known = config_lib.flatten(config.to_dict())
  config.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in config_lib.flatten(saved).items() if k in known})
  ds = data.load(config.data)
  exp = experiment.build_for(config, ds)
  keys = Keys.from_seed(config.seed)
  manager = checkpoint.make_manager(workdir, config.checkpoint.keep)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise RunError(f"{workdir}/checkpoints holds no checkpoint; train first (or let the run "
                   "reach its first evaluation)")
  template = exp.checkpoint_template(keys)
  tree, progress = checkpoint.restore(manager, step, template,
                                      parallel.replicated(parallel.make_mesh()),
                                      exp.legacy_checkpoint(template))
  manager.close()
  return TrainedRun(config, ds, exp, tree["state"], Keys(**tree["keys"]), progress)


# Bad input of every kind; each message says what was wrong and what to do.
USER_ERRORS = (ConfigError, data.DataError, checkpoint.CheckpointError, RunError)


def exit_on_user_error(main):
  """Wraps a command's `main(argv)`: bad input ends it with one line `error: ...` and exit
  status 1, never a traceback."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      sys.exit(f"error: {e}")
  return wrapped


def restore_for_command(argv: list[str], workdir: str) -> TrainedRun:
  """`restore_run` for the evaluate, figures and sample commands: refuses stray arguments and,
  unless --verbosity is given, quiets orbax, which logs every file it reads at INFO."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return restore_run(workdir)
