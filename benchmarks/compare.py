"""Config variants of the train step timed side by side in one process, with the matmul rate.

  python benchmarks/compare.py --config configs/cifar10.py [--config.key=value ...] \
      --variants "optimizer.skip_nonfinite=grads; optimizer.skip_nonfinite=off; model.compute_dtype=bfloat16"

Each variant is the config plus its own `key=value` overrides (spaces between keys, `;`
between variants; an empty variant is the config itself; the item `xla=default` compiles the
variant with XLA's default options instead of jaxvae's, see jaxvae/loops.py). Each variant's train chunk is
compiled first, in its own loop mode (`loop_mode`, see jaxvae/loops.py), and the compile time
reported. Every round times one train chunk of --steps steps of each variant in turn (a fresh
state each, random images on device), then measures the matmul rate at the step's own shapes
and dtypes (benchmarks/rates.py, as throughput.py does); the medians over --rounds rounds are reported.
Interleaving puts every variant through the same moments of a noisy machine, so the ratios
between them hold better than those of separate runs. Prints a table and one JSON line.
"""

import ast
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxvae import config as config_lib
from jaxvae import data, experiment, loops, parallel, train
from jaxvae import state as state_lib
from rates import TIMING_S, matmul_rate, step_matmuls

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_string("variants", "", "Variants: `key=value [key=value ...]` each, `;` between "
                    "them; an empty variant is the config itself.")
flags.DEFINE_list("image_shape", ["32", "32", "3"], "H,W,C of the random images.")
flags.DEFINE_integer("steps", 40, "Steps per timed chunk.")
flags.DEFINE_integer("rounds", 5, "Rounds of timing every variant once.")
flags.mark_flags_as_required(["config"])


def parse_variants(text: str, base) -> list[tuple[str, object, bool]]:
  """'a.b=1 c=(1,2); d=x xla=default' -> [(label, config, with XLA's default options)], each
  config a copy of `base` with its overrides."""
  out = []
  for part in text.split(";"):
    config = base.copy_and_resolve_references()
    pairs = part.split()
    for pair in pairs:
      if pair == "xla=default":
        continue
      key, sep, value = pair.partition("=")
      *path, node = key.strip().split(".")
      parent = config
      for name in path:
        parent = parent[name]
      if not sep or node not in parent:
        raise ValueError(f"variant item {pair!r} is not key=value with a config key")
      old, value = parent[node], value.strip()
      if isinstance(old, bool):
        parent[node] = value.lower() in ("1", "true")
      elif isinstance(old, (tuple, list)):
        parent[node] = type(old)(ast.literal_eval(value))
      else:
        parent[node] = type(old)(value)
    config_lib.validate(config)
    out.append((" ".join(pairs) or "(config)", config, "xla=default" in pairs))
  return out


def _compiled_variant(label, config, xla_default, shape, images, batches, valid, no_signal, mesh,
                      dataset_size: int) -> dict:
  """One variant's compiled chunk, fresh-state maker, products and compile time."""
  options = {} if xla_default else train.compiler_options(mesh)
  exp = experiment.build(config, shape, dataset_size, data.pixel_mean(images, config.data.binarize))
  keys = state_lib.Keys.from_seed(config.seed)
  fresh = functools.partial(exp.init_state, keys.init)
  loop = loops.resolve(config, mesh, exp.model)
  chunk = train.make_train_chunk(exp.train_step(), mesh, loop, options)
  products = step_matmuls(exp.objective.gradients, fresh().params, keys.train,
                          jnp.zeros((config.batch_size,) + shape, jnp.float32),
                          jnp.zeros((), jnp.int32))
  t0 = time.perf_counter()
  chunk = chunk.lower(fresh(), batches, valid, keys.train, no_signal).compile()
  return {"label": label, "chunk": chunk, "fresh": fresh, "key": keys.train,
          "products": products, "seconds": [], "rates": [], "loop": loop, "options": options,
          "xla_default": xla_default,
          "compile_s": time.perf_counter() - t0}


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  shape = tuple(int(s) for s in flags.FLAGS.image_shape)
  variants = parse_variants(flags.FLAGS.variants, flags.FLAGS.config)
  batch = variants[0][1].batch_size
  if any(c.batch_size != batch for _, c, _ in variants):
    raise ValueError("variants must share batch_size (it sets the images each chunk takes)")
  parallel.check_batch_divides(batch, mesh)
  steps = flags.FLAGS.steps
  steps_per_epoch = 50_000 // batch  # the epoch of the s/50k column (and beta_tcvae's N)
  images = np.random.default_rng(0).integers(0, 256, (steps * batch,) + shape, np.uint8)
  batches = parallel.gather_batches(images, np.arange(steps * batch).reshape(steps, batch), mesh)
  valid, no_signal = np.ones(steps, bool), parallel.signal_array(0, mesh)

  # steps_per_epoch * batch training images: the epoch of the s/50k column (and beta_tcvae's N)
  runs = [_compiled_variant(label, config, xla_default, shape, images, batches, valid, no_signal,
                            mesh, steps_per_epoch * batch)
          for label, config, xla_default in variants]

  for _ in range(flags.FLAGS.rounds):
    for run in runs:
      state = jax.block_until_ready(run["fresh"]())
      t0 = time.perf_counter()
      jax.block_until_ready(run["chunk"](state, batches, valid, run["key"], no_signal))
      run["seconds"].append((time.perf_counter() - t0) / steps)
    rates = {}  # variants with the same products and options share one measurement per round
    for run in runs:
      shapes = (tuple((f, str(p), str(lhs), str(rhs)) for f, (_, p, lhs, rhs) in run["products"]),
                str(sorted(run["options"].items())))
      if shapes not in rates:
        rates[shapes] = matmul_rate(run["products"], run["options"], TIMING_S.value)
      run["rates"].append(rates[shapes])

  first = float(np.median(runs[0]["seconds"]))
  rows = []
  for run in runs:
    step_s, rate = float(np.median(run["seconds"])), float(np.median(run["rates"]))
    flops = sum(f for f, _ in run["products"])
    rows.append({"variant": run["label"], "loop_mode": run["loop"], "compile_s": run["compile_s"],
                 "xla_options": "default" if run["xla_default"] else "jaxvae",
                 "batch_size": batch, "ms_per_step": step_s * 1e3,
                 "min_ms_per_step": min(run["seconds"]) * 1e3,
                 "s_per_50k_images": step_s * steps_per_epoch, "speedup": first / step_s,
                 "step_gflop": flops / 1e9, "matmul_rate_gflop_per_s": rate / 1e9,
                 "fraction_of_matmul_rate": flops / step_s / rate})
  width = max(len(r["variant"]) for r in rows)
  print(f"{'variant':<{width}}  loop      compile s  ms/step (min)    s/50k img  speedup  "
        "step vs its matmul rate")
  for r in rows:
    print(f"{r['variant']:<{width}}  {r['loop_mode']:<8}  {r['compile_s']:9.2f}  "
          f"{r['ms_per_step']:7.2f} ({r['min_ms_per_step']:6.2f})  "
          f"{r['s_per_50k_images']:9.2f}  {r['speedup']:6.2f}x  "
          f"{100 * r['fraction_of_matmul_rate']:5.1f}% of {r['matmul_rate_gflop_per_s']:.0f} GFLOP/s")
  print(json.dumps({"rounds": flags.FLAGS.rounds, "steps": steps, "variants": rows}))


if __name__ == "__main__":
  app.run(main)
