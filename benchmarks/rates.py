"""The machine's matmul rate at a train step's own products, and the optimizer's cost alone;
shared by benchmarks/throughput.py and benchmarks/compare.py."""

import functools
import math
import time

import jax
import jax.extend
import jax.numpy as jnp
import optax
from absl import flags

TIMING_S = flags.DEFINE_float(
    "timing_s", 0.25, "About how long each product is timed, best of three (the 2048^3 product "
    "and the optimizer: 4x); the default gives steady figures, a test sets it small.")


def _dot_flops(eqn) -> tuple[int, tuple]:
  """FLOPs of one dot_general or convolution, and what is needed to replay it."""
  lhs, rhs = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[d] for d in contract)
  else:  # conv_general_dilated: each output element sums over a kernel window of all inputs
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    k = math.prod(rhs.shape[d] for d in spec[1:]) // eqn.params["feature_group_count"]
  return 2 * math.prod(out.shape) * k, (eqn.primitive, eqn.params, lhs, rhs)


def step_matmuls(gradients_fn, *args) -> list[tuple[int, tuple]]:
  """Every matrix product (and convolution) whose result reaches an output of
  `gradients_fn(*args)`, from its jaxpr: for an objective's `gradients`, one forward + backward
  pass of every trained group. A product that reaches no output (a pullback's gradient of a
  group it does not train) is left out, as XLA removes it when it compiles the step."""
  found = []

  def walk(jaxpr, used_outputs: list[bool]) -> list[bool]:
    """Records the live products of `jaxpr`, given which outputs are used; returns which
    inputs are."""
    live = {v for v, used in zip(jaxpr.outvars, used_outputs) if used and _is_var(v)}
    for eqn in reversed(jaxpr.eqns):
      outputs = [_is_var(v) and v in live for v in eqn.outvars]
      if not any(outputs) and not eqn.effects:
        continue
      if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
        found.append(_dot_flops(eqn))
      subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
      inputs = [True] * len(eqn.invars)
      if eqn.primitive.name in ("pjit", "jit", "closed_call") and len(subs) == 1:
        inputs = walk(subs[0], outputs)  # a call: its inputs and outputs are the equation's
      else:  # loops, branches, custom derivatives: every product inside counts
        for sub in subs:
          walk(sub, [True] * len(sub.outvars))
      live.update(v for v, used in zip(eqn.invars, inputs) if used and _is_var(v))
    return [v in live for v in jaxpr.invars]

  closed = jax.make_jaxpr(gradients_fn)(*args)
  walk(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return found[::-1]


def _is_var(v) -> bool:
  return isinstance(v, jax.extend.core.Var) and not isinstance(v, jax.extend.core.DropVar)


def _time_loop(fn, args, min_seconds: float = 1.0) -> float:
  """Seconds per repetition of fn(reps, *args): the best of three runs of about
  `min_seconds`, after a warm-up (reps is static: two counts, two compilations)."""
  jax.block_until_ready(fn(4, *args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(4, *args))
  reps = max(4, math.ceil(4 * min_seconds / (time.perf_counter() - t0)))
  jax.block_until_ready(fn(reps, *args))
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(reps, *args))
    times.append(time.perf_counter() - t0)
  return min(times) / reps


def product_seconds(product, *operands, options: dict, min_seconds: float = 1.0) -> float:
  """Seconds of one product(*operands), compiled alone and called from Python, outside any
  loop: the best of three runs of about `min_seconds` of calls, after a warm-up. Calls are
  dispatched asynchronously, so each is queued while the one before runs. Inside a compiled
  loop XLA:CPU gives a convolution a slow kernel (jax-ml/jax#12868), which would misstate a
  step that runs none in a loop."""
  run = jax.jit(product, compiler_options=options)
  jax.block_until_ready(run(*operands))
  t0 = time.perf_counter()
  jax.block_until_ready(run(*operands))
  calls = max(1, math.ceil(min_seconds / (time.perf_counter() - t0)))
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = run(*operands)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return min(times) / calls


def matmul_rate(products: list[tuple[int, tuple]], options: dict,
                min_seconds: float = 0.25) -> float:
  """FLOP/s of the given products computed together: one program of all of them, each on
  operands of its own shape and dtype, timed as `product_seconds` times one product (about
  `min_seconds` per product). XLA:CPU runs independent products at the same time, in the step
  as here (a layer's two backward products, the VAE-GAN's three pullbacks); summing each
  product's time alone overstated the step's products by a third there, and the step ran
  faster than that "floor"."""
  ops = [functools.partial(prim.bind, **params) for _, (prim, params, _, _) in products]
  operands = [(jnp.full(lhs.shape, 0.5, lhs.dtype), jnp.full(rhs.shape, 0.5, rhs.dtype))
              for _, (_, _, lhs, rhs) in products]
  together = lambda operands: [op(a, b) for op, (a, b) in zip(ops, operands)]
  seconds = product_seconds(together, operands, options=options,
                            min_seconds=min_seconds * len(products))
  return sum(f for f, _ in products) / seconds


def large_matmul_rate(options: dict, n: int = 2048, min_seconds: float = 1.0) -> float:
  a = jnp.full((n, n), 0.5, jnp.float32)
  return 2 * n ** 3 / product_seconds(jnp.matmul, a, a, options=options,
                                       min_seconds=min_seconds)


def optimizer_seconds(tx, params, opt_state, options: dict, min_seconds: float = 1.0) -> float:
  """One tx.update + apply_updates over the real parameters, alone."""
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  @functools.partial(jax.jit, static_argnums=0, compiler_options=options)
  def run(reps, params, opt_state, grads):
    def body(_, carry):
      params, opt_state, grads = carry
      grads = jax.lax.optimization_barrier(grads)  # not hoisted: read afresh every update
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, grads
    return jax.lax.fori_loop(0, reps, body, (params, opt_state, grads))[:2]

  return _time_loop(run, (params, opt_state, grads), min_seconds)
