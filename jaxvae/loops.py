"""Whether the steps of training and the batches of evaluation run in a compiled loop.

`scan`: a chunk of train steps, or a test split's batches, is one compiled call with a loop
inside (`lax.fori_loop`, `lax.map`, `lax.scan`); the host dispatches once per chunk.
`per_step`: Python calls one compiled program per step or per batch, and the IWAE's loop over
sample chunks is unrolled, so no convolution runs inside a compiled loop.

XLA:CPU gives a convolution inside a while loop a slow generic kernel instead of its fast one
(jax-ml/jax#12868; the loop body keeps the convolution's dimension order rather than the
canonical one the fast kernel takes). For the CIFAR-10 conv VAE at batch 64 on 2 cores, a
step in a loop took 1.4-3.3 s against 80-150 ms per compiled call. So `auto` is `per_step` for
a conv model on CPU and `scan` otherwise: an MLP has no convolution, and on GPU convolutions
run the same cuDNN kernels inside a loop while the loop saves a host dispatch per step.

Unrolling a chunk (straight-line steps in one program) was measured too and not kept: no
faster per step than one call per step (within noise), and compiling 6 unrolled steps took
21.5 s against 5.7 s for one.
"""

LOOP_MODES = ("auto", "scan", "per_step")
CONV_ARCHS = ("conv", "locatello")  # the `model.arch`s with convolutions


def resolve(config, mesh) -> str:
  """`config.loop_mode` for a run on `mesh`'s platform: "scan" or "per_step"."""
  if config.loop_mode != "auto":
    return config.loop_mode
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return "per_step" if on_cpu and config.model.arch in CONV_ARCHS else "scan"
