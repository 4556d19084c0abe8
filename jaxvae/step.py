"""One optimizer step over an objective's named parameter groups.

The objective gives each trained group's loss and gradients (`objectives.base.Objective`);
here each group's optimizer is applied and a group whose update is not finite keeps its
parameters and optimizer state (`optimizer.skip_nonfinite`).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxvae import data
from jaxvae.objectives import Objective, StepGradients
from jaxvae.state import TrainState


def _finite(loss: jax.Array, grads, check: str) -> jax.Array:
  """bool[]: whether a group's step may be applied under `check` ("grads" or "loss")."""
  finite = jnp.isfinite(loss)
  if check == "grads":
    finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  return finite


def make_train_step(objective: Objective, optimizers: dict[str, optax.GradientTransformation],
                    config) -> Callable:
  """(state, x uint8[B, H, W, C], key) -> (state, metrics of f32[]).

  The step binarizes x with one half of `key` and gives the other to the objective, at the
  step `state.step`. Collections the objective returns (batch statistics) replace the group's
  after its update. With `config.optimizer.skip_nonfinite` "grads", a group whose loss or any
  gradient is not finite keeps its parameters and optimizer state; with "loss" only its loss
  is checked (no pass over the gradients). A skipped step still advances `step` (so the next
  step draws a fresh key) and counts in `skips`, which a step applied to every group resets;
  metrics["skipped"] says whether any group was skipped. With "off" every update is applied
  and the caller stops on a non-finite loss. With `config.optimizer.skip_grad_norm` > 0, a
  group whose gradient norm reaches it is skipped the same way (VD-VAE's skip threshold), and
  metrics["<group>_grad_norm"] reports the norm (before any clipping).
  """
  check, max_norm = config.optimizer.skip_nonfinite, config.optimizer.skip_grad_norm

  def train_step(state: TrainState, x_uint8: jax.Array, key: jax.Array):
    bin_key, z_key = jax.random.split(key)
    x = data.to_unit_interval(x_uint8, bin_key, config.data.binarize)
    losses, grads, metrics, collections = StepGradients(
        *objective.gradients(state.params, z_key, x, state.step))
    params, opt_state, oks = dict(state.params), dict(state.opt_state), []
    for name, tx in optimizers.items():
      updates, new_opt = tx.update(grads[name], state.opt_state[name], state.params[name])
      new_params = optax.apply_updates(state.params[name], updates)
      if collections and name in collections:
        new_params = {**new_params, **collections[name]}
      if check == "off":
        params[name], opt_state[name] = new_params, new_opt
        continue
      ok = _finite(losses[name], grads[name], check)
      if max_norm:
        norm = optax.tree.norm(grads[name])
        ok &= norm < max_norm
        metrics = dict(metrics, **{f"{name}_grad_norm": norm})
      keep = lambda new, old, ok=ok: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      params[name] = keep(new_params, state.params[name])
      opt_state[name] = keep(new_opt, state.opt_state[name])
      oks.append(ok)
    if check == "off":
      return (TrainState(state.step + 1, params, opt_state, state.skips),
              dict(metrics, skipped=jnp.zeros((), bool), skips=state.skips))
    finite = jnp.all(jnp.stack(oks))
    skips = jnp.where(finite, 0, state.skips + 1)
    return (TrainState(state.step + 1, params, opt_state, skips),
            dict(metrics, skipped=~finite, skips=skips))

  return train_step
