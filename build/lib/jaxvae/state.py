"""What a training run carries from step to step: the train state and the run's keys.

Both are saved in every checkpoint; a run restored from them replays exactly, since every
random draw is a function of these keys and the step.
"""

import dataclasses
from typing import Any

import flax
import jax

# The one group of a single-network objective; objectives with more networks name theirs.
VAE_GROUP = "vae"


@flax.struct.dataclass
class TrainState:
  """Parameters and optimizer states by group name ({"vae": ...} for a single-network
  objective; see `jaxvae.objectives.base`). A group without an optimizer state is frozen."""
  step: jax.Array  # int32[], global optimizer steps taken (skipped ones included)
  params: dict[str, Any]
  opt_state: dict[str, Any]
  skips: jax.Array  # int32[], steps skipped in a row up to now (any group non-finite)


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
