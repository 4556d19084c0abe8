"""Train state, the compiled epoch, and `train_and_evaluate(config, workdir)`.

The way a batch travels: uint8 images are put on device once; each epoch a permutation from
fold_in(shuffle_key, epoch) orders them; a chunk of steps runs per call, as one compiled loop
(or, for convolutions on CPU, one compiled call per step: see `jaxvae.loops`), gathering and
scaling each batch inside the step, with the step's key fold_in(train_key, step). Metrics are
summed on device and reach the host once per chunk. A resumed run replays exactly, since every
key is a function of (seed, epoch, step).
"""

import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvae import checkpoint, data, evaluate, figures, loops, models, objectives, optim, parallel
from jaxvae import run as run_lib
from jaxvae import config as config_lib
from jaxvae.state import Keys, TrainState, init_state

TRAIN_SUM_KEYS = ("loss", "elbo_nats", "log_lik_nats", "kl_nats")


def make_train_step(model: models.VAE, tx, config):
  """(state, x uint8[B, H, W, C], key) -> (state, metrics of floats[]).

  With `config.optimizer.skip_nonfinite` "grads", a step whose loss or any gradient is not
  finite leaves params and optimizer state as they were; with "loss" only the loss is checked
  (no pass over the gradients). A skipped step still advances `step` (so the next step draws a
  fresh key) and counts in `skips`, which an applied step resets; metrics["skipped"] says which
  happened. With "off" every step is applied and the caller stops on a non-finite loss.
  """
  loss_fn = functools.partial(objectives.loss, model=model, beta=config.objective.beta,
                              num_samples=config.objective.num_samples)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  check = config.optimizer.skip_nonfinite

  def train_step(state: TrainState, x_uint8: jax.Array, key: jax.Array):
    bin_key, z_key = jax.random.split(key)
    x = data.to_unit_interval(x_uint8, bin_key, config.data.binarize)
    (loss, metrics), grads = grad_fn(state.params, z_key, x)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if check == "off":
      return (TrainState(state.step + 1, params, opt_state, state.skips),
              dict(metrics, skipped=jnp.zeros((), bool), skips=state.skips))
    finite = jnp.isfinite(loss)
    if check == "grads":
      finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skips = jnp.where(finite, 0, state.skips + 1)
    metrics = dict(metrics, skipped=~finite, skips=skips)
    return TrainState(state.step + 1, keep(params, state.params),
                      keep(opt_state, state.opt_state), skips), metrics

  return train_step


def make_train_chunk(train_step, mesh, loop: str):
  """Up to S steps as one call, in `loop` mode ("scan" or "per_step", see `jaxvae.loops`).

  chunk(state, batches uint8[S, B, H, W, C] (batch axis sharded, see `parallel.gather_batches`),
        valid bool[S], train_key, stop int32[D] (see `parallel.signal_array`))
    -> (state, sums): sums of each metric over the applied steps, the counts `steps` (valid),
    `skipped_steps` and `nonfinite_loss_steps`, `max_skips`, the longest run of skips so far,
    `stop`, the largest signal number any process had seen when it sent the chunk (0: none),
    and `params_finite`, whether every parameter is finite after it.
  `valid` is a prefix: the epoch's last chunk is padded, and only the valid steps run. "scan"
  compiles the chunk as one program with a loop of dynamic length, so every chunk has one shape
  and the function compiles once per run; "per_step" is a `StepwiseChunk` (valid read on the
  host). Both draw step keys fold_in(train_key, state.step) and sum the same way.
  """
  batch_sharding = parallel.batch_sharded(mesh)

  def blank_metrics(state, batches, train_key):
    shapes = jax.eval_shape(train_step, state, batches[0], train_key)[1]
    return jax.tree.map(lambda m: jnp.zeros(batches.shape[:1] + m.shape, m.dtype), shapes)

  def step(i, state, metrics, batches, train_key):
    """Step i of the chunk; its metrics go to row i of `metrics` (each [S, ...])."""
    x = jax.lax.with_sharding_constraint(batches[i], batch_sharding)
    state, step_metrics = train_step(state, x, jax.random.fold_in(train_key, state.step))
    return state, jax.tree.map(lambda m, v: m.at[i].set(v), metrics, step_metrics)

  def sums_of(state, metrics, valid, stop):
    applied = valid & ~metrics["skipped"]
    sums = {k: jnp.sum(jnp.where(applied, metrics[k], 0.0)) for k in TRAIN_SUM_KEYS}
    sums["steps"] = valid.sum()
    sums["skipped_steps"] = (valid & metrics["skipped"]).sum()
    sums["nonfinite_loss_steps"] = (valid & ~jnp.isfinite(metrics["loss"])).sum()
    sums["max_skips"] = jnp.max(jnp.where(valid, metrics["skips"], 0))
    # Every process reads the same value from the same chunk, so all stop at the same step.
    sums["stop"] = jnp.max(stop)
    # One pass per chunk: what the "loss" and "off" skip modes let through never reaches a
    # checkpoint.
    sums["params_finite"] = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(state.params)]))
    return sums

  options = compiler_options(mesh)
  if loop == "per_step":
    # Placed as the step places its metrics, so the step sees one input type: one compilation.
    return StepwiseChunk(jax.jit(blank_metrics, out_shardings=parallel.replicated(mesh)),
                         jax.jit(step, donate_argnums=(1, 2), compiler_options=options),
                         jax.jit(sums_of))

  def chunk(state, batches, valid, train_key, stop):
    metrics = blank_metrics(state, batches, train_key)
    # A loop of dynamic length: padded steps are never entered, with no lax.cond to skip them.
    state, metrics = jax.lax.fori_loop(
        0, valid.sum(), lambda i, carry: step(i, *carry, batches, train_key), (state, metrics))
    return state, sums_of(state, metrics, valid, stop)

  return jax.jit(chunk, donate_argnums=0, compiler_options=options)


class StepwiseChunk:
  """A train chunk as one compiled call per valid step, driven from Python, for convolutions
  on XLA:CPU (see `jaxvae.loops`); called like the scanned chunk, with `valid` on the host.

  Three programs: `blank` (the zeroed metrics rows), `step` (one step, state and metrics
  donated) and `sums` (the chunk's sums). Each compiles once per run, whatever the chunk's
  number of valid steps, and each step is the same program wherever a chunk starts, so a
  resumed run replays bit for bit. `lower` and `compile` mirror `jax.jit`'s ahead-of-time
  stages: `chunk.lower(*args).compile()` is a StepwiseChunk of compiled programs, whose
  `as_text()` is their HLO.
  """

  def __init__(self, blank, step, sums):
    self.programs = (blank, step, sums)

  def __call__(self, state, batches, valid, train_key, stop):
    blank, step, sums = self.programs
    metrics = blank(state, batches, train_key)
    for i in range(int(np.sum(valid))):
      state, metrics = step(np.int32(i), state, metrics, batches, train_key)
    return state, sums(state, metrics, valid, stop)

  def lower(self, state, batches, valid, train_key, stop) -> "_LoweredChunk":
    blank, step, sums = self.programs
    metrics = jax.eval_shape(blank, state, batches, train_key)
    return _LoweredChunk((blank.lower(state, batches, train_key),
                          step.lower(np.int32(0), state, metrics, batches, train_key),
                          sums.lower(state, metrics, valid, stop)))

  def as_text(self) -> str:
    """The HLO of the three programs of a compiled chunk (see `lower`)."""
    return "\n".join(program.as_text() for program in self.programs)

  def _cache_size(self) -> int:
    """Compilations of the most compiled program: 1 in a healthy run, as for `jax.jit`."""
    return max(program._cache_size() for program in self.programs)


@dataclasses.dataclass(frozen=True)
class _LoweredChunk:
  lowered: tuple

  def compile(self) -> StepwiseChunk:
    return StepwiseChunk(*(program.compile() for program in self.lowered))


def compiler_options(mesh) -> dict:
  """XLA options for the train chunk on this mesh's platform."""
  # XLA:CPU's default copy insertion copies the loop-carried parameters that the optimizer
  # updates in place (about 8 MB per step for the paper's model); region analysis proves the
  # copies unneeded: 11.6 -> 8.3 ms per step at batch 32 on 2 cores, bitwise the same result.
  if mesh.devices.flat[0].platform == "cpu":
    return {"xla_cpu_copy_insertion_use_region_analysis": True}
  return {}


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
  """A one-line progress bar on stderr, drawn only when stderr is a terminal (of process 0)."""

  def __init__(self, enabled: bool, total: int, label: str):
    self.enabled = enabled and sys.stderr.isatty() and parallel.is_primary()
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


class _StopRequest:
  """Turns SIGINT/SIGTERM into `signum`, which the training loop checks between chunks; a
  second signal acts at once (the previous handler). Handlers can only be set in the main
  thread; elsewhere this does nothing."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame):
    # No printing here: the handler may interrupt a write to the same stream.
    if self.signum is not None:
      self.__exit__()
      signal.raise_signal(signum)
    self.signum = signum


def _add_chunk(sums: dict, chunk_sums) -> dict:
  """Adds one chunk's device sums into the epoch's host `sums`; returns the chunk's own
  `max_skips`, `nonfinite_loss_steps`, `stop` and `params_finite`."""
  chunk_sums = jax.device_get(chunk_sums)
  for k in TRAIN_SUM_KEYS + ("steps", "skipped_steps"):
    sums[k] = sums.get(k, 0.0) + float(chunk_sums[k])
  return {k: int(chunk_sums[k])
          for k in ("max_skips", "nonfinite_loss_steps", "stop", "params_finite")}


def _read_chunk(chunk_sums, sums: dict, bar: "_Progress", config, epoch: int, manager) -> int:
  """Adds a chunk's sums to the epoch's, moves the bar, stops the run if the chunk says so
  (see `_chunk_error`); returns the chunk's `stop` signal number."""
  seen = _add_chunk(sums, chunk_sums)
  applied = sums["steps"] - sums["skipped_steps"]
  bar.update(int(sums["steps"]), sums["loss"] / max(applied, 1))
  error = _chunk_error(seen, config, epoch, manager.latest_step())
  if error:
    bar.close()
    raise run_lib.RunError(error)
  return seen["stop"]


def _chunk_error(seen: dict, config, epoch: int, last_good_step) -> str | None:
  """Why the run must stop after a chunk, if it must: too many skipped steps in a row,
  non-finite parameters, or, with skipping off, any non-finite loss."""
  limit = config.optimizer.max_consecutive_skips
  if seen["max_skips"] >= limit:
    return (f"{seen['max_skips']} training steps in a row (in epoch {epoch + 1}) had a "
            "non-finite loss or gradients; their updates were skipped and the run stopped "
            f"(config.optimizer.max_consecutive_skips={limit}). The last good checkpoint, step "
            f"{last_good_step}, is intact, but resuming replays the same steps; start over in a "
            "new --workdir with a lower optimizer.learning_rate or an optimizer.grad_clip_norm")
  if config.optimizer.skip_nonfinite == "off" and seen["nonfinite_loss_steps"]:
    return (f"the training loss became non-finite in epoch {epoch + 1} with "
            "config.optimizer.skip_nonfinite='off', so the parameters may be too; the run "
            f"stopped and the last checkpoint, step {last_good_step}, is intact. Start over in "
            "a new --workdir with skip_nonfinite='grads' (which skips such steps), a lower "
            "optimizer.learning_rate or an optimizer.grad_clip_norm")
  if not seen["params_finite"]:
    return (f"the parameters became non-finite in epoch {epoch + 1}: with "
            f"config.optimizer.skip_nonfinite={config.optimizer.skip_nonfinite!r} a step whose "
            "loss was finite but whose gradients were not was applied. The run stopped and the "
            f"last checkpoint, step {last_good_step}, is intact. Start over in a new --workdir "
            "with skip_nonfinite='grads' (which skips such steps)")
  return None


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict]         # this invocation's metrics.jsonl rows
  compiled: dict[str, int]    # compilations of each jitted function (1 each in a healthy run)
  stopped_by: str | None = None  # the signal that stopped the run early ("SIGTERM"), if any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> TrainResult:
  """Trains to `config.num_epochs`, evaluating each epoch, resuming from WORKDIR if it can.

  SIGINT/SIGTERM stop the run at the next chunk boundary with a checkpoint (mid-epoch ones
  hold the epoch's position and partial sums, so resuming stays exact); the result's
  `stopped_by` names the signal. `overwrite` deletes a previous run of another config.
  """
  config_lib.validate(config)
  config_json = run_lib.config_to_json(config)
  changes = run_lib.prepare_workdir(workdir, config_json, overwrite)
  parallel.barrier("workdir prepared")  # no process reads a workdir that --overwrite empties
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
  tx = optim.make_optimizer(config.optimizer)
  replicated = parallel.replicated(mesh)
  # Replicated over the mesh, like the state: orbax saves only global arrays in a multi-process run.
  keys = Keys(**parallel.replicate(Keys.from_seed(config.seed).as_dict(), mesh))

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  manager = checkpoint.make_manager(workdir, config.checkpoint.keep, config_json)
  template = {"state": jax.eval_shape(lambda: init_state(model, tx, keys.init, ds.image_shape)),
              "keys": keys.as_dict()}
  restored = checkpoint.restore_latest(manager, template, replicated)
  if restored is None:
    state = parallel.replicate(init_state(model, tx, keys.init, ds.image_shape), mesh)
    progress = {"epoch": 0, "step_in_epoch": 0, "sums": {}}
  else:
    _, tree, progress = restored
    state, keys = tree["state"], Keys(**tree["keys"])
    where = (f"step {progress['step_in_epoch']} of epoch {progress['epoch'] + 1}"
             if progress["step_in_epoch"] else f"the end of epoch {progress['epoch']}")
    print(f"resumed from step {int(state.step)}, {where}", flush=True)
  dropped = run_lib.truncate_metrics(metrics_path, progress["epoch"])
  if dropped:
    print(f"dropped {dropped} metrics.jsonl rows past epoch {progress['epoch']}, the last "
          "checkpointed; their epochs run again", flush=True)
  if changes:
    print("config changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                   for k, (a, b) in changes.items()), flush=True)
    run_lib.append_jsonl(os.path.join(workdir, "config_changes.jsonl"),
                  {"step": int(state.step), "epoch": progress["epoch"],
                   "changes": {k: list(v) for k, v in changes.items()}})
  run_lib.write_config(workdir, config_json)

  train_chunk = make_train_chunk(make_train_step(model, tx, config), mesh, loops.resolve(config, mesh))
  evaluator = evaluate.Evaluator(model, config, ds.test, mesh)
  history = []
  stop = _StopRequest()
  stop_signum = 0  # the signal of any process, as read from the chunks (see make_train_chunk)
  try:
    with stop:
      print(f"training epochs {progress['epoch'] + 1}..{config.num_epochs} in {workdir}; "
            "Ctrl-C or SIGTERM saves a checkpoint and stops", flush=True)
      for epoch in range(progress["epoch"], config.num_epochs):
        start_step = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
        sums = dict(progress["sums"]) if start_step else {}
        t0 = time.time()
        idx, valid = jax.device_get(epoch_batches(keys.shuffle, epoch, num_train,
                                                  config.batch_size, start_step, chunk_steps))
        bar = _Progress(config.log.progress, steps_per_epoch,
                        f"epoch {epoch + 1}/{config.num_epochs}")
        # One chunk runs on device while the host reads the one before. Whether to send the
        # next chunk depends only on chunks read so far, the same ones on every process.
        pending = []
        for i in range(idx.shape[0]):
          if stop_signum:
            break
          batches = parallel.gather_batches(ds.train.images, idx[i], mesh)
          state, chunk_sums = train_chunk(state, batches, valid[i], keys.train,
                                          parallel.signal_array(stop.signum or 0, mesh))
          pending.append(chunk_sums)
          while len(pending) > (0 if i == idx.shape[0] - 1 else 1):
            signum = _read_chunk(pending.pop(0), sums, bar, config, epoch, manager)
            stop_signum = stop_signum or signum
        while pending:  # after a stop: the chunk still in flight
          signum = _read_chunk(pending.pop(0), sums, bar, config, epoch, manager)
          stop_signum = stop_signum or signum
        bar.close()
        done = int(sums["steps"])
        if done < steps_per_epoch:  # stopped by a signal mid-epoch
          progress = {"epoch": epoch, "step_in_epoch": done, "sums": sums}
          checkpoint.save(manager, int(state.step), {"state": state, "keys": keys.as_dict()},
                          progress)
          break
        train_seconds = time.time() - t0
        applied = sums["steps"] - sums["skipped_steps"]
        row = {"epoch": epoch + 1, "step": int(state.step)}
        row.update({f"train/{k}": sums[k] / applied if applied else float("nan")
                    for k in TRAIN_SUM_KEYS})
        row["train/skipped_steps"] = int(sums["skipped_steps"])
        row["train/seconds"] = train_seconds
        row["train/images_per_s"] = ((steps_per_epoch - start_step) * config.batch_size
                                     / train_seconds)
        t1 = time.time()
        row.update({f"test/{k}": v for k, v in evaluator(state.params, keys.eval).items()})
        row["test/seconds"] = time.time() - t1
        run_lib.append_jsonl(metrics_path, row)  # before the checkpoint: a kill in between replays the epoch
        history.append(row)
        print(_summary(row), flush=True)
        progress = {"epoch": epoch + 1, "step_in_epoch": 0, "sums": {}}
        last = epoch + 1 == config.num_epochs
        if last or stop_signum or (epoch + 1) % config.checkpoint.every_epochs == 0:
          checkpoint.save(manager, int(state.step), {"state": state, "keys": keys.as_dict()},
                          progress, {checkpoint.BEST_METRIC: row[checkpoint.BEST_METRIC]})
        if parallel.is_primary() and (
            last or (config.figures_every and (epoch + 1) % config.figures_every == 0)):
          # Local copies: computing on the global arrays would need every process to join in.
          figures.draw_training_figures(workdir, model, parallel.local_copy(state.params), ds,
                                        config, parallel.local_copy(keys.eval))
        if stop_signum:
          break
  finally:
    manager.wait_until_finished()  # an error must not cut the last good checkpoint short
    manager.close()
  finished = progress["epoch"] >= config.num_epochs
  stopped_by = signal.Signals(stop_signum).name if stop_signum and not finished else None
  if stopped_by:
    where = (f"step {progress['step_in_epoch']} of {steps_per_epoch} in epoch "
             f"{progress['epoch'] + 1}" if progress["step_in_epoch"]
             else f"the end of epoch {progress['epoch']}")
    print(f"{stopped_by}: saved checkpoint step {int(state.step)}, {where}, in "
          f"{workdir}/checkpoints; run the same command again to resume", flush=True)
  return TrainResult(state, history, {"train_chunk": train_chunk._cache_size(),
                                      "evaluate": evaluator.cache_size()}, stopped_by)


def _summary(row: dict) -> str:
  keys = ("train/loss", "test/elbo_nats", "test/bits_per_dim", "test/recon_mean_ssim")
  parts = [f"{k} {row[k]:.4g}" for k in keys if k in row]
  return (f"epoch {row['epoch']} step {row['step']}: " + ", ".join(parts)
          + f", {row['train/seconds']:.1f}s train ({row['train/images_per_s']:.0f} img/s), "
          f"{row['test/seconds']:.1f}s test")

