"""One place that builds a run from its config: the model, the objective, each parameter
group's optimizer, the train step, the train state and the checkpoint template.

Training, restoring a run for the commands, and the benchmarks all build through `build` (or
`build_for`), so a checkpoint's state is laid out one way everywhere.
"""

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvae import checkpoint, data, models, objectives, optim, step
from jaxvae.errors import ConfigError
from jaxvae.state import VAE_GROUP, Keys, TrainState


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a config builds before any data flows; see `build`."""
  config: ml_collections.ConfigDict
  image_shape: tuple[int, ...]
  model: models.VAE
  objective: objectives.Objective
  optimizers: dict[str, optax.GradientTransformation]  # one per trained group
  steps_per_epoch: int

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state: every group's parameters from `rng` (see `Objective.init`), each trained
    group's optimizer state, step 0."""
    return self._compiled_init(rng)

  @functools.cached_property
  def _compiled_init(self) -> Callable[[jax.Array], TrainState]:
    """`init_state`, compiled once per experiment: the checkpoint template's shapes and the
    fresh state share one trace (the bits are those of op-by-op init, see `models.init_params`)."""
    def init(rng):
      params = self.objective.init(rng, self.image_shape)
      opt_state = {name: tx.init(params[name]) for name, tx in self.optimizers.items()}
      return TrainState(jnp.zeros((), jnp.int32), params, opt_state, jnp.zeros((), jnp.int32))
    return jax.jit(init)

  def train_step(self) -> Callable:
    """(state, x uint8[B, H, W, C], key) -> (state, metrics); see `step.make_train_step`."""
    return step.make_train_step(self.objective, self.optimizers, self.config)

  def checkpoint_template(self, keys: Keys) -> dict:
    """The structure, shapes and dtypes a checkpoint of this experiment holds."""
    return {"state": jax.eval_shape(self.init_state, keys.init), "keys": keys.as_dict()}

  def legacy_checkpoint(self, template: dict) -> checkpoint.Legacy | None:
    """How to read a checkpoint written before parameter groups had names (its state held the
    model's parameters and one optimizer state directly): into the group "vae", for an
    objective that trains that group alone; `template` is `checkpoint_template(keys)`. None
    for any other objective."""
    state = template["state"]
    if set(state.params) != {VAE_GROUP} or set(state.opt_state) != {VAE_GROUP}:
      return None
    old = {"state": state.replace(params=state.params[VAE_GROUP],
                                  opt_state=state.opt_state[VAE_GROUP]),
           "keys": template["keys"]}

    def convert(tree):
      s = tree["state"]
      return dict(tree, state=s.replace(params={VAE_GROUP: s.params},
                                        opt_state={VAE_GROUP: s.opt_state}))

    return checkpoint.Legacy(old, convert, "was written before parameter groups had names; "
                             "read its parameters and optimizer state as the group 'vae'")


def model_params(state: TrainState):
  """The model's parameters to evaluate, draw and sample with: the moving average of the group
  "vae" when its optimizer keeps one (`optimizer.ema_decay`), else its parameters."""
  params = state.params[VAE_GROUP]
  ema = optim.ema_params(state.opt_state.get(VAE_GROUP), params)
  return params if ema is None else ema


def build(config: ml_collections.ConfigDict, image_shape: Sequence[int], dataset_size: int,
          pixel_mean: np.ndarray | None = None) -> Experiment:
  """The experiment `config` describes for `dataset_size` training images of `image_shape`
  (H, W, C); `pixel_mean` f32[H, W, C], their mean image in [0, 1], is needed by
  `model.output_bias_init="data_mean"` only."""
  model = models.make_model(config.model, image_shape, pixel_mean)
  objective = objectives.make(config, model, dataset_size)
  if model.has_batch_norm and not objective.trains_batch_stats:
    raise ConfigError(f"config.model.arch={config.model.arch!r} holds batch norm, whose "
                      f"statistics objective.kind={objective.kind!r} would never update; train it "
                      "with objective.kind='vae_gan' (objective.variant='vae' for a VAE of "
                      "pixels), or choose another arch")
  steps_per_epoch = dataset_size // config.batch_size
  return Experiment(config, tuple(image_shape), model, objective,
                    objective.optimizers(steps_per_epoch), steps_per_epoch)


def build_for(config: ml_collections.ConfigDict, ds: data.Dataset) -> Experiment:
  """`build` for a loaded dataset's training split."""
  return build(config, ds.image_shape, len(ds.train.images),
               data.pixel_mean(ds.train.images, config.data.binarize))


def summary(exp: Experiment, params: dict) -> str:
  """The model's layer table (`models.summary`) and each further group's parameter count."""
  lines = [models.summary(exp.model, exp.image_shape)]
  lines += [f"group {name!r}: {models.count_params(p):,} parameters"
            + ("" if name in exp.optimizers else " (frozen)")
            for name, p in params.items() if name != VAE_GROUP]
  return "\n".join(lines)
