"""Orbax checkpoints of the whole run state in WORKDIR/checkpoints/.

A checkpoint is keyed by the global step and holds `state` (params, optimizer state, step),
the typed PRNG key's data, and `progress` (epoch, position in it, the epoch's partial train
sums), with the resolved config as the manager's metadata. Everything else a resumed run needs
(data order, per-step keys) is a function of (seed, epoch, step).
"""

import json
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


def make_manager(workdir: str, keep: int, config_json: dict | None = None) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints and the best by test ELBO."""
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(keep),
      cm.BestN(get_metric_fn=lambda m: m["test/elbo_nats"], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, metadata=config_json)


def save(manager: ocp.CheckpointManager, state, rng: jax.Array, progress: dict,
         metrics: dict | None = None) -> None:
  """Starts an async save at `state.step`; `manager.wait_until_finished()` completes it."""
  # One array item: orbax 0.12.8 fails ("cannot schedule new futures") on two in a Composite.
  arrays = {"state": state, "rng": jax.random.key_data(rng)}
  items = {"arrays": ocp.args.StandardSave(arrays), "progress": ocp.args.JsonSave(progress)}
  manager.save(int(state.step), args=ocp.args.Composite(**items),
               metrics={k: float(v) for k, v in (metrics or {}).items()})


def restore(manager: ocp.CheckpointManager, step: int, state_template, rng_template: jax.Array):
  """Restores (state, rng, progress) at `step` into the shapes/dtypes of the templates."""
  template = {"state": state_template, "rng": jax.random.key_data(rng_template)}
  items = {"arrays": ocp.args.StandardRestore(template), "progress": ocp.args.JsonRestore()}
  out = manager.restore(step, args=ocp.args.Composite(**items))
  rng = jax.random.wrap_key_data(out["arrays"]["rng"], impl=jax.random.key_impl(rng_template))
  return out["arrays"]["state"], rng, dict(out["progress"])


def saved_config(manager: ocp.CheckpointManager) -> dict | None:
  meta = manager.metadata()
  custom = getattr(meta, "custom_metadata", None)
  return json.loads(json.dumps(custom)) if custom else None
