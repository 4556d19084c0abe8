"""Training throughput of a config on this machine, measured the way train.py runs it.

  python benchmarks/throughput.py --config configs/cifar10.py [--config.key=value ...]
      [--data_path /path/to/cifar10-jpeg.tar.gz] [--epochs 3] [--steps N] [--eval_repeats 3]

One process; prints a table and then one JSON line. Random uint8 images of the config's shape
by default, the real image folder (or .tar.gz) with --data_path. The JSON keys:
  compile_s                   tracing, lowering and compiling the train chunk (in per_step
                              loop mode its three programs, see jaxvae/loops.py)
  first_step_s                process start to the end of the first train step (imports, data,
                              init, compile included)
  train_s_per_epoch           median over --epochs epochs, run as train.py runs them: the
                              library's epoch_batches, gather_batches, make_train_step and
                              make_train_chunk; with --steps N only the first N steps of each
                              epoch run and the time is scaled to a whole epoch
  eval_s                      median of the Evaluator over the test split (ELBO, SSIM, ...)
  matmul_rate_gflop_per_s     the rate of exactly the step's matrix products and convolutions
                              (shapes and dtypes from the objective's jaxpr, those that reach a
                              gradient): their FLOPs over the time of one program computing
                              them all, outside any loop, in this process (rates.matmul_rate)
  large_matmul_rate_gflop_per_s  one 2048^3 product: the machine's large-matmul rate
  fraction_of_matmul_rate     the step's matmul FLOPs per second of step over that rate
  optimizer_ms                one optimizer update of the real parameters, alone
  floor_ms_per_step           the step's matmuls at their rate plus optimizer_ms: what a step
                              would cost if nothing else did
  peak_rss_gib                the process's peak resident memory
"""

import time

_START = time.perf_counter()

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxvae import config as config_lib  # noqa: E402
from jaxvae import data, evaluate, experiment, loops, parallel, train  # noqa: E402
from jaxvae import state as state_lib  # noqa: E402
from rates import (TIMING_S, large_matmul_rate, matmul_rate, optimizer_seconds,  # noqa: E402
                   step_matmuls)

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("data_path", None, "An image folder or .tar.gz (split/class/*.png|jpg) to "
                    "measure on; random images of --image_shape when not given.")
flags.DEFINE_list("image_shape", ["32", "32", "3"], "H,W,C of the random images.")
flags.DEFINE_integer("num_train", 50_000, "Random training images.")
flags.DEFINE_integer("num_test", 10_000, "Random test images.")
flags.DEFINE_integer("epochs", 3, "Timed epochs, after compiling and the first step.")
flags.DEFINE_integer("steps", 0, "Run only this many steps of each timed epoch (0: all) and "
                     "scale the time to a full epoch.")
flags.DEFINE_integer("eval_repeats", 3, "Timed evaluations after the first.")
flags.mark_flags_as_required(["config"])


def _process_seconds() -> float:
  """Seconds since this process started (interpreter start-up included, on Linux)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _START


def _random_dataset(shape, num_train: int, num_test: int) -> data.Dataset:
  rng = np.random.default_rng(0)
  split = lambda n: data.Split(rng.integers(0, 256, (n,) + shape, np.uint8), np.zeros(n, np.int32))
  return data.Dataset(split(num_train), split(num_test), ("0",), "random")


def run_epoch(train_chunk, state, images, idx, valid, train_key, mesh):
  """One epoch as train.py runs it: every chunk dispatched, then the sums read."""
  pending = []
  for i in range(idx.shape[0]):
    state, sums = train_chunk(state, parallel.gather_batches(images, idx[i], mesh), valid[i],
                              train_key, parallel.signal_array(0, mesh))
    pending.append(sums)
  steps = sum(int(jax.device_get(s["steps"])) for s in pending)
  return state, steps


def _dataset(config) -> data.Dataset:
  """The config's data with --data_path or digits; else random images of --image_shape."""
  if flags.FLAGS.data_path or config.data.source == "digits":
    return data.load(config.data)
  shape = tuple(int(s) for s in flags.FLAGS.image_shape)
  return _random_dataset(shape, flags.FLAGS.num_train, flags.FLAGS.num_test)


def _time_training(exp, ds, keys, mesh, loop: str) -> dict:
  """Compiles the train chunk and times the first step, then whole epochs (or their first
  --steps steps) as train.py runs them. Returns the timings and the trained state."""
  config, num_train = exp.config, len(ds.train.images)
  chunk_steps = math.ceil(exp.steps_per_epoch / min(config.log.chunks_per_epoch,
                                                    exp.steps_per_epoch))
  state = parallel.replicate(exp.init_state(keys.init), mesh)
  train_chunk = train.make_train_chunk(exp.train_step(), mesh, loop)
  # Compile, then the very first step, as train.py's first call does.
  idx, valid = jax.device_get(train.epoch_batches(keys.shuffle, 0, num_train, config.batch_size,
                                                  0, chunk_steps))
  batches = parallel.gather_batches(ds.train.images, idx[0], mesh)
  first_only = np.arange(chunk_steps) < 1
  t0 = time.perf_counter()
  no_signal = parallel.signal_array(0, mesh)
  compiled = train_chunk.lower(state, batches, first_only, keys.train, no_signal).compile()
  compile_s = time.perf_counter() - t0
  state, sums = compiled(state, batches, first_only, keys.train, no_signal)
  jax.block_until_ready(sums)
  first_step_s = _process_seconds()
  per_step = []
  for epoch in range(1, flags.FLAGS.epochs + 1):
    idx, valid = jax.device_get(train.epoch_batches(keys.shuffle, epoch, num_train,
                                                    config.batch_size, 0, chunk_steps))
    if flags.FLAGS.steps:
      n = min(flags.FLAGS.steps, exp.steps_per_epoch)
      keep = math.ceil(n / chunk_steps)
      idx, valid = idx[:keep], valid[:keep] & (np.arange(keep * chunk_steps) < n).reshape(keep, -1)
    t0 = time.perf_counter()
    state, steps = run_epoch(compiled, state, ds.train.images, idx, valid, keys.train, mesh)
    per_step.append((time.perf_counter() - t0) / steps)
  step_s = float(np.median(per_step))
  return {"state": state, "compile_s": compile_s, "first_step_s": first_step_s,
          "step_s": step_s, "train_s": step_s * exp.steps_per_epoch}


def _time_evaluation(exp, ds, params, key, mesh) -> tuple[float, float]:
  """(seconds of the first evaluation, median seconds of --eval_repeats more)."""
  evaluator = evaluate.Evaluator(exp.model, exp.config, ds.test, mesh)
  t0 = time.perf_counter()
  evaluator(params, key)
  first_s, times = time.perf_counter() - t0, []
  for _ in range(flags.FLAGS.eval_repeats):
    t0 = time.perf_counter()
    evaluator(params, key)
    times.append(time.perf_counter() - t0)
  return first_s, float(np.median(times))


def _floor(exp, ds, state, key, mesh) -> dict:
  """The step's floor: its products (every trained group's forward and backward) timed alone
  at their shapes, plus each group's optimizer update alone."""
  x = jnp.zeros((exp.config.batch_size,) + ds.image_shape, jnp.float32)
  products = step_matmuls(exp.objective.gradients, jax.device_get(state.params), key, x,
                          jnp.zeros((), jnp.int32))
  options = train.compiler_options(mesh)  # as the train chunk is compiled
  budget = TIMING_S.value
  opt_s = sum(optimizer_seconds(tx, state.params[name], state.opt_state[name], options,
                                4 * budget) for name, tx in exp.optimizers.items())
  flops, rate = sum(f for f, _ in products), matmul_rate(products, options, budget)
  return {"flops": flops, "rate": rate, "large_rate": large_matmul_rate(options, 2048, 4 * budget),
          "opt_s": opt_s, "floor_s": flops / rate + opt_s}


def main(argv):
  del argv
  config = flags.FLAGS.config
  if flags.FLAGS.data_path:
    config.data.source, config.data.path = "folder", flags.FLAGS.data_path
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_divides(config.batch_size, mesh)
  ds = _dataset(config)
  exp = experiment.build_for(config, ds)
  keys = state_lib.Keys(**parallel.replicate(state_lib.Keys.from_seed(config.seed).as_dict(), mesh))
  loop = loops.resolve(config, mesh, exp.model)
  timed = _time_training(exp, ds, keys, mesh, loop)
  state = timed["state"]
  eval_first_s, eval_s = _time_evaluation(exp, ds, state.params[state_lib.VAE_GROUP], keys.eval,
                                          mesh)
  floor = _floor(exp, ds, state, keys.train, mesh)
  result = _result(exp, ds, loop, timed, eval_first_s, eval_s, floor)
  _print_rows(result)
  print(json.dumps(result))


def _result(exp, ds, loop, timed, eval_first_s, eval_s, floor) -> dict:
  """The JSON line's figures."""
  config, step_s, train_s = exp.config, timed["step_s"], timed["train_s"]
  flops, rate, large_rate = floor["flops"], floor["rate"], floor["large_rate"]
  return {
      "config": {"batch_size": config.batch_size, "hidden": list(config.model.hidden),
                 "arch": config.model.arch, "latent_dim": config.model.latent_dim,
                 "loop_mode": loop,
                 "data": flags.FLAGS.data_path or ds.name, "devices": jax.device_count(),
                 "processes": jax.process_count(), "platform": jax.devices()[0].platform,
                 "steps_per_epoch": exp.steps_per_epoch, "timed_steps_per_epoch":
                 min(flags.FLAGS.steps or exp.steps_per_epoch, exp.steps_per_epoch)},
      "compile_s": timed["compile_s"],
      "first_step_s": timed["first_step_s"],
      "train_s_per_epoch": train_s,
      "train_ms_per_step": step_s * 1e3,
      "images_per_s": config.batch_size / step_s,
      "eval_s": eval_s,
      "eval_first_s": eval_first_s,
      "epoch_with_eval_s": train_s + eval_s,
      "eval_fraction": eval_s / (train_s + eval_s),
      "step_gflop": flops / 1e9,
      "achieved_gflop_per_s": flops / step_s / 1e9,
      "matmul_rate_gflop_per_s": rate / 1e9,
      "large_matmul_rate_gflop_per_s": large_rate / 1e9,
      "fraction_of_matmul_rate": flops / step_s / rate,
      "fraction_of_large_matmul_rate": flops / step_s / large_rate,
      "optimizer_ms": floor["opt_s"] * 1e3,
      "floor_ms_per_step": floor["floor_s"] * 1e3,
      "step_over_floor": step_s / floor["floor_s"],
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
  }


def _print_rows(r: dict) -> None:
  """The human-readable table of `_result`'s figures."""
  c, step_ms = r["config"], r["train_ms_per_step"]
  flops = r["step_gflop"] * 1e9
  rows = [
      ("batch size", f"{c['batch_size']}"),
      ("devices x processes", f"{c['devices']} x {c['processes']} ({c['platform']})"),
      ("data", c["data"]),
      ("compile (train chunk)", f"{r['compile_s']:.2f} s ({c['loop_mode']} loop mode)"),
      ("start to first step", f"{r['first_step_s']:.2f} s"),
      ("train per epoch", f"{r['train_s_per_epoch']:.2f} s ({r['images_per_s']:,.0f} images/s, "
                          f"{step_ms:.3f} ms/step)"),
      ("eval per epoch", f"{r['eval_s']:.2f} s (first call {r['eval_first_s']:.2f} s), "
                         f"{100 * r['eval_fraction']:.1f}% of the epoch"),
      ("epoch incl. eval", f"{r['epoch_with_eval_s']:.2f} s"),
      ("step matmul FLOPs", f"{flops / 1e6:.1f} MFLOP ({flops / c['batch_size'] / 1e6:.2f}"
                            f" per image)"),
      ("achieved", f"{r['achieved_gflop_per_s']:.1f} GFLOP/s"),
      ("matmul rate, step shapes", f"{r['matmul_rate_gflop_per_s']:.1f} GFLOP/s -> step at "
                                   f"{100 * r['fraction_of_matmul_rate']:.1f}%"),
      ("matmul rate, 2048^3", f"{r['large_matmul_rate_gflop_per_s']:.1f} GFLOP/s -> step at "
                              f"{100 * r['fraction_of_large_matmul_rate']:.1f}%"),
      ("optimizer update alone", f"{r['optimizer_ms']:.3f} ms"),
      ("floor (matmuls + optimizer)", f"{r['floor_ms_per_step']:.3f} ms/step -> step is "
                                      f"{r['step_over_floor']:.2f}x the floor"),
      ("peak RSS", f"{r['peak_rss_gib']:.2f} GiB"),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
  app.run(main)
