"""Whether the steps of training and the batches of evaluation run in a compiled loop.

`scan`: a chunk of train steps, or a test split's batches, is one compiled call with a loop
inside (`lax.fori_loop`, `lax.map`, `lax.scan`); the host dispatches once per chunk.
`per_step`: Python calls one compiled program per step or per batch, and the IWAE's loop over
sample chunks is unrolled, so no convolution runs inside a compiled loop.

XLA:CPU gives a convolution inside a while loop a slow generic kernel instead of its fast one
(jax-ml/jax#12868): for the CIFAR-10 conv VAE at batch 64 on 2 shared cores a step took 7.8 s
in the scanned chunk against 0.62 s as one compiled call (benchmarks/compare.py, one process).
So `auto` is `per_step` for a conv model on CPU and `scan` otherwise: an MLP has no
convolution, and on GPU the loop is kept because convolutions run the same cuDNN kernels
inside it while it saves a host dispatch per step (an H100 ran a small conv net's step in
0.33 ms scanned against 0.55-0.63 ms per call, at batch 64).

Unrolling a chunk (its steps as straight-line code in one program) was measured too and not
kept: no faster per step (237-244 ms against 227 ms per call, same process) and slower to
compile (21.5 s for 6 unrolled steps against 5.7 s for one).

`compiler_options` holds the XLA options of every program jaxvae compiles, and `jit` applies them.
"""

import functools

import jax

LOOP_MODES = ("auto", "scan", "per_step")

# jaxlib 0.10's XLA:CPU hands dots, reductions and convolutions to YNNPACK by default; its
# convolutions are slow here: a 3x3 conv's weight gradient (64 -> 100 channels, 32x32, batch 64)
# ran at 4.1 GFLOP/s against Eigen's 60, and the FID Inception's forward at 34 GFLOP/s against
# 95 (docs/speed.md#convolutions-on-xlacpu). So convolutions go to Eigen and the rest stays as
# the default has it: a program without convolutions compiles to the same code.
_CPU_OPTIONS = {
    # The default copy insertion copies the loop-carried parameters the optimizer updates in
    # place (about 8 MB per step for the paper's model); region analysis proves them unneeded:
    # 11.6 -> 8.3 ms per step at batch 32 on 2 cores, bitwise the same result.
    "xla_cpu_copy_insertion_use_region_analysis": True,
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def compiler_options(platform: str) -> dict:
  """XLA options for jaxvae's programs on `platform` ("cpu", "gpu", ...)."""
  return dict(_CPU_OPTIONS) if platform == "cpu" else {}


class jit:  # pylint: disable=invalid-name
  """`jax.jit(fun, **kwargs)` with `compiler_options` of the default backend. The program is
  built at its first use, so that defining one (as a module-level decorator) starts no backend.
  Called on traced values (inside another program, which has its own options), it is a plain
  `jax.jit`, since only an outermost program takes compiler options."""

  def __init__(self, fun, **kwargs):
    functools.update_wrapper(self, fun)
    self._fun, self._kwargs = fun, kwargs

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self._fun, compiler_options=compiler_options(jax.default_backend()),
                   **self._kwargs)

  @functools.cached_property
  def _nested(self):
    return jax.jit(self._fun, **self._kwargs)

  def __call__(self, *args, **kwargs):
    traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((args, kwargs)))
    return (self._nested if traced else self._jitted)(*args, **kwargs)

  def __getattr__(self, name):  # lower, trace, _cache_size, ...
    return getattr(self._jitted, name)


def resolve(config, mesh, model) -> str:
  """`config.loop_mode` for `model` (a `models.VAE`, which says whether it holds convolutions)
  on `mesh`'s platform: "scan" or "per_step"."""
  if config.loop_mode != "auto":
    return config.loop_mode
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return "per_step" if on_cpu and model.has_convolutions else "scan"
