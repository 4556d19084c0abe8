"""Train state, the compiled epoch, and `train_and_evaluate(config, workdir)`.

The way a batch travels: uint8 images are put on device once; each epoch a permutation from
fold_in(shuffle_key, epoch) orders them; `lax.scan` runs a chunk of steps per compiled call,
gathering and scaling each batch inside the step, with the step's key fold_in(train_key,
step). Metrics are summed on device and reach the host once per chunk. A resumed run
replays exactly, since every key is a function of (seed, epoch, step).
"""

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvae import checkpoint, data, evaluate, figures, models, objectives, parallel
from jaxvae import config as config_lib

TRAIN_SUM_KEYS = ("loss", "elbo_nats", "log_lik_nats", "kl_nats")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32[], global optimizer steps taken (skipped ones included)
  params: Any
  opt_state: Any


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


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """Adam, optionally after global-norm clipping."""
  tx = optax.adam(opt_cfg.learning_rate)
  if opt_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  return tx


def init_state(model: models.VAE, tx: optax.GradientTransformation, rng: jax.Array,
               image_shape) -> TrainState:
  params = models.init_params(model, rng, image_shape)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def make_train_step(model: models.VAE, tx, config):
  """(state, x uint8[B, H, W, C], key) -> (state, metrics of floats[])."""
  loss_fn = functools.partial(objectives.loss, model=model, beta=config.objective.beta,
                              num_samples=config.objective.num_samples)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, x_uint8: jax.Array, key: jax.Array):
    bin_key, z_key = jax.random.split(key)
    x = data.to_unit_interval(x_uint8, bin_key, config.data.binarize)
    (_, metrics), grads = grad_fn(state.params, z_key, x)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_train_chunk(train_step, mesh):
  """Compiles `len(batch_idx)` steps as one call.

  chunk(state, images uint8[N, H, W, C], batch_idx int32[S, B], valid bool[S], train_key)
    -> (state, sums): sums of each metric over the valid steps, and the count `steps`.
  Padded steps (valid False) leave the state untouched, so every chunk has one shape and the
  function compiles once per run.
  """
  batch_sharding = parallel.batch_sharded(mesh)

  def chunk(state, images, batch_idx, valid, train_key):
    def body(state, inputs):
      idx, ok = inputs

      def step(state):
        x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)
        return train_step(state, x, jax.random.fold_in(train_key, state.step))

      def skip(state):
        return state, jax.tree.map(jnp.zeros_like, jax.eval_shape(step, state)[1])

      return jax.lax.cond(ok, step, skip, state)

    state, metrics = jax.lax.scan(body, state, (batch_idx, valid))
    sums = {k: jnp.sum(jnp.where(valid, metrics[k], 0.0)) for k in TRAIN_SUM_KEYS}
    sums["steps"] = valid.sum()
    return state, sums

  return jax.jit(chunk, donate_argnums=0)


def epoch_batches(shuffle_key: jax.Array, epoch: int, num_examples: int, batch_size: int,
                  start: int, chunk_steps: int) -> tuple[jax.Array, jax.Array]:
  """The epoch's batches from step `start` on, padded to whole chunks.

  Returns batch_idx int32[num_chunks, chunk_steps, batch_size] and valid bool[num_chunks,
  chunk_steps]. The last partial batch of each epoch is dropped (its images differ per epoch).
  """
  steps = num_examples // batch_size
  perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)
  idx = perm[: steps * batch_size].reshape(steps, batch_size)[start:]
  num_chunks = math.ceil((steps - start) / chunk_steps)
  pad = num_chunks * chunk_steps - (steps - start)
  idx = jnp.pad(idx, ((0, pad), (0, 0)))
  valid = jnp.arange(num_chunks * chunk_steps) < steps - start
  return (idx.reshape(num_chunks, chunk_steps, batch_size).astype(jnp.int32),
          valid.reshape(num_chunks, chunk_steps))


class _Progress:
  """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

  def __init__(self, enabled: bool, total: int, label: str):
    self.enabled = enabled and sys.stderr.isatty()
    self.total, self.label, self.start = total, label, time.time()

  def update(self, done: int, loss: float):
    if self.enabled:
      frac = done / self.total
      bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
      sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} loss {loss:.2f} "
                       f"{time.time() - self.start:.0f}s")
      sys.stderr.flush()

  def close(self):
    if self.enabled:
      sys.stderr.write("\n")


def _append_jsonl(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _truncate_metrics(path: str, last_epoch: int) -> None:
  """Drops rows past the restored epoch (written before a kill cut their checkpoint short)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)["epoch"] <= last_epoch]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(rows)
  os.replace(tmp, path)


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict]         # this invocation's metrics.jsonl rows
  compiled: dict[str, int]    # compilations of each jitted function (1 each in a healthy run)


@dataclasses.dataclass
class Run:
  """A trained run restored from its workdir, ready for evaluation and figures."""
  config: ml_collections.ConfigDict
  dataset: data.Dataset
  model: models.VAE
  state: TrainState
  keys: Keys
  progress: dict  # epoch, step_in_epoch of the restored checkpoint


def restore_run(workdir: str, step: int | None = None) -> Run:
  """Rebuilds the model and data of WORKDIR from its config.json and restores a checkpoint
  (the latest unless `step` is given)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no config.json; is it a jaxvae run's --workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.model.hidden = tuple(config.model.hidden)
  config.model.conv_channels = tuple(config.model.conv_channels)
  ds = data.load(config.data)
  model = models.make_model(config.model, ds.image_shape)
  keys = Keys.from_seed(config.seed)
  template = jax.eval_shape(
      lambda: init_state(model, make_optimizer(config.optimizer), keys.init, ds.image_shape))
  manager = checkpoint.make_manager(workdir, config.checkpoint.keep)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint; train first")
  state, _, progress = checkpoint.restore(manager, step, template, keys.init)
  manager.close()
  return Run(config, ds, model, state, keys, progress)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains to `config.num_epochs`, evaluating each epoch, resuming from WORKDIR if it can."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.batch_size, mesh)

  ds = data.load(config.data)
  data.check_pixels_fit(ds, config.model.likelihood, config.data.binarize)
  num_train = len(ds.train.images)
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(f"config.batch_size={config.batch_size} exceeds the "
                                 f"{num_train} training images; lower it")
  chunks = min(config.log.chunks_per_epoch, steps_per_epoch)
  chunk_steps = math.ceil(steps_per_epoch / chunks)

  model = models.make_model(config.model, ds.image_shape)
  tx = make_optimizer(config.optimizer)
  keys = Keys.from_seed(config.seed)
  state = init_state(model, tx, keys.init, ds.image_shape)
  replicated = parallel.replicated(mesh)
  state = jax.device_put(state, replicated)
  train_images = jax.device_put(ds.train.images, replicated)

  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(_config_json(config), f, indent=2)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  manager = checkpoint.make_manager(workdir, config.checkpoint.keep, _config_json(config))
  progress = {"epoch": 0, "step_in_epoch": 0, "sums": {}}
  if manager.latest_step() is not None:
    state, _, progress = checkpoint.restore(manager, manager.latest_step(), state, keys.init)
    state = jax.device_put(state, replicated)
    _truncate_metrics(metrics_path, progress["epoch"])
    print(f"resumed from step {int(state.step)} (epoch {progress['epoch']})", flush=True)
  elif os.path.exists(metrics_path):
    os.remove(metrics_path)

  train_chunk = make_train_chunk(make_train_step(model, tx, config), mesh)
  evaluator = evaluate.Evaluator(model, config, ds.test, mesh)
  history = []
  for epoch in range(progress["epoch"], config.num_epochs):
    start_step = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
    sums = progress["sums"] if start_step else {}
    t0 = time.time()
    idx, valid = epoch_batches(keys.shuffle, epoch, num_train, config.batch_size, start_step,
                               chunk_steps)
    bar = _Progress(config.log.progress, steps_per_epoch, f"epoch {epoch + 1}/{config.num_epochs}")
    pending = []
    for i in range(idx.shape[0]):  # dispatch every chunk; read results as they finish
      state, chunk_sums = train_chunk(state, train_images, idx[i], valid[i], keys.train)
      pending.append(chunk_sums)
    done = start_step
    for chunk_sums in pending:
      chunk_sums = jax.device_get(chunk_sums)
      for k, v in chunk_sums.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      done += int(chunk_sums["steps"])
      bar.update(done, sums["loss"] / max(sums["steps"], 1))
    bar.close()
    train_seconds = time.time() - t0
    row = {"epoch": epoch + 1, "step": int(state.step)}
    row.update({f"train/{k}": sums[k] / sums["steps"] for k in TRAIN_SUM_KEYS})
    row["train/seconds"] = train_seconds
    row["train/images_per_s"] = (steps_per_epoch - start_step) * config.batch_size / train_seconds
    t1 = time.time()
    row.update({f"test/{k}": v for k, v in evaluator(state.params, keys.eval).items()})
    row["test/seconds"] = time.time() - t1
    _append_jsonl(metrics_path, row)  # before the checkpoint: a kill in between replays the epoch
    history.append(row)
    print(_summary(row), flush=True)
    progress = {"epoch": epoch + 1, "step_in_epoch": 0, "sums": {}}
    last = epoch + 1 == config.num_epochs
    if last or (epoch + 1) % config.checkpoint.every_epochs == 0:
      checkpoint.save(manager, state, keys.init, progress, {"test/elbo_nats": row["test/elbo_nats"]})
    if last or (config.figures_every and (epoch + 1) % config.figures_every == 0):
      figures.draw_training_figures(workdir, model, state.params, ds, config, keys.eval)
  manager.wait_until_finished()
  manager.close()
  return TrainResult(state, history, {"train_chunk": train_chunk._cache_size(),
                                      "evaluate": evaluator.cache_size()})


def _summary(row: dict) -> str:
  keys = ("train/loss", "test/elbo_nats", "test/bits_per_dim", "test/ssim")
  parts = [f"{k} {row[k]:.4g}" for k in keys if k in row]
  return (f"epoch {row['epoch']} step {row['step']}: " + ", ".join(parts)
          + f", {row['train/seconds']:.1f}s train ({row['train/images_per_s']:.0f} img/s), "
          f"{row['test/seconds']:.1f}s test")

