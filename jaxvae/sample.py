"""Decoding from the latent space, and the `sample` command.

  python -m jaxvae.sample --workdir DIR --num N --out FILE.png [--temperature T] [--seed S]

writes N decoded prior samples of DIR's latest checkpoint as one image grid. Every image here
is the mean of p(x|z) in [0, 1] (for a Bernoulli decoder, the pixel probabilities), not a draw
of pixels. The latent-space walks that the figures show live here too: neighbourhoods of real
encodings, linear and spherical interpolation, and traversals of single dimensions.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from jaxvae import distributions, loops, models
from jaxvae import restore


@functools.partial(loops.jit, static_argnames="model")
def decode_mean(model: models.VAE, params, z: jax.Array) -> jax.Array:
  """z f32[..., K] -> the mean of p(x|z), f32[..., H, W, C] in [0, 1]."""
  flat = z.reshape(-1, z.shape[-1])
  images = distributions.likelihood_mean(model.likelihood,
                                         model.apply(params, flat, method="decode"))
  return images.reshape(z.shape[:-1] + images.shape[1:])


@functools.partial(loops.jit, static_argnames="model")
def reconstruct_mean(model: models.VAE, params, x: jax.Array) -> jax.Array:
  """x f32[B, H, W, C] -> the mean of p(x|z) at z = the posterior mean, f32[B, H, W, C] (a
  top-down model: along every group's posterior mean in turn)."""
  if model.top_down:
    return distributions.likelihood_mean(model.likelihood,
                                         model.apply(params, x, method="reconstruct"))
  mean, _ = model.apply(params, x, method="encode")
  return decode_mean(model, params, mean)


def prior_samples(model: models.VAE, params, key: jax.Array, num: int,
                  temperature: float = 1.0) -> jax.Array:
  """Decoded draws z ~ N(0, temperature^2 I): f32[num, H, W, C]. A top-down model draws each
  group from its prior given the groups above, its scale times `temperature`."""
  if num <= 0 or temperature < 0:
    raise ValueError(f"num={num} must be positive and temperature={temperature} non-negative")
  if model.top_down:
    return _top_down_samples(model, params, key, num, temperature)
  shape = (num, model.code_dim)
  return decode_mean(model, params, temperature * jax.random.normal(key, shape))


@functools.partial(loops.jit, static_argnames=("model", "num"))
def _top_down_samples(model: models.VAE, params, key: jax.Array, num: int,
                      temperature: float) -> jax.Array:
  obs = model.apply(params, key, num, temperature, method="sample")
  return distributions.likelihood_mean(model.likelihood, obs)


def neighbourhood(model: models.VAE, params, key: jax.Array, z: jax.Array, num: int,
                  scale: float = 0.1) -> jax.Array:
  """Decoded z + scale * eps, eps ~ N(0, I), around each row of z f32[B, K]: f32[B, num, H, W, C]
  (the paper's Figure 20 uses scale 0.1 around posterior means)."""
  eps = jax.random.normal(key, (z.shape[0], num, z.shape[-1]))
  return decode_mean(model, params, z[:, None, :] + scale * eps)


def lerp(a: jax.Array, b: jax.Array, steps: int) -> jax.Array:
  """Straight line from a to b, both ends included: f32[P, K] x2 -> f32[P, steps, K]."""
  t = jnp.linspace(0.0, 1.0, steps)[None, :, None]
  return (1 - t) * a[:, None, :] + t * b[:, None, :]


def slerp(a: jax.Array, b: jax.Array, steps: int) -> jax.Array:
  """Spherical interpolation (White 2016): sin((1-t) w) / sin w * a + sin(t w) / sin w * b, with w
  the angle between a and b. Between two draws of N(0, I) it keeps the norm typical of the prior
  where a straight line would pass close to the origin. f32[P, K] x2 -> f32[P, steps, K]."""
  t = jnp.linspace(0.0, 1.0, steps)[None, :, None]
  cos = jnp.sum(a * b, axis=-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
  omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))[:, None, None]
  sin_omega = jnp.sin(omega)
  # Nearly parallel vectors: the arc is the line (and sin(omega) -> 0 would divide by zero).
  parallel = sin_omega < 1e-6
  safe = jnp.where(parallel, 1.0, sin_omega)
  wa = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * omega) / safe)
  wb = jnp.where(parallel, t, jnp.sin(t * omega) / safe)
  return wa * a[:, None, :] + wb * b[:, None, :]


def traversal(z: jax.Array, dims, values) -> jax.Array:
  """z f32[K] with z[d] set to each value, for each d in dims: f32[len(dims), len(values), K]."""
  values = jnp.asarray(values, z.dtype)
  grid = jnp.broadcast_to(z, (len(dims), len(values), z.shape[-1]))
  return jnp.stack([grid[i].at[:, d].set(values) for i, d in enumerate(dims)])


def image_grid(images: np.ndarray, cols: int | None = None, zoom: int = 1) -> np.ndarray:
  """Tiles f32[N, H, W, C] in [0, 1] row by row, `cols` wide (default about square), each pixel
  repeated `zoom` times and a white line `zoom` pixels wide between tiles:
  uint8[rows * (H + 1) * zoom - zoom, cols * (W + 1) * zoom - zoom, C]; unused cells are black."""
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  cells = np.zeros((rows * cols, h, w, c), np.float32)
  cells[:n] = np.clip(images, 0, 1)
  cells = np.pad(cells, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=1.0)
  grid = cells.reshape(rows, cols, h + 1, w + 1, c).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * (h + 1), cols * (w + 1), c)[:-1, :-1]
  grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
  return np.rint(grid * 255).astype(np.uint8)


def save_png(grid: np.ndarray, path: str) -> str:
  """Writes uint8[H, W, 1 or 3] as a PNG (greyscale for one channel)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def default_zoom(height: int) -> int:
  """Enough zoom that each image is at least 32 pixels tall."""
  return max(1, math.ceil(32 / height))


def main(argv):
  f = flags.FLAGS
  if f.num <= 0 or f.temperature < 0:
    raise restore.RunError(f"--num={f.num} must be positive and --temperature={f.temperature} "
                           "non-negative")
  run = restore.restore_for_command(argv, f.workdir)
  images = prior_samples(run.model, run.params, jax.random.key(f.seed), f.num, f.temperature)
  zoom = f.zoom or default_zoom(images.shape[1])
  path = save_png(image_grid(np.asarray(images), zoom=zoom), f.out)
  print(f"wrote {path}: {f.num} prior samples (temperature {f.temperature}) of "
        f"{f.workdir} at epoch {run.progress['epoch']}")


if __name__ == "__main__":  # flags defined only here: train.py, which imports this, has --workdir
  flags.DEFINE_string("workdir", None, "A training run's --workdir (config.json, checkpoints/).")
  flags.DEFINE_integer("num", 64, "How many samples.")
  flags.DEFINE_string("out", None, "The PNG to write (a grid of the samples).")
  flags.DEFINE_float("temperature", 1.0, "z ~ N(0, temperature^2 I); below 1 gives cleaner, "
                     "less varied samples.")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the draws.")
  flags.DEFINE_integer("zoom", 0, "Pixel repeat factor; 0 picks one that makes images >= 32 px.")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(restore.exit_on_user_error(main))
