"""Where a config's train step spends its time: the compiled gradient program profiled per XLA op.

  python benchmarks/profile_step.py --config configs/cifar10_topdown.py [--config.key=value ...]
      [--image_shape 32,32,3] [--calls 3] [--top 30]

One process, random uint8 images of the config's batch. It compiles the objective's gradients
(what a train step computes before the optimizer update), times --calls calls, then records
--calls more with `jax.profiler` and sums each XLA op's time (on CPU, one per thunk: a fusion, a
convolution, a dot, a copy). Prints the ops by kind (a fusion's name without its number: its
root ops, e.g. `multiply_tanh_fusion`) and the top ops with their output shape and the JAX
source op they came from, then one JSON line:
  step_ms            median wall time of one call, outside the profiler
  profiled_op_ms     the ops' summed time per call (can exceed step_ms where ops overlap)
  by_kind            {kind: ms per call}
  top                [[op, ms per call, output shape, source op], ...]
"""

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxvae import config as config_lib
from jaxvae import data, experiment, loops

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                lock_config=True)
flags.DEFINE_list("image_shape", ["32", "32", "3"], "H,W,C of the random images.")
flags.DEFINE_integer("calls", 3, "Timed calls, then as many profiled ones.")
flags.DEFINE_integer("top", 30, "Ops listed one by one.")
flags.mark_flags_as_required(["config"])

def op_times(trace_dir: str, calls: int, ops: set[str]) -> dict[str, float]:
  """{XLA op name: milliseconds per call} from the profiler's trace in `trace_dir`, for the
  events named like one of `ops` (the runtime's and Python's own spans are left out)."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in ops:
      times[e["name"]] += e["dur"] / 1e3 / calls
  return dict(times)


def op_kind(name: str) -> str:
  """"multiply_tanh_fusion.12" -> "multiply_tanh_fusion"; "dot" -> "dot"."""
  base, _, number = name.rpartition(".")
  return base if base and number.isdigit() else name


def op_sources(hlo: str) -> dict[str, tuple[str, str]]:
  """{op name: (output shape, JAX source op or "")} of every instruction in compiled HLO text."""
  found = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([^\n]*)", hlo, re.M):
    source = re.search(r"op_name=\"([^\"]*)\"", m.group(3))
    found.setdefault(m.group(1), (m.group(2), source.group(1).removeprefix("jit(gradients)/")
                                  if source else ""))
  return found


def profile(gradients, args, calls: int) -> dict:
  """Times and profiles the compiled `gradients(*args)`, compiled as train.py compiles a step."""
  compiled = loops.jit(gradients).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  walls = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    walls.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    sources = op_sources(compiled.as_text())
    times = op_times(trace_dir, calls, set(sources))
  kinds = collections.Counter()
  for name, ms in times.items():
    kinds[op_kind(name)] += ms
  top = sorted(times.items(), key=lambda kv: -kv[1])[:flags.FLAGS.top]
  return {"step_ms": 1e3 * float(np.median(walls)), "profiled_op_ms": sum(times.values()),
          "by_kind": dict(kinds.most_common()),
          "top": [[name, ms, *sources.get(name, ("?", "?"))] for name, ms in top]}


def main(argv):
  del argv
  config = flags.FLAGS.config
  config_lib.validate(config)
  shape = tuple(int(s) for s in flags.FLAGS.image_shape)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2 * config.batch_size,) + shape, np.uint8)
  split = data.Split(images, np.zeros(len(images), np.int32))
  ds = data.Dataset(split, split, ("0",), "random")
  exp = experiment.build_for(config, ds)
  state = exp.init_state(jax.random.key(config.seed))
  x = jnp.asarray(images[:config.batch_size], jnp.float32) / 255.0
  out = profile(exp.objective.gradients, (state.params, jax.random.key(1), x, jnp.int32(0)),
                flags.FLAGS.calls)
  print(f"step {out['step_ms']:.1f} ms; the ops sum to {out['profiled_op_ms']:.1f} ms a call")
  print("by kind:")
  for kind, ms in list(out["by_kind"].items())[:15]:
    print(f"  {ms:9.2f} ms  {kind}")
  print("top ops:")
  for name, ms, shape_text, source in out["top"]:
    print(f"  {ms:9.2f} ms  {name:34s} {shape_text:28s} {source[-80:]}")
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
