"""The optimizer a `config.optimizer` describes: Adam, its learning-rate schedule, clipping.

Schedules (`optimizer.schedule`) are piecewise constant in epochs:
  constant:  `learning_rate` throughout.
  piecewise: stage i runs from epoch `stage_end_epochs[i - 1]` (0 for the first) to epoch
             `stage_end_epochs[i]` at `stage_learning_rates[i]`; `learning_rate` is unused.
  iwae:      Burda, Grosse & Salakhutdinov (2016): stage i = 0..7 runs 3^i epochs at
             `learning_rate` * 10^(-i/7), 3,280 epochs in all (ends 1, 4, 13, ..., 3280).
The schedule reads optax's own count of applied updates, which lives in the optimizer state
and so in every checkpoint: a resumed run continues the schedule exactly. A step skipped as
non-finite (`optimizer.skip_nonfinite`) leaves that count, like all optimizer state, as it
was, so each skip moves the later stage boundaries one step on.
"""

import itertools
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "piecewise", "iwae")
IWAE_STAGES = 8  # i = 0..7


def schedule_stages(opt_cfg) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """(end epoch, learning rate) of each stage of `opt_cfg.schedule`, as two tuples.

  Stage i runs from epoch ends[i - 1] (0 for the first) up to ends[i]. `constant` is one
  stage without an end: ((), (learning_rate,)).
  """
  if opt_cfg.schedule == "iwae":
    ends = tuple(itertools.accumulate(3 ** i for i in range(IWAE_STAGES)))
    return ends, tuple(opt_cfg.learning_rate * 10 ** (-i / 7) for i in range(IWAE_STAGES))
  if opt_cfg.schedule == "piecewise":
    return tuple(opt_cfg.stage_end_epochs), tuple(opt_cfg.stage_learning_rates)
  return (), (opt_cfg.learning_rate,)


def schedule_problem(opt_cfg, num_epochs: int, length: str = "") -> str | None:
  """Why `opt_cfg`'s schedule cannot run `num_epochs` epochs (naming the keys), or None.
  `length` names the key that sets the run's length (default `config.num_epochs=...`)."""
  if opt_cfg.schedule == "piecewise":
    ends, rates = tuple(opt_cfg.stage_end_epochs), tuple(opt_cfg.stage_learning_rates)
    if not ends or len(ends) != len(rates):
      return ("config.optimizer.schedule='piecewise' needs one config.optimizer."
              "stage_learning_rates entry per config.optimizer.stage_end_epochs entry, at least "
              f"one; got the ends {ends} and the rates {rates}")
    if not all(isinstance(e, int) and e > 0 for e in ends) or list(ends) != sorted(set(ends)):
      return (f"config.optimizer.stage_end_epochs={ends} must be positive ints in increasing "
              "order, e.g. (10, 20, 30)")
    if not all(isinstance(r, (int, float)) and r > 0 for r in rates):
      return f"config.optimizer.stage_learning_rates={rates} must be positive numbers"
  ends, _ = schedule_stages(opt_cfg)
  if ends and ends[-1] < num_epochs:
    length = length or f"config.num_epochs={num_epochs}"
    return (f"config.optimizer.schedule={opt_cfg.schedule!r} ends at epoch {ends[-1]} (stage "
            f"ends {ends}) but {length}; shorten the run or, with 'piecewise', extend "
            "config.optimizer.stage_end_epochs")
  return None


def learning_rate(opt_cfg, steps_per_epoch: int) -> float | optax.Schedule:
  """The float learning rate, or the schedule: int32[] count of applied updates -> f32[]."""
  if opt_cfg.schedule == "constant":
    return opt_cfg.learning_rate
  ends, rates = schedule_stages(opt_cfg)
  # The first step of each later stage; a count past the last end keeps the last rate.
  starts = np.asarray([end * steps_per_epoch for end in ends[:-1]], np.int32)
  rates = np.asarray(rates, np.float32)
  return lambda count: jnp.asarray(rates)[jnp.searchsorted(starts, count, side="right")]


def make_optimizer(opt_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (b1, b2, eps) at the configured learning rate or schedule, optionally after
  global-norm clipping, and optionally keeping an exponential moving average of the parameters
  (`ema_decay`); with `flatten`, all of it on the parameters raveled into one vector.
  `steps_per_epoch` turns the schedule's epochs into steps."""
  tx = optax.adam(learning_rate(opt_cfg, steps_per_epoch), b1=opt_cfg.b1, b2=opt_cfg.b2,
                  eps=opt_cfg.eps)
  if opt_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  if opt_cfg.ema_decay > 0:
    tx = optax.chain(tx, track_ema(opt_cfg.ema_decay))
  # One flat vector instead of an update per parameter array: XLA:CPU compiled the top-down
  # model's step (about 400 arrays) 1.7x faster so, at the same step time.
  return optax.flatten(tx) if opt_cfg.flatten else tx


class EmaState(NamedTuple):
  """The moving average of the parameters, shaped like them, after `count` updates."""
  count: jax.Array
  params: Any


def track_ema(decay: float) -> optax.GradientTransformation:
  """Leaves the updates as they are and keeps, after t updates, the debiased moving average
  of the parameters p_1..p_t they produced: sum_i d^(t-i) p_i / sum_i d^(t-i) with d = `decay`
  (VD-VAE evaluates such an average, decay 0.9999). Debiased, the initial parameters carry no
  weight; started from them instead, they would still weigh d^t (0.67 after 400 steps at
  0.999). It lives in the optimizer state, so it is checkpointed, restored, sharded and
  skipped with the rest of the group."""
  d = jnp.float32(decay)

  def init(params):
    return EmaState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("track_ema needs the parameters: call update(updates, state, params)")
    new = optax.apply_updates(params, updates)
    count = state.count + 1
    # The running form of the weighted mean above; the first update's weight is exactly 1.
    weight = (1 - d) / (1 - d ** count)
    ema = jax.tree.map(lambda e, p: e + weight.astype(e.dtype) * (p - e), state.params, new)
    return updates, EmaState(count, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state, params) -> Any | None:
  """The moving average `track_ema` keeps in a group's optimizer state, shaped like that
  group's `params` (a flattened optimizer keeps it raveled), or None."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, EmaState))
           if isinstance(s, EmaState)]
  if not found:
    return None
  ema = found[0].params
  if jax.tree.structure(ema) != jax.tree.structure(params):
    ema = jax.flatten_util.ravel_pytree(params)[1](ema)
  return ema
