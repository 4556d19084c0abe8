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
"""

LOOP_MODES = ("auto", "scan", "per_step")


def resolve(config, mesh, model) -> str:
  """`config.loop_mode` for `model` (a `models.VAE`, which says whether it holds convolutions)
  on `mesh`'s platform: "scan" or "per_step"."""
  if config.loop_mode != "auto":
    return config.loop_mode
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return "per_step" if on_cpu and model.has_convolutions else "scan"
