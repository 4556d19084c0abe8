"""The honest floor: a minimal implementation of the same model and loss, timed in the same
process as jaxvae's own scanned epoch.

  python benchmarks/minimal.py --setup iwae --data_path /work/shared/data/mnist-png.tar.gz
  python benchmarks/minimal.py --setup flax --data_path /work/shared/data/mnist-png.tar.gz

Setups:
  iwae  configs/mnist_iwae.py, VAE k = 1: 784-200-200-50 tanh, Bernoulli, batch 20, Adam
        (b1 0.9, b2 0.999, eps 1e-4), dynamic binarization per batch. The minimal pass is the
        two networks as plain functions, optax.adam at 1e-3 (jaxvae reads its schedule), a
        `uniform < x` draw per batch, one `lax.scan` over the pass's steps gathering each batch
        from the device-resident images; no metrics, no checks.
  flax  the flax example's config (examples/vae: batch 128, 500 relu hidden, z = 20, Bernoulli
        on binarized MNIST, Adam 1e-3): the minimal scanned pass above at that size, and the
        flax example's own step (flax modules, `jax.jit` per step, a Python loop feeding host
        batches; its tf.data pipeline left out, which only flatters it). jaxvae runs
        configs/mnist_iwae.py's data with the example's model: threshold binarization (the
        PNG copy is not pre-binarized), relu, lecun_normal, default skip_nonfinite.

Without --data_path the images are random uint8 of MNIST's shape (a test's fallback).
Rounds interleave the implementations, so each sees the same moments of a shared machine:
report the ratios. Prints a table, then one JSON line:
  steps_per_pass, timed_steps        a pass's steps; the steps each timing runs (--steps)
  <impl>_compile_s                   compiling its pass (its step for flax_example)
  <impl>_ms_per_step                 median over --rounds of the timed steps
  <impl>_min_ms_per_step             the fastest round (the least disturbed on a shared machine)
  <impl>_s_per_pass                  that times steps_per_pass
  jaxvae_over_minimal                jaxvae's ms/step over the minimal's
  jaxvae_over_flax_example           (flax) jaxvae's ms/step over the flax example's
  iwae_<impl>_{s,nats}               (--iwae_images) the K-draw bound over that many test images:
                                     seconds with compiling, and the mean bound; the same draws
                                     and initial parameters, so the nats agree to rounding
  iwae_<impl>_ms_per_image           past compiling (the run on all images less one on a batch)
  iwae_<impl>_s_for_10000            compiling and 10,000 images at that rate
  iwae_jaxvae_over_minimal           the ratio of the ms per image
"""

import functools
import json
import math
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax.training import train_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, as train.py sees it
from configs import mnist_iwae  # noqa: E402
from jaxvae import batching, data, evaluate, experiment, loops, models, parallel, train
from jaxvae import state as state_lib

flags.DEFINE_enum("setup", "iwae", ["iwae", "flax"], "Which model and protocol (see above).")
flags.DEFINE_string("data_path", None, "MNIST as an image folder or .tar.gz; random images of "
                    "MNIST's shape when not given.")
flags.DEFINE_integer("num_train", 60_000, "Random training images (without --data_path).")
flags.DEFINE_integer("steps", 0, "Time only this many steps of a pass (0: all) and scale.")
flags.DEFINE_integer("rounds", 3, "Timed rounds, each running every implementation once.")
flags.DEFINE_integer("iwae_images", 0, "Also time the IWAE bound (iwae setup) on this many test "
                     "images, jaxvae's against the minimal chunked one (0: skip).")
flags.DEFINE_integer("iwae_samples", 5000, "K of that IWAE bound.")

SETUPS = {  # hidden widths, latent, activation, batch, Adam eps, binarization
    "iwae": ((200, 200), 50, "tanh", 20, 1e-4, "dynamic"),
    "flax": ((500,), 20, "relu", 128, 1e-8, "threshold"),
}


def jaxvae_config(setup: str, data_path: str | None):
  """configs/mnist_iwae.py, or it with the flax example's model and optimizer."""
  config = mnist_iwae.get_config()
  config.data.path = data_path or ""
  if setup == "flax":
    config.model.hidden, config.model.latent_dim = (500,), 20
    config.model.activation, config.model.kernel_init = "relu", "lecun_normal"
    config.model.output_bias_init = "zeros"
    config.data.binarize = "threshold"
    config.batch_size = 128
    config.optimizer.schedule, config.optimizer.eps = "constant", 1e-8
    config.optimizer.skip_nonfinite = "grads"
  return config


def load_images(config, data_path: str | None, num_train: int) -> data.Dataset:
  """MNIST from `data_path`, else random uint8[N, 28, 28, 1] (num_train and 1,000 test)."""
  if data_path:
    return data.load(config.data)
  rng = np.random.default_rng(0)
  split = lambda n: data.Split(rng.integers(0, 256, (n, 28, 28, 1), np.uint8),
                               np.zeros(n, np.int32))
  return data.Dataset(split(num_train), split(1000), ("0",), "random")


# ----------------------------------------------------------------------------- minimal


def init_mlp(key: jax.Array, sizes, output_bias=None) -> list[tuple[jax.Array, jax.Array]]:
  """Glorot-uniform kernels, zero biases (the last `output_bias` if given): [(W, b)]."""
  layers = []
  for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    limit = math.sqrt(6 / (m + n))
    w = jax.random.uniform(jax.random.fold_in(key, i), (m, n), jnp.float32, -limit, limit)
    b = output_bias if output_bias is not None and i == len(sizes) - 2 else jnp.zeros(n)
    layers.append((w, b))
  return layers


def mlp(layers, h, act):
  for w, b in layers[:-1]:
    h = act(h @ w + b)
  w, b = layers[-1]
  return h @ w + b


def minimal_loss(params, key, x, act):
  """-ELBO of a batch x f32[B, 784] in {0, 1}, mean over the batch; analytic KL."""
  out = mlp(params["enc"], x, act)
  mean, log_scale = jnp.split(out, 2, axis=-1)
  log_scale = 7.0 * jnp.tanh(log_scale / 7.0)  # jaxvae's soft clamp, the same model
  z = mean + jnp.exp(log_scale) * jax.random.normal(key, mean.shape)
  logits = mlp(params["dec"], z, act)
  log_lik = jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
  kl = jnp.sum(0.5 * (mean ** 2 + jnp.exp(2 * log_scale) - 1) - log_scale, axis=-1)
  return -jnp.mean(log_lik - kl)


def make_minimal_pass(setup: str, images: np.ndarray):
  """(init(key) -> carry, pass(carry, key, steps) -> carry): a pass of `steps` steps as one
  scan over a fresh permutation, batches gathered from the float images on device."""
  hidden, latent, act_name, batch, eps, binarize = SETUPS[setup]
  act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act_name]
  x_all = jnp.asarray(images.reshape(len(images), -1), jnp.float32) / 255.0
  mean_img = jnp.clip(x_all.mean(0), 1e-3, 1 - 1e-3)
  tx = optax.adam(1e-3, b1=0.9, b2=0.999, eps=eps)
  dims = (x_all.shape[1],) + hidden

  def init(key):
    params = {"enc": init_mlp(key, dims + (2 * latent,)),
              "dec": init_mlp(jax.random.fold_in(key, 1), (latent,) + hidden[::-1] + dims[:1],
                              jnp.log(mean_img / (1 - mean_img)))}
    return params, tx.init(params)

  def step(carry, inputs):
    params, opt_state = carry
    idx, key = inputs
    bin_key, z_key = jax.random.split(key)
    x = x_all[idx]
    x = (jax.random.uniform(bin_key, x.shape) < x if binarize == "dynamic" else x >= 0.5)
    grads = jax.grad(minimal_loss)(params, z_key, x.astype(jnp.float32), act)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
  def one_pass(carry, key, steps):
    perm_key, step_key = jax.random.split(key)
    idx = jax.random.permutation(perm_key, len(images))[: steps * batch].reshape(steps, batch)
    return jax.lax.scan(step, carry, (idx, jax.random.split(step_key, steps)))[0]

  return jax.jit(init), one_pass


# ----------------------------------------------------------------------------- flax example


class FlaxExampleVAE(nn.Module):
  """flax/examples/vae's model: Dense(500) relu -> (mean, logvar) of 20; Dense(500) relu ->
  784 logits."""

  @nn.compact
  def __call__(self, x, z_rng):
    h = nn.relu(nn.Dense(500, name="fc1")(x))
    mean, logvar = nn.Dense(20, name="fc2_mean")(h), nn.Dense(20, name="fc2_logvar")(h)
    z = mean + jax.random.normal(z_rng, logvar.shape) * jnp.exp(0.5 * logvar)
    h = nn.relu(nn.Dense(500, name="fc3")(z))
    return nn.Dense(784, name="fc4")(h), mean, logvar


def make_flax_example_step():
  """The flax example's train_step (its loss as written there), with `jax.jit`."""
  model = FlaxExampleVAE()

  def loss_fn(params, batch, z_rng):
    logits, mean, logvar = model.apply({"params": params}, batch, z_rng)
    log_p = nn.log_sigmoid(logits)
    bce = -jnp.sum(batch * log_p + (1.0 - batch) * jnp.log(-jnp.expm1(log_p)), axis=-1)
    kld = -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)
    return bce.mean() + kld.mean()

  @jax.jit
  def step(state, batch, z_rng):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params, batch, z_rng))

  def init(key):
    params = model.init(key, jnp.ones((1, 784)), key)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(1e-3))

  return init, step


def flax_example_pass(step, state, images: np.ndarray, rng: np.random.Generator, key,
                      steps: int):
  """`steps` steps fed from the host as the example's loop does; its tf.data is left out."""
  x = (images.reshape(len(images), -1)[rng.permutation(len(images))[: steps * 128]] >= 128)
  x = x.astype(np.float32)
  for i in range(steps):
    key, z_key = jax.random.split(key)
    state = step(state, x[i * 128:(i + 1) * 128], z_key)
  return jax.block_until_ready(state), key


# ----------------------------------------------------------------------------- IWAE K = 5000


def minimal_iwae(params, key, x, num_samples: int, chunk: int):
  """The IWAE bound per image, draws `chunk` at a time: x f32[B, 784] -> f32[B] nats.

  params: jaxvae's MLP VAE parameters (read as plain arrays); the draws are keyed as jaxvae
  keys them (fold_in(key, chunk index)), so both give the same numbers to float rounding.
  """
  if num_samples % chunk:
    raise ValueError(f"minimal_iwae draws whole chunks: K={num_samples} is not a multiple of "
                     f"the chunk {chunk}")
  enc, dec = params["params"]["encoder"], params["params"]["decoder"]
  dense = lambda p, h: h @ p["kernel"] + p["bias"]
  h = jnp.tanh(dense(enc["Dense_1"], jnp.tanh(dense(enc["Dense_0"], x))))
  mean, log_scale = dense(enc["mean"], h), 7.0 * jnp.tanh(dense(enc["log_scale"], h) / 7.0)

  def body(lse, i):
    eps = jax.random.normal(jax.random.fold_in(key, i), (chunk,) + mean.shape)
    z = mean + jnp.exp(log_scale) * eps
    h = jnp.tanh(dense(dec["Dense_1"], jnp.tanh(dense(dec["Dense_0"], z))))
    logits = dense(dec["Dense_2"], h)
    # log p(x|z) + log N(z; 0, I) - log q(z|x): the log(2 pi) terms cancel.
    log_w = (jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
             + 0.5 * jnp.sum(jnp.square(eps) - jnp.square(z), axis=-1) + jnp.sum(log_scale, -1))
    return jnp.logaddexp(lse, jax.nn.logsumexp(log_w, axis=0)), None

  lse = jax.lax.scan(body, jnp.full(x.shape[:1], -jnp.inf), jnp.arange(num_samples // chunk))[0]
  return lse - math.log(num_samples)


def time_iwae(config, test: data.Split, num_samples: int, extrapolate_to: int = 10_000) -> dict:
  """jaxvae's `evaluate.iwae_on_split` and `minimal_iwae` on the same images, draws and
  parameters (jaxvae's initial ones): seconds and mean bounds of each.

  Each runs on one batch (compiling, plus that batch) and then on all of `test`; the second
  time less the first over the images between them is the seconds per image, and the first
  plus that rate gives the estimate for `extrapolate_to` images.
  """
  mesh = parallel.make_mesh()
  model = models.make_model(config.model, test.images.shape[1:],
                            data.pixel_mean(test.images, config.data.binarize))
  params = models.init_params(model, jax.random.key(1), test.images.shape[1:])
  key = jax.random.key(2)
  streams = batching.stream_keys(key)
  batch, chunk = config.eval.iw_batch_size, min(config.eval.iw_chunk, num_samples)
  index = np.arange(len(test.images), dtype=np.int32)
  _, x = batching.model_inputs(test.images, index, streams.binarize, config.data.binarize)
  x = x.reshape(len(x), -1)

  def minimal(n):
    one = jax.jit(functools.partial(minimal_iwae, num_samples=num_samples, chunk=chunk))
    return float(np.mean(np.concatenate([
        np.asarray(one(params, jax.random.fold_in(streams.iwae, b), x[i:i + batch]))
        for b, i in enumerate(range(0, n, batch))]), dtype=np.float64))

  def jaxvae(n):
    split = data.Split(test.images[:n], test.labels[:n])
    return evaluate.iwae_on_split(model, params, config, split, mesh, key, num_samples)["iwae"]

  out, n = {}, len(test.images)
  for name, fn in (("minimal", minimal), ("jaxvae", jaxvae)):
    _, first = _timed(lambda: fn(batch))
    out[f"iwae_{name}_nats"], seconds = _timed(lambda: fn(n))
    per_image = (seconds - first) / (n - batch)
    out[f"iwae_{name}_s"] = seconds
    out[f"iwae_{name}_ms_per_image"] = per_image * 1e3
    out[f"iwae_{name}_s_for_{extrapolate_to}"] = first + per_image * (extrapolate_to - batch)
  return out


# ----------------------------------------------------------------------------- jaxvae


def make_jaxvae_pass(config, split: data.Split):
  """(state, chunk compiled, run(state, epoch, steps) -> state) as train.py runs an epoch:
  epoch_batches, gather_batches, the scanned chunk, every chunk's sums read."""
  mesh = parallel.make_mesh()
  images = split.images
  steps_per_epoch = len(images) // config.batch_size
  chunk_steps = math.ceil(steps_per_epoch / min(config.log.chunks_per_epoch, steps_per_epoch))
  exp = experiment.build(config, images.shape[1:], len(images),
                         data.pixel_mean(images, config.data.binarize))
  keys = state_lib.Keys(**parallel.replicate(state_lib.Keys.from_seed(config.seed).as_dict(),
                                             mesh))
  state = parallel.replicate(exp.init_state(keys.init), mesh)
  chunk = train.make_train_chunk(exp.train_step(), mesh, loops.resolve(config, mesh, exp.model))
  no_signal = parallel.signal_array(0, mesh)

  def batches_of(epoch, steps):
    idx, valid = jax.device_get(train.epoch_batches(keys.shuffle, epoch, len(images),
                                                    config.batch_size, 0, chunk_steps))
    keep = math.ceil(steps / chunk_steps)
    return idx[:keep], valid[:keep] & (np.arange(keep * chunk_steps) < steps).reshape(keep, -1)

  idx, valid = batches_of(0, 1)
  t0 = time.perf_counter()
  compiled = chunk.lower(state, parallel.gather_batches(images, idx[0], mesh), valid[0],
                         keys.train, no_signal).compile()
  compile_s = time.perf_counter() - t0

  def run(state, epoch, steps):
    idx, valid = batches_of(epoch, steps)
    pending = []
    for i in range(idx.shape[0]):
      state, sums = compiled(state, parallel.gather_batches(images, idx[i], mesh), valid[i],
                             keys.train, no_signal)
      pending.append(sums)
    done = sum(int(s["steps"]) for s in jax.device_get(pending))
    assert done == steps, (done, steps)
    return state

  return state, compile_s, run


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _runners(setup: str, config, split: data.Split, steps: int):
  """({name: run(carry, round) -> carry}, {name: first carry}, {name: compile seconds}) of the
  minimal step, jaxvae's epoch and, for the flax setup, the flax example's step."""
  init, one_pass = make_minimal_pass(setup, split.images)
  key = jax.random.key(0)
  carry = init(key)
  t0 = time.perf_counter()
  one_pass = one_pass.lower(carry, key, steps).compile()
  compile_s = {"minimal": time.perf_counter() - t0}
  jax_state, compile_s["jaxvae"], jaxvae_run = make_jaxvae_pass(config, split)
  runners = {
      "minimal": lambda c, r: jax.block_until_ready(one_pass(c, jax.random.fold_in(key, r))),
      "jaxvae": lambda s, r: jaxvae_run(s, r, steps),
  }
  carries = {"minimal": carry, "jaxvae": jax_state}
  if setup == "flax":
    flax_init, flax_step = make_flax_example_step()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    carries["flax_example"] = flax_example_pass(flax_step, flax_init(key), split.images, rng,
                                                key, 1)
    compile_s["flax_example"] = time.perf_counter() - t0
    runners["flax_example"] = lambda c, r: flax_example_pass(flax_step, c[0], split.images, rng,
                                                             c[1], steps)
  return runners, carries, compile_s


def main(argv):
  del argv
  setup, data_path = flags.FLAGS.setup, flags.FLAGS.data_path
  config = jaxvae_config(setup, data_path)
  ds = load_images(config, data_path, flags.FLAGS.num_train)
  steps_per_pass = len(ds.train.images) // config.batch_size
  steps = min(flags.FLAGS.steps or steps_per_pass, steps_per_pass)
  runners, carries, compile_s = _runners(setup, config, ds.train, steps)
  # One untimed round: first-call costs (the first gather, the allocator) stay out.
  seconds = {name: [] for name in runners}
  for r in range(flags.FLAGS.rounds + 1):
    for name, fn in runners.items():
      carries[name], dt = _timed(lambda: fn(carries[name], r + 1))
      if r:
        seconds[name].append(dt / steps)
  result = {"setup": setup, "data": data_path or "random", "platform": jax.devices()[0].platform,
            "batch_size": config.batch_size, "steps_per_pass": steps_per_pass,
            "timed_steps": steps, "rounds": flags.FLAGS.rounds}
  for name, times in seconds.items():
    result[f"{name}_compile_s"] = compile_s[name]
    result[f"{name}_ms_per_step"] = float(np.median(times)) * 1e3
    result[f"{name}_min_ms_per_step"] = min(times) * 1e3
    result[f"{name}_s_per_pass"] = float(np.median(times)) * steps_per_pass
  result["jaxvae_over_minimal"] = result["jaxvae_ms_per_step"] / result["minimal_ms_per_step"]
  if setup == "flax":
    result["jaxvae_over_flax_example"] = (result["jaxvae_ms_per_step"]
                                          / result["flax_example_ms_per_step"])
  _print_steps(result, list(seconds))
  if flags.FLAGS.iwae_images and setup == "iwae":
    _iwae_rows(config, ds, result)
  print(json.dumps(result))


def _print_steps(result: dict, names: list[str]) -> None:
  print(f"{result['setup']} setup, batch {result['batch_size']}, {result['timed_steps']} of "
        f"{result['steps_per_pass']} steps a pass timed, median of {result['rounds']} "
        f"interleaved rounds, {result['data']}")
  for name in names:
    print(f"  {name:<13} compile {result[f'{name}_compile_s']:6.2f} s  "
          f"{result[f'{name}_ms_per_step']:7.3f} ms/step "
          f"(min {result[f'{name}_min_ms_per_step']:6.3f})  "
          f"{result[f'{name}_s_per_pass']:7.2f} s/pass")
  print(f"  jaxvae / minimal: {result['jaxvae_over_minimal']:.2f}x")
  if "jaxvae_over_flax_example" in result:
    print(f"  jaxvae / flax example: {result['jaxvae_over_flax_example']:.2f}x")


def _iwae_rows(config, ds: data.Dataset, result: dict) -> None:
  """Adds the IWAE bound's timings (`time_iwae`) on --iwae_images test images to `result`."""
  n, k = flags.FLAGS.iwae_images, flags.FLAGS.iwae_samples
  result.update(iwae_images=n, iwae_samples=k, **time_iwae(
      config, data.Split(ds.test.images[:n], ds.test.labels[:n]), k))
  result["iwae_jaxvae_over_minimal"] = (result["iwae_jaxvae_ms_per_image"]
                                        / result["iwae_minimal_ms_per_image"])
  for name in ("minimal", "jaxvae"):
    print(f"  IWAE K={k}, {n} test images, {name:<7}: "
          f"{result[f'iwae_{name}_s']:.2f} s with compiling, "
          f"{result[f'iwae_{name}_ms_per_image']:.1f} ms/image, "
          f"{result[f'iwae_{name}_s_for_10000']:.0f} s for 10,000 (extrapolated), "
          f"{result[f'iwae_{name}_nats']:.4f} nats")
  print(f"  IWAE jaxvae / minimal per image: {result['iwae_jaxvae_over_minimal']:.2f}x")


if __name__ == "__main__":
  app.run(main)
