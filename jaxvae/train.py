"""The compiled chunks of train steps, the training loop, and `train_and_evaluate(config, workdir)`.

The way a batch travels: uint8 images are put on device once; each epoch a permutation from
fold_in(shuffle_key, epoch) orders them; a chunk of steps runs per call, as one compiled loop
(or, for convolutions on CPU, one compiled call per step: see `jaxvae.loops`), gathering and
scaling each batch inside the step, with the step's key fold_in(train_key, step). Metrics are
summed on device and reach the host once per chunk. A resumed run replays exactly, since every
key is a function of (seed, epoch, step).
"""

import dataclasses
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
import tqdm

from jaxvae import checkpoint, data, evaluate, experiment, figure_data, loops, optim
from jaxvae import parallel, rundir
from jaxvae import config as config_lib
from jaxvae.state import Keys, TrainState

# What a chunk counts beside the metrics' sums; every other key a step's metrics hold (but
# `skipped` and `skips`) is a metric, averaged over the applied steps into each metrics row.
CHUNK_COUNTS = ("steps", "skipped_steps", "nonfinite_loss_steps", "max_skips", "stop",
                "params_finite")
STEP_FLAGS = ("skipped", "skips")


def make_train_chunk(train_step, mesh, loop: str, options: dict | None = None):
  """Up to S steps as one call, in `loop` mode ("scan" or "per_step", see `jaxvae.loops`),
  compiled with XLA `options` (default: `compiler_options(mesh)`).

  chunk(state, batches uint8[S, B, H, W, C] (batch axis sharded, see `parallel.gather_batches`),
        valid bool[S], train_key, stop int32[D] (see `parallel.signal_array`))
    -> (state, sums): sums of each metric over the applied steps, the counts `steps` (valid),
    `skipped_steps` and `nonfinite_loss_steps`, `max_skips`, the longest run of skips so far,
    `stop`, the largest signal number any process had seen when it sent the chunk (0: none),
    and `params_finite`, whether every parameter is finite after it.
  `valid` is a prefix: the epoch's last chunk is padded, and only the valid steps training. "scan"
  compiles the chunk as one program with a loop of dynamic length, so every chunk has one shape
  and the function compiles once per run; "per_step" is a `StepwiseChunk` (valid read on the
  host). Both draw step keys fold_in(train_key, state.step) and sum the same way.
  """
  batch_sharding = parallel.batch_sharded(mesh)
  train_step = jax.jit(train_step)  # one trace for its metrics' shapes and its call (inlined)

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
    sums = {k: jnp.sum(jnp.where(applied, v, 0.0)) for k, v in metrics.items()
            if k not in STEP_FLAGS}
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

  options = compiler_options(mesh) if options is None else options
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
  """XLA options for the train chunk on this mesh's platform (`jaxvae.loops`)."""
  return loops.compiler_options(mesh.devices.flat[0].platform)


def epoch_batches(shuffle_key: jax.Array, epoch: int, num_examples: int, batch_size: int,
                  start: int, chunk_steps: int, stop: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """The epoch's batches from step `start` up to step `stop` (default: the epoch's end),
  padded to whole chunks.

  Returns batch_idx int32[num_chunks, chunk_steps, batch_size] and valid bool[num_chunks,
  chunk_steps]. The last partial batch of each epoch is dropped (its images differ per epoch).
  """
  steps = num_examples // batch_size
  stop = steps if stop is None else stop
  perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)
  idx = perm[: steps * batch_size].reshape(steps, batch_size)[start:stop]
  num_chunks = math.ceil((stop - start) / chunk_steps)
  pad = num_chunks * chunk_steps - (stop - start)
  idx = jnp.pad(idx, ((0, pad), (0, 0)))
  valid = jnp.arange(num_chunks * chunk_steps) < stop - start
  return (idx.reshape(num_chunks, chunk_steps, batch_size).astype(jnp.int32),
          valid.reshape(num_chunks, chunk_steps))


class _StopRequest:
  """Turns SIGINT/SIGTERM into `signum`, which the training loop checks between chunks; a
  second signal acts at once (the previous handler), but the same signal again within
  REPEAT_S is the same request delivered twice (to a process group, and passed on by the
  parent of a multi-process run's process, jaxvae/supervisor.py). Handlers can only be set in
  the main thread; elsewhere this does nothing."""

  REPEAT_S = 1.0

  def __init__(self):
    self.signum = None
    self._at = 0.0
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
    if signum == self.signum and time.monotonic() - self._at < self.REPEAT_S:
      return
    if self.signum is not None:
      self.__exit__()
      signal.raise_signal(signum)
    self.signum, self._at = signum, time.monotonic()


def _add_chunk(sums: dict, chunk_sums) -> dict:
  """Adds one chunk's device sums into the epoch's host `sums`; returns the chunk's own
  `max_skips`, `nonfinite_loss_steps`, `stop` and `params_finite`."""
  chunk_sums = jax.device_get(chunk_sums)
  for k in [k for k in chunk_sums if k not in CHUNK_COUNTS] + ["steps", "skipped_steps"]:
    sums[k] = sums.get(k, 0.0) + float(chunk_sums[k])
  return {k: int(chunk_sums[k])
          for k in ("max_skips", "nonfinite_loss_steps", "stop", "params_finite")}


def _chunk_error(seen: dict, config, epoch: int, last_good_step) -> str | None:
  """Why the run must stop after a chunk, if it must: too many skipped steps in a row,
  non-finite parameters, or, with skipping off, any non-finite loss."""
  limit, max_norm = config.optimizer.max_consecutive_skips, config.optimizer.skip_grad_norm
  if seen["max_skips"] >= limit:
    norm = (f", or a gradient norm at least config.optimizer.skip_grad_norm={max_norm}"
            if max_norm else "")
    return (f"{seen['max_skips']} training steps in a row (in epoch {epoch + 1}) had a "
            f"non-finite loss or gradients{norm}; their updates were skipped and the run stopped "
            f"(config.optimizer.max_consecutive_skips={limit}). The last good checkpoint, step "
            f"{last_good_step}, is intact, but resuming replays the same steps; start over in a "
            "new --workdir with a lower optimizer.learning_rate or an optimizer.grad_clip_norm"
            + (" or a higher skip_grad_norm" if max_norm else ""))
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


def _read_chunk(training: "_Training", chunk_sums, sums: dict, bar, epoch: int) -> int:
  """Adds a chunk's sums to the period's, moves the bar, stops the run if the chunk says so
  (see `_chunk_error`); returns the chunk's `stop` signal number."""
  seen = _add_chunk(sums, chunk_sums)
  applied = sums["steps"] - sums["skipped_steps"]
  bar.update(int(sums["steps"]) - bar.n)
  bar.set_postfix(loss=f"{sums['loss'] / max(applied, 1):.2f}", refresh=False)
  error = _chunk_error(seen, training.config, epoch, training.manager.latest_step())
  if error:
    bar.close()
    raise rundir.RunError(error)
  checkpoint.check_saves(training.manager)
  return seen["stop"]


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict]         # this invocation's metrics.jsonl rows
  compiled: dict[str, int]    # compilations of each jitted function (1 each in a healthy run)
  stopped_by: str | None = None  # the signal that stopped the run early ("SIGTERM"), if any


@dataclasses.dataclass
class _Training:
  """What a run fixes before its first step."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  ds: data.Dataset
  experiment: experiment.Experiment
  steps_per_epoch: int
  chunk_steps: int   # steps per compiled call; every call has this shape
  end_step: int      # the run is done when state.step reaches it
  manager: "checkpoint.ocp.CheckpointManager"
  log: rundir.MetricsLog
  config_json: dict
  changes: dict      # the allowed config changes of a resumed run

  def eval_every(self) -> int:
    """Steps between evaluations (and metrics rows): eval.every_steps, or one epoch."""
    return self.config.eval.every_steps or self.steps_per_epoch

  def epoch_of(self, step: int) -> int | float:
    """Epochs done at `step`: an int at an epoch's end, else a fraction."""
    epochs = step / self.steps_per_epoch
    return int(epochs) if step % self.steps_per_epoch == 0 else round(epochs, 4)

  def progress(self, step: int, sums: dict) -> dict:
    """A checkpoint's `progress`: the position of `step` and the period's partial sums."""
    return {"epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
            "sums": sums}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> TrainResult:
  """Trains to `config.num_steps` (or `config.num_epochs`), evaluating every epoch (or every
  `eval.every_steps`), resuming from WORKDIR if it can.

  SIGINT/SIGTERM stop the run at the next chunk boundary with a checkpoint (mid-period ones
  hold the position and partial sums, so resuming stays exact); the result's `stopped_by`
  names the signal. `overwrite` deletes a previous run of another config.
  """
  training = _prepare(config, workdir, overwrite)
  try:
    state, keys, sums = _restore_or_init(training)
    model = training.experiment.model
    train_chunk = make_train_chunk(training.experiment.train_step(), training.mesh,
                                   loops.resolve(config, training.mesh, model))
    evaluator = evaluate.Evaluator(model, config, training.ds.test, training.mesh)
    with _StopRequest() as stop:
      state, history, stop_signum = _train_loop(training, state, keys, sums, train_chunk,
                                                evaluator, stop)
  except BaseException as e:
    # An error must not cut the last good checkpoint short, nor be hidden by a failed save;
    # with another process gone, a save in flight never completes (orbax waits for it).
    if not parallel.peer_failure(e):
      checkpoint.close(training.manager, raise_errors=False)
    raise
  else:
    checkpoint.close(training.manager)
  finally:
    training.log.close()
  stopped_by = _report_stop(training, int(state.step), stop_signum)
  return TrainResult(state, history, {"train_chunk": train_chunk._cache_size(),
                                      "evaluate": evaluator.cache_size()}, stopped_by)


def _prepare(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> _Training:
  """Checks the config and WORKDIR, loads the data and builds the model, before any step."""
  config_lib.validate(config)
  config_json = rundir.config_to_json(config)
  changes = rundir.prepare_workdir(workdir, config_json, overwrite)
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
  if config.num_steps:
    epochs = math.ceil(config.num_steps / steps_per_epoch)
    problem = optim.schedule_problem(config.optimizer, epochs, (
        f"config.num_steps={config.num_steps} runs into epoch {epochs} ({steps_per_epoch} "
        "steps an epoch)"))
    if problem:
      raise config_lib.ConfigError(problem)
  chunks = min(config.log.chunks_per_epoch, steps_per_epoch)
  return _Training(config, workdir, mesh, ds, experiment.build_for(config, ds), steps_per_epoch,
                   math.ceil(steps_per_epoch / chunks),
                   config.num_steps or config.num_epochs * steps_per_epoch,
                   checkpoint.make_manager(workdir, config.checkpoint.keep, config_json),
                   rundir.MetricsLog(workdir, config.log.tensorboard), config_json, changes)


def _restore_or_init(training: _Training) -> tuple[TrainState, Keys, dict]:
  """The latest checkpoint's state, keys and partial sums, or a fresh start (which also
  writes the model summary and the data preview)."""
  config, mesh, exp = training.config, training.mesh, training.experiment
  # Replicated over the mesh, like the state: orbax saves only global arrays in a multi-process run.
  keys = Keys(**parallel.replicate(Keys.from_seed(config.seed).as_dict(), mesh))
  template = exp.checkpoint_template(keys)
  restored = checkpoint.restore_latest(training.manager, template, parallel.replicated(mesh),
                                       exp.legacy_checkpoint(template))
  if restored is None:
    state, sums = parallel.replicate(exp.init_state(keys.init), mesh), {}
    summary = experiment.summary(exp, state.params)
    print(summary, flush=True)
    rundir.write_text(training.workdir, "model.txt", summary + "\n")
    if parallel.is_primary() and config.log.figures:
      from jaxvae import figures  # matplotlib: half a second to import, only when drawing
      figures.plot_data_preview(training.ds, os.path.join(training.workdir, "figures"))
  else:
    _, tree, progress = restored
    state, keys, sums = tree["state"], Keys(**tree["keys"]), progress["sums"]
    print(f"resumed from step {int(state.step)}, {_where(training, int(state.step))}", flush=True)
  step = int(state.step)
  dropped = training.log.truncate(step)
  if dropped:
    print(f"dropped {dropped} metrics.jsonl rows past step {step}, the last checkpointed; "
          "their steps run again", flush=True)
  rundir.record_config(training.workdir, training.config_json, training.changes, step,
                        step // training.steps_per_epoch)
  return state, keys, sums


def _where(training: _Training, step: int) -> str:
  epoch, k = divmod(step, training.steps_per_epoch)
  return f"step {k} of {training.steps_per_epoch} in epoch {epoch + 1}" if k else f"the end of epoch {epoch}"


def _train_loop(training: _Training, state: TrainState, keys: Keys, sums: dict, train_chunk, evaluator,
                stop: "_StopRequest") -> tuple[TrainState, list[dict], int]:
  """Periods of training, each ended by an evaluation and a metrics row, up to `end_step` or
  a stop signal; returns the state, the rows and the signal (0: none)."""
  history, stop_signum = [], 0
  print(f"training steps {int(state.step) + 1}..{training.end_step} in {training.workdir}; Ctrl-C or "
        "SIGTERM saves a checkpoint and stops", flush=True)
  while int(state.step) < training.end_step and not stop_signum:
    start = int(state.step)
    row_step = min(training.end_step, (start // training.eval_every() + 1) * training.eval_every())
    t0 = time.time()
    state, stop_signum = _train_until(training, state, keys, sums, row_step, train_chunk, stop)
    if int(state.step) < row_step:  # stopped by a signal mid-period
      checkpoint.save(training.manager, int(state.step), {"state": state, "keys": keys.as_dict()},
                      training.progress(int(state.step), sums))
      break
    seconds = time.time() - t0
    history.append(_end_period(training, state, keys, sums, int(state.step) - start, seconds,
                               evaluator, stop_signum))
    sums = {}
  return state, history, stop_signum


def _train_until(training: _Training, state: TrainState, keys: Keys, sums: dict, row_step: int,
                 train_chunk, stop: "_StopRequest") -> tuple[TrainState, int]:
  """Runs the steps from state.step to `row_step` (across epoch ends if need be), adding
  their metrics into `sums`; returns early after a stop signal. Returns (state, signal)."""
  config, spe = training.config, training.steps_per_epoch
  step, stop_signum, pending = int(state.step), 0, []
  carried = int(sums.get("steps", 0))  # a resumed period's steps before the stop
  bar = _progress_bar(training, row_step, total=row_step - step + carried, done=carried)
  # One chunk runs on device while the host reads the one before. Whether to send the next
  # chunk depends only on chunks read so far, the same ones on every process.
  while step < row_step and not stop_signum:
    epoch, k = divmod(step, spe)
    stop_in_epoch = min(row_step - epoch * spe, spe)
    idx, valid = jax.device_get(epoch_batches(keys.shuffle, epoch, len(training.ds.train.images),
                                              config.batch_size, k, training.chunk_steps,
                                              stop_in_epoch))
    for i in range(idx.shape[0]):
      if stop_signum:
        break
      batches = parallel.gather_batches(training.ds.train.images, idx[i], training.mesh)
      state, chunk_sums = train_chunk(state, batches, valid[i], keys.train,
                                      parallel.signal_array(stop.signum or 0, training.mesh))
      pending.append(chunk_sums)
      if len(pending) > 1:
        signum = _read_chunk(training, pending.pop(0), sums, bar, epoch)  # read even after a stop
        stop_signum = stop_signum or signum
    step = epoch * spe + stop_in_epoch
  while pending:  # the chunk still in flight, also after a stop
    signum = _read_chunk(training, pending.pop(0), sums, bar, epoch)
    stop_signum = stop_signum or signum
  bar.close()
  return state, stop_signum


def _progress_bar(training: _Training, row_step: int, total: int, done: int) -> tqdm.tqdm:
  """tqdm on stderr, drawn only on a terminal, by process 0, with config.log.progress."""
  if training.config.eval.every_steps:
    label = f"steps to {row_step}/{training.end_step}"
  else:
    label = f"epoch {row_step // training.steps_per_epoch}/{math.ceil(training.end_step / training.steps_per_epoch)}"
  enabled = training.config.log.progress and sys.stderr.isatty() and parallel.is_primary()
  # A terminal that reports no size (a bare pseudo-terminal) would make tqdm draw nothing.
  size = os.get_terminal_size(sys.stderr.fileno()) if enabled else None
  fixed = {"ncols": 100, "nrows": 24} if size and not (size.columns and size.lines) else {}
  return tqdm.tqdm(total=total, initial=done, desc=label, disable=not enabled, ascii=True,
                   leave=False, unit="step", dynamic_ncols=not fixed, **fixed)


def _end_period(training: _Training, state: TrainState, keys: Keys, sums: dict, steps_run: int,
                seconds: float, evaluator, stop_signum: int) -> dict:
  """Writes the period's metrics row (train means, test metrics) and saves a checkpoint and
  figures when due; returns the row."""
  config, step = training.config, int(state.step)
  applied = sums["steps"] - sums["skipped_steps"]
  row = {"epoch": training.epoch_of(step), "step": step}
  # The objective's value first, then its other metrics by name.
  names = sorted((k for k in sums if k not in CHUNK_COUNTS), key=lambda k: (k != "loss", k))
  row.update({f"train/{k}": sums[k] / applied if applied else float("nan") for k in names})
  row["train/skipped_steps"] = int(sums["skipped_steps"])
  row["train/seconds"] = seconds
  row["train/images_per_s"] = steps_run * config.batch_size / seconds
  t0 = time.time()
  row.update({f"test/{k}": v for k, v in evaluator(experiment.model_params(state), keys.eval).items()})
  row["test/seconds"] = time.time() - t0
  training.log.write(row)  # before the checkpoint: a kill in between replays the period
  print(_summary(row), flush=True)
  evaluation = math.ceil(step / training.eval_every())  # 1, 2, ... (the last may be partial)
  last = step >= training.end_step
  if last or stop_signum or evaluation % config.checkpoint.every == 0:
    checkpoint.save(training.manager, step, {"state": state, "keys": keys.as_dict()},
                    training.progress(step, {}), {checkpoint.BEST_METRIC: row[checkpoint.BEST_METRIC]})
  if parallel.is_primary():
    # Local copies: computing on the global arrays would need every process to join in.
    params = parallel.local_copy(experiment.model_params(state))
    key = parallel.local_copy(keys.eval)
    if config.log.figures and (last or (config.figures_every
                                        and evaluation % config.figures_every == 0)):
      from jaxvae import figures  # matplotlib: half a second to import, only when drawing
      figures.draw_training_figures(training.workdir, training.experiment.model, params, training.ds, config, key)
    if training.log.tensorboard:
      training.log.images(step, figure_data.tensorboard_images(training.experiment.model, params,
                                                                training.ds, config, key))
  return row


def _report_stop(training: _Training, step: int, stop_signum: int) -> str | None:
  """The name of the signal that stopped an unfinished run, after saying how to resume."""
  if not stop_signum or step >= training.end_step:
    return None
  name = signal.Signals(stop_signum).name
  print(f"{name}: saved checkpoint step {step}, {_where(training, step)}, in {training.workdir}/checkpoints; "
        "run the same command again to resume", flush=True)
  return name


def _summary(row: dict) -> str:
  keys = ("train/loss", "test/elbo_nats", "test/bits_per_dim", "test/recon_mean_ssim")
  parts = [f"{k} {row[k]:.4g}" for k in keys if k in row]
  return (f"epoch {row['epoch']} step {row['step']}: " + ", ".join(parts)
          + f", {row['train/seconds']:.1f}s train ({row['train/images_per_s']:.0f} img/s), "
          f"{row['test/seconds']:.1f}s test")
