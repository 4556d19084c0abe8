"""The seam between an objective and the trainer.

An objective owns its `config.objective` keys and their checks, names the parameter groups it
trains (each with its networks and optimizer), initializes them, and computes one step's loss
and gradients per group together with whatever metrics it has. The trainer applies each
group's optimizer, skips a group's update whose loss or gradients are not finite, and averages
every metric the step returns into the metrics rows.

Most objectives train one group, "vae" (the model, `config.optimizer`), on one loss: they
subclass `Objective`, set `kind` and `defaults`, and write `loss`. Objectives with more
networks override `init`, `optimizers` and `gradients` as well (see docs/extending.md).
"""

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxvae import models, optim
from jaxvae.errors import ConfigError
from jaxvae.state import VAE_GROUP

# Keys every objective may read; each kind adds its own `defaults`.
SHARED_DEFAULTS = {
    "kind": "elbo",        # which objective: one of `objectives.KINDS`
    "num_samples": 1,      # L, Monte Carlo draws of z per example; iwae: its k (>= 2)
    "warmup_steps": 0,     # KL warm-up: the KL weights rise from 0 over these optimizer steps
                           # (0: off); a function of the step, so a resumed run past it trains
                           # at full weight
    "free_bits": 0.0,      # nats: each latent dim's batch-mean KL is floored here in the loss
                           # (0: off); beta_tcvae floors its dimension-wise KL
}

KINDS: dict[str, type["Objective"]] = {}  # kind -> class, filled as each module is imported


class StepGradients(NamedTuple):
  """One step of an objective, as `Objective.gradients` returns it."""
  losses: dict[str, jax.Array]  # f32[] per trained group
  grads: dict[str, Any]         # per trained group, shaped like its parameters
  metrics: dict[str, jax.Array]  # f32[] each
  # Per group, the new values of collections that are not trained by gradient (batch norm's
  # "batch_stats"), which replace those of the updated parameters; skipped with the group.
  collections: dict[str, dict[str, Any]] | None = None


class Objective:
  """One training objective over named parameter groups; by default the one group "vae".

  Built by `objectives.make(config, model, dataset_size)`; `dataset_size` is the number of
  training examples (beta_tcvae's estimator needs it).
  """
  kind: ClassVar[str]
  defaults: ClassVar[dict[str, Any]] = {}  # its own config.objective keys and their defaults
  # Whether `gradients` returns the model's new batch-norm statistics (`StepGradients`); a
  # model with batch norm is refused by objectives that do not.
  trains_batch_stats: ClassVar[bool] = False
  # Whether its loss weights the KL by `objective.beta`; other kinds refuse beta != 1.
  reads_beta: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "kind" in cls.__dict__:
      KINDS[cls.kind] = cls

  def __init__(self, config: ml_collections.ConfigDict, model: models.VAE,
               dataset_size: int | None = None):
    self.config, self.cfg, self.model, self.dataset_size = (config, config.objective, model,
                                                            dataset_size)

  @classmethod
  def check_keys(cls, o: ml_collections.ConfigDict) -> None:
    """Range checks of this kind's own keys, made whatever the kind (ConfigError)."""

  @classmethod
  def check(cls, config: ml_collections.ConfigDict) -> None:
    """Checks of a config that trains this kind (ConfigError naming the key and a fix)."""

  def init(self, rng: jax.Array, image_shape) -> dict[str, Any]:
    """The parameters of every group: {"vae": the model's}."""
    return {VAE_GROUP: models.init_params(self.model, rng, image_shape)}

  def optimizers(self, steps_per_epoch: int) -> dict[str, optax.GradientTransformation]:
    """The optimizer of each trained group; a group without one (a frozen network) is held
    fixed. `steps_per_epoch` turns epoch schedules into steps."""
    return {VAE_GROUP: optim.make_optimizer(self.config.optimizer, steps_per_epoch)}

  def gradients(self, params: dict[str, Any], rng: jax.Array, x: jax.Array, step: jax.Array
                ) -> StepGradients | tuple:
    """One step's loss f32[] per trained group, gradients per trained group and metrics f32[]
    (a `StepGradients`, or a tuple of its first three fields).

    x: f32[B, H, W, C]; step: int32[], the optimizer steps taken before this one. Metrics hold
    "loss" (the objective's value) and the plain ELBO ("elbo_nats", "log_lik_nats", "kl_nats").
    """
    (value, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(params[VAE_GROUP], rng,
                                                                         x, step)
    return StepGradients({VAE_GROUP: value}, {VAE_GROUP: grads}, metrics)

  def loss(self, params, rng: jax.Array, x: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The "vae" group's loss f32[] (a mean over the batch) and metrics of f32[]."""
    raise NotImplementedError(f"objective {self.kind!r} has one group and must define loss()")

  def weight(self, target: float, step: jax.Array) -> float | jax.Array:
    """A KL weight after `warmup_steps` of warm-up: target * min(step / warmup_steps, 1)."""
    # Without warm-up the weight stays a Python number, so the loss's program is unchanged.
    return target * warmup(step, self.cfg.warmup_steps) if self.cfg.warmup_steps else target


def elbo_metrics(value: jax.Array, log_lik: jax.Array, kl: jax.Array) -> dict[str, jax.Array]:
  """The batch metrics every objective reports: its value and the plain ELBO, nats per example."""
  return {"loss": value, "elbo_nats": log_lik - kl, "log_lik_nats": log_lik, "kl_nats": kl}


def warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
  """KL warm-up (Sonderby et al. 2016): min(step / warmup_steps, 1), the share of its target
  a KL weight has at `step` (0 at the first step). f32[]."""
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def check_nonnegative(o: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    if o[key] < 0:
      raise ConfigError(f"config.objective.{key}={o[key]} must be >= 0")


def check_one_layer(config: ml_collections.ConfigDict, what: str) -> None:
  """Refuses a two-layer model for `what`, which reads one Gaussian posterior per code dim."""
  if config.model.middle_dim:
    raise ConfigError(f"{what} reads one Gaussian posterior per latent dim, and a two-layer model "
                      f"(config.model.middle_dim={config.model.middle_dim}) has none over its top "
                      "code; use objective.kind='elbo', 'capacity' or 'iwae' without free bits, "
                      "or set model.middle_dim=0")
