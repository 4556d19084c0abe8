"""A split of images on device in fixed-size batches, and the keys that score it.

Everything that scores a split derives its keys from the run's eval key (`stream_keys`) and
binarizes each image with a key from its index in the split, so every batching of a split
sees the same binary images. `Batched.map` runs a per-batch function over all batches in a
compiled loop, or one compiled call per batch where convolutions run (see `jaxvae.loops`).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import data, loops, parallel


class Streams(NamedTuple):
  """The eval key's independent streams. Everything that scores a split derives its keys here,
  so the ELBO, the IWAE and the figures see the same binarized images."""
  binarize: jax.Array  # fold_in(binarize, image index) binarizes each test image
  elbo: jax.Array      # fold_in(elbo, batch number): the ELBO's posterior draws
  iwae: jax.Array      # fold_in(iwae, batch number): the IWAE's draws
  paper: jax.Array     # the paper-protocol image's binarization and draw
  figures: jax.Array   # the figures' prior draws, neighbourhoods and image pairs


def stream_keys(key: jax.Array) -> Streams:
  return Streams(*jax.random.split(key, len(Streams._fields)))


def model_inputs(x_uint8: jax.Array, index: jax.Array, bin_key: jax.Array,
                 binarize: str) -> tuple[jax.Array, jax.Array]:
  """(original f32[B, H, W, C] in [0, 1], the model's input x, binarized if configured).

  x_uint8: uint8[B, H, W, C]; index: int32[B], each image's position in its split, which keys
  its binarization draw (so the draw does not depend on how the split is batched).
  """
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(bin_key, index)
  x = jax.vmap(lambda im, k: data.to_unit_interval(im, k, binarize))(x_uint8, keys)
  return data.to_unit_interval(x_uint8, None), x


class Batched:
  """A split on device in fixed-size batches, padded with blank images.

  images uint8[NB, B, H, W, C], index int32[NB, B] (positions in the split) and mask
  bool[NB, B] (False on padding); `map` runs a per-batch function over all batches, in a
  compiled loop or one compiled call per batch (`loop`: "scan" or "per_step", see
  `jaxvae.loops`).
  """

  def __init__(self, images: np.ndarray, batch_size: int, mesh, loop: str):
    self.loop = loop
    n = len(images)
    self.num_images = n
    self.batch = min(batch_size, n)
    num_batches = math.ceil(n / self.batch)
    pad = num_batches * self.batch - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    shape = (num_batches, self.batch)
    replicated = parallel.replicated(mesh)
    self.images = jax.device_put(images.reshape(shape + images.shape[1:]), replicated)
    self.index = jax.device_put(np.arange(num_batches * self.batch, dtype=np.int32).reshape(shape),
                                replicated)
    self.mask = jax.device_put((np.arange(num_batches * self.batch) < n).reshape(shape), replicated)
    sharded = self.batch % mesh.shape[parallel.DATA_AXIS] == 0
    self.sharding = parallel.batch_sharded(mesh) if sharded else None

  def map(self, fn):
    """fn(x uint8[B, ...], index int32[B], batch_number, *args) -> pytree of [B, ...].

    Returns (images, index, *args) -> pytree of [NB, B, ...]: one jitted program that loops
    over the batches, or a `BatchLoop` of one jitted program per batch. Call it with
    `self.images, self.index` so the split is an argument, not a baked-in constant.
    """
    return batch_map(fn, self.loop, self.sharding)

  def unpad(self, per_example):
    """[NB, B, ...] -> numpy [N, ...] in split order."""
    return jax.tree.map(lambda v: np.asarray(v).reshape((-1,) + v.shape[2:])[: self.num_images],
                        per_example)


class BatchLoop:
  """`Batched.map` without a compiled loop: Python calls per_batch(images, index, batch_number,
  *args) once per batch and stacks the results."""

  def __init__(self, per_batch):
    self.per_batch = per_batch

  def __call__(self, images, index, *args):
    outs = [self.per_batch(images, index, np.int32(i), *args) for i in range(images.shape[0])]
    return jax.tree.map(lambda *batches: jnp.stack(batches), *outs)

  def _cache_size(self) -> int:
    return self.per_batch._cache_size()


def batch_map(fn, loop: str, sharding):
  """`Batched.map` of `fn` for a split whose batches take `sharding` (None: unsharded)."""

  def one(i, x, idx, *args):
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    return fn(x, idx, i, *args)

  if loop == "per_step":
    return BatchLoop(loops.jit(lambda images, index, i, *args: one(i, images[i], index[i], *args)))

  def run(images, index, *args):
    return jax.lax.map(lambda inputs: one(*inputs, *args),
                       (jnp.arange(images.shape[0]), images, index))

  return loops.jit(run)
