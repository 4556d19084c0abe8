"""What a training run carries from step to step: the train state and the run's keys.

Both are saved in every checkpoint; a run restored from them replays exactly, since every
random draw is a function of these keys and the step.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxvae import models


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[], global optimizer steps taken (skipped ones included)
  params: Any
  opt_state: Any
  skips: jax.Array  # int32[], non-finite steps skipped in a row up to now


@dataclasses.dataclass(frozen=True)
class Keys:
  """The run's independent random streams, all from `config.seed`."""
  init: jax.Array
  train: jax.Array    # step key: fold_in(train, step)
  shuffle: jax.Array  # epoch order: fold_in(shuffle, epoch)
  eval: jax.Array     # fixed across epochs, so test figures are comparable

  @classmethod
  def from_seed(cls, seed: int) -> "Keys":
    return cls(*jax.random.split(jax.random.key(seed), 4))

  def as_dict(self) -> dict[str, jax.Array]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def init_state(model: models.VAE, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape) -> TrainState:
  params = models.init_params(model, rng, image_shape)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
