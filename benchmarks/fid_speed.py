"""Speed of the FID Inception forward on this machine, against its convolutions' own rate.

  python benchmarks/fid_speed.py [--num 200] [--batch 50] [--dtype float32|bfloat16]

prints images/s of `jaxvae.fid.features` on `--num` random 32x32 images (resize to 299x299
included), the forward's convolution FLOPs, the rate of those same convolutions each compiled
and timed alone (their floor: the forward cannot beat its own products), and the rate of one
large convolution alone, all in one process; then extrapolates to 10,000 and 50,000 images.
Timings on a shared machine move between runs; read the ratios, which are within one run.
"""

import argparse
import collections
import functools
import json
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

import rates
from jaxvae import fid, loops

# As jaxvae compiles the forward (`loops.jit`), so the floors are the convolutions it runs.
_OPTIONS = loops.compiler_options(jax.default_backend())


def forward_convolutions(net: fid.FeatureNet, batch: int) -> list[tuple[int, tuple]]:
  """Every convolution of the forward on a batch of 299x299 inputs, from its jaxpr."""
  x = jnp.zeros((batch, net.size, net.size, 3))
  jaxpr = jax.make_jaxpr(net.module.apply)(net.params, x)
  found = []

  def walk(j):
    for eqn in j.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        found.append(rates._dot_flops(eqn))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return found


def own_rate(convs: list[tuple[int, tuple]]) -> float:
  """FLOP/s of the forward's convolutions, each distinct one timed alone (`rates`)."""
  groups = collections.defaultdict(lambda: [0, 0])
  for flops, (prim, params, lhs, rhs) in convs:
    key = (str(sorted(params.items())), lhs.shape, rhs.shape, str(lhs.dtype))
    groups[key][0] += 1
    groups[key][1] = (flops, (prim, params, lhs, rhs))
  seconds = 0.0
  for count, (_, (prim, params, lhs, rhs)) in groups.values():
    seconds += count * rates.product_seconds(functools.partial(prim.bind, **params),
                                             jnp.full(lhs.shape, 0.5, lhs.dtype),
                                             jnp.full(rhs.shape, 0.5, rhs.dtype), options=_OPTIONS,
                                             min_seconds=0.25)
  return sum(f for f, _ in convs) / seconds


def large_conv_rate(batch: int, dtype) -> float:
  """One 3x3 convolution, 80 -> 192 channels on 73x73 (the stem's largest), alone: FLOP/s."""
  x = jnp.full((batch, 73, 73, 80), 0.5, dtype)
  w = jnp.full((3, 3, 80, 192), 0.01, dtype)
  conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                   preferred_element_type=jnp.float32)
  return 2 * batch * 71 * 71 * 192 * 9 * 80 / rates.product_seconds(conv, x, w, options=_OPTIONS)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num", type=int, default=200)
  p.add_argument("--batch", type=int, default=50)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args()
  dtype = jnp.dtype(args.dtype)
  net = fid.standard_net(dtype)
  images = np.random.default_rng(0).integers(0, 256, (args.num, 32, 32, 3), dtype=np.uint8)
  t0 = time.perf_counter()
  fid.features(net, images[:args.batch], args.batch)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  fid.features(net, images, args.batch)
  seconds = time.perf_counter() - t0
  per_s = args.num / seconds
  convs = forward_convolutions(net, args.batch)
  flops_per_image = sum(f for f, _ in convs) / args.batch
  own = own_rate(convs)
  large = large_conv_rate(args.batch, dtype)
  out = {"dtype": args.dtype, "images": args.num, "batch": args.batch,
         "compile_and_first_batch_s": round(compile_s, 1), "seconds": round(seconds, 1),
         "images_per_s": round(per_s, 2), "conv_gflop_per_image": round(flops_per_image / 1e9, 2),
         "forward_gflop_per_s": round(per_s * flops_per_image / 1e9, 1),
         "own_convs_alone_gflop_per_s": round(own / 1e9, 1),
         "large_conv_alone_gflop_per_s": round(large / 1e9, 1),
         "fraction_of_own_convs_rate": round(per_s * flops_per_image / own, 3),
         "fraction_of_large_conv_rate": round(per_s * flops_per_image / large, 3),
         "extrapolated_min_10k": round(10_000 / per_s / 60, 1),
         "extrapolated_min_50k": round(50_000 / per_s / 60, 1)}
  print(f"{args.num} images, batch {args.batch}, {args.dtype}: {per_s:.2f} images/s "
        f"({flops_per_image / 1e9:.2f} GFLOP of convolutions per image, "
        f"{out['forward_gflop_per_s']} GFLOP/s); the same convolutions alone "
        f"{out['own_convs_alone_gflop_per_s']} GFLOP/s ({out['fraction_of_own_convs_rate']:.0%} "
        f"of it), one large conv alone {out['large_conv_alone_gflop_per_s']} GFLOP/s "
        f"({out['fraction_of_large_conv_rate']:.0%}); extrapolated: 10,000 images "
        f"{out['extrapolated_min_10k']} min, 50,000 {out['extrapolated_min_50k']} min")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
