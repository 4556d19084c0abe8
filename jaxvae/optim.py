"""The optimizer a `config.optimizer` describes."""

import optax


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Adam, optionally after global-norm clipping."""
  tx = optax.adam(opt_cfg.learning_rate)
  if opt_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  return tx
