"""Records every config's parameters after two train steps, for tests/test_fingerprints.py.

Each variant is a config of configs/ (or an objective override of one) at batch 8 on fixed
random images. tests/data/fingerprints.json was recorded once at 4f1e8a4 (before the objective
seam), from that checkout's root, under XLA's default flags:
    PYTHONPATH=. python tests/data/record_fingerprints.py --old > tests/data/fingerprints.json
and fingerprints_fast_compile.json at 14b721e, after checking that its default-flag numbers
equal those, under the suite's flags (tests/conftest.py FAST_COMPILE_FLAGS):
    XLA_FLAGS="$FAST_COMPILE_FLAGS" PYTHONPATH=. python tests/data/record_fingerprints.py --new \
        > tests/data/fingerprints_fast_compile.json
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar10, cifar10_conv, digits, mnist_iwae, sprites_beta_vae, sprites_locatello

STEPS, BATCH, DATASET = 2, 8, 1000


def variants():
  """(name, config, image shape) of every config, and of each objective it is run with."""
  yield "cifar10", cifar10.get_config(), (32, 32, 3)
  yield "cifar10_conv", cifar10_conv.get_config(), (32, 32, 3)
  yield "digits", digits.get_config(), (8, 8, 1)
  yield "mnist_iwae", mnist_iwae.get_config("1"), (28, 28, 1)
  c = mnist_iwae.get_config("1")
  c.objective.kind, c.objective.num_samples = "iwae", 5
  yield "mnist_iwae_k5", c, (28, 28, 1)
  c = mnist_iwae.get_config("2")
  c.objective.kind, c.objective.num_samples = "iwae", 5
  yield "mnist_iwae2_k5", c, (28, 28, 1)
  yield "sprites_beta_vae", sprites_beta_vae.get_config(), (64, 64, 1)
  c = sprites_beta_vae.get_config()
  c.objective.kind, c.objective.beta = "capacity", 1.0
  yield "sprites_capacity", c, (64, 64, 1)
  c = sprites_beta_vae.get_config()
  c.objective.kind, c.objective.beta = "beta_tcvae", 1.0
  yield "sprites_beta_tcvae", c, (64, 64, 1)
  c = sprites_beta_vae.get_config()
  c.objective.warmup_steps, c.objective.free_bits = 10, 0.5
  yield "sprites_warmup_free_bits", c, (64, 64, 1)
  yield "sprites_locatello", sprites_locatello.get_config(), (64, 64, 1)


def images(shape):
  return np.random.default_rng(0).integers(0, 256, (STEPS * BATCH,) + shape, dtype=np.uint8)


def fingerprint(params, loss) -> dict:
  leaves = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
  return {"sum": float(sum(p.sum() for p in leaves)),
          "sum_squares": float(sum((p * p).sum() for p in leaves)),
          "loss": float(loss)}


def run(config, shape, init_and_step) -> dict:
  """Two steps of the train step from `init_and_step(config, shape, pixel_mean)`."""
  config.batch_size = BATCH
  x = images(shape)
  state, step = init_and_step(config, shape, x.astype(np.float32).mean(0) / 255)
  step, key = jax.jit(step), jax.random.key(7)
  for i in range(STEPS):
    state, metrics = step(state, jnp.asarray(x[i * BATCH:(i + 1) * BATCH]),
                          jax.random.fold_in(key, i))
  return state, metrics["loss"]


def _old_init_and_step(config, shape, pixel_mean):
  from jaxvae import models, optim, state as state_lib, train
  model = models.make_model(config.model, shape, pixel_mean)
  tx = optim.make_optimizer(config.optimizer, DATASET // BATCH)
  init = jax.jit(lambda key: state_lib.init_state(model, tx, key, shape))
  return init(state_lib.Keys.from_seed(config.seed).init), train.make_train_step(model, tx, config,
                                                                                  DATASET)


if __name__ == "__main__":
  assert sys.argv[1:] in (["--old"], ["--new"]), "usage: record_fingerprints.py --old | --new"
  old = sys.argv[1] == "--old"
  if not old:  # today's code: the builder and the named parameter groups
    sys.path.insert(0, "tests")
    from test_fingerprints import init_and_step
  out = {}
  for name, config, shape in variants():
    state, loss = run(config, shape, _old_init_and_step if old else init_and_step)
    out[name] = fingerprint(state.params if old else state.params["vae"], loss)
  print(json.dumps(out, indent=1))
