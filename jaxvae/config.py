"""Config keys, their defaults, and the checks every run makes before any compute.

`configs/*.py` start from `base_config()` and set what their experiment needs. Unknown keys
and wrong types in `--config.key=value` overrides are refused by ml_collections itself
(ConfigDicts here are locked and type-safe); `validate` then checks values and combinations.
"""

import json

import ml_collections

from jaxvae import data, distributions, loops, models, objectives, optim, sprites, topdown
from jaxvae.errors import ConfigError, check_positive


SKIP_NONFINITE = ("grads", "loss", "off")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 10                # epochs to reach; a resumed run continues up to this
  c.num_steps = 0                  # optimizer steps to reach instead of num_epochs (0: epochs)
  c.batch_size = 32                # global batch, split over devices
  c.loop_mode = "auto"             # auto | scan | per_step: train steps and test batches in a
                                   # compiled loop (scan) or one compiled call each (per_step);
                                   # auto: per_step for a conv model on CPU, whose convolutions
                                   # run 10-20x slower in a loop (see jaxvae/loops.py). Frozen
                                   # on resume: the modes agree only up to float rounding

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"           # tfds | folder | digits | sprites
  c.data.name = "cifar10"          # the TFDS name (source=tfds)
  c.data.path = ""                 # folder or .tar.gz (source=folder); TFDS data_dir (tfds)
  c.data.cache_dir = ""            # decoded-folder and sprites cache; default ~/.cache/jaxvae
  c.data.binarize = "none"         # none | threshold | dynamic (Bernoulli draw per batch)
  c.data.sprites_subsample = 0     # sprites: train on a fixed random n of the 737,280-image
                                   # grid (test: min(10,000, n) images); 0: the whole grid
  c.data.sprites_domain = "source"  # sprites: how they are drawn (jaxvae/sprites.py DOMAINS);
                                   # models train on "source" (white on black), the others
                                   # are for transfer tests (evaluate --transfer)

  c.model = _model_config()
  c.objective = objectives.default_config()
  c.optimizer = _optimizer_config()

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0           # evaluate (and write a metrics row) every N steps; 0: at
                                   # each epoch's end. The run's last step is always evaluated
  c.eval.batch_size = 1000         # test-split batch; the split is padded, never truncated
  c.eval.iw_samples = 1000         # K of the IWAE bound in `python -m jaxvae.evaluate`
  c.eval.iw_batch_size = 10        # IWAE: images per step; iw_batch_size * iw_chunk decoded at once
  c.eval.iw_chunk = 100            # IWAE: importance samples drawn per decoder call

  c.log = ml_collections.ConfigDict()
  c.log.chunks_per_epoch = 10      # compiled calls per epoch; the progress bar moves between
  c.log.progress = True            # tqdm progress bar on stderr when it is a terminal
  c.log.tensorboard = True         # also write metrics and images to WORKDIR/tensorboard/
  c.log.figures = True             # draw WORKDIR/figures/ (False: metrics only, for sweeps and tests)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1           # save at every N-th evaluation (epoch, or eval.every_steps);
                                   # also at the end of the run and on SIGINT/SIGTERM
  c.checkpoint.keep = 3            # the latest N, plus the best by test ELBO

  c.figures_every = 0              # also draw figures at every N-th evaluation (0: at the end
                                   # only); nothing is drawn with log.figures=False
  return c


def _model_config() -> ml_collections.ConfigDict:
  """The `config.model` keys and their defaults."""
  k = ml_collections.ConfigDict()
  k.arch = "mlp"                   # mlp | conv | conv_grid (conv's networks with the code a
                                   # grid at the last conv: latent_channels channels; hidden,
                                   # latent_dim unused) | locatello (disentanglement_lib's
                                   # conv_encoder and deconv_decoder, fixed: hidden,
                                   # conv_channels unused) |
                                   # larsen (Larsen et al. 2016, batch norm: objective vae_gan)
  k.hidden = (512,)                # dense widths; the decoder mirrors them
  k.decoder_hidden = ()            # the decoder's dense widths from z outward; (): mirror hidden
  k.conv_channels = (32, 64)        # conv, larsen archs: channels of the stride-2 layers
  k.decoder_channels = (192, 128, 32)  # larsen arch: the decoder's stride-2 transposed convs
  k.latent_dim = 256               # the code z (with a middle layer, the top one, h2)
  k.middle_dim = 0                 # mlp: > 0 adds a stochastic layer h1 of this size between
                                   # x and z (Burda et al.'s two-layer model; 0: one layer)
  k.middle_hidden = ()             # the dense widths between h1 and z, mirrored from z to h1
  k.activation = "gelu"
  k.likelihood = "gaussian"        # gaussian | bernoulli | discretized_logistic |
                                   # mixture_logistic (PixelCNN++'s, 1 or 3 channels)
  k.mixtures = 10                  # mixture_logistic: M, logistic components per pixel
  k.obs_scale = "fixed"            # gaussian: fixed | learned_global | learned_pixel
  k.obs_sigma = 0.5 ** 0.5         # gaussian, fixed: sigma of p(x|z)
  k.decoder_mean = "sigmoid"        # gaussian: sigmoid (paper) | identity
  k.log_scale_bound = 7.0          # every log-scale is soft-clamped to (-bound, bound)
  k.kernel_init = "lecun_normal"        # lecun_normal (flax's default) | glorot_uniform
  k.output_bias_init = "zeros"        # mlp decoder: zeros | data_mean (decodes to the train mean)
  k.compute_dtype = "float32"        # float32 | bfloat16: the layers' products (float32 sums);
                                     # parameters, activations, Adam and the loss stay float32
  # arch=topdown (jaxvae/topdown.py, a VD-VAE-style hierarchy of latent grids; GELU, float32,
  # lecun_normal fixed): its blocks, channels and latent channels per group.
  k.blocks_up = "32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x1"  # bottom-up: r x n | r d pooling
  k.blocks_down = "1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1"  # top-down: r x n | r m from
  k.width = 64                     # channels of every block's input and output
  k.bottleneck = 0.25              # a block's inner channels, as a share of width
  k.latent_channels = 8            # Z, channels of each latent group's grid (conv_grid: of
                                   # the code's grid)
  return k


def _optimizer_config() -> ml_collections.ConfigDict:
  """The `config.optimizer` keys and their defaults."""
  k = ml_collections.ConfigDict()
  k.learning_rate = 1e-3
  k.b1 = 0.9                       # Adam's decay rates of the first and second moments
  k.b2 = 0.999
  k.eps = 1e-8                     # Adam's epsilon, added to the root of the second moment
  k.schedule = "constant"            # constant | piecewise | iwae (see jaxvae/optim.py)
  k.stage_end_epochs = ()            # piecewise: the epoch each stage ends at, increasing
  k.stage_learning_rates = ()            # piecewise: each stage's learning rate
  k.grad_clip_norm = 0.0            # global-norm clipping; 0 turns it off
  k.skip_grad_norm = 0.0            # > 0: a group's update whose gradient's global norm (before
                                    # clipping) is at least this is skipped like a non-finite
                                    # one (VD-VAE's skip threshold); 0 turns it off
  k.ema_decay = 0.0                 # > 0: keep an exponential moving average of the parameters
                                    # with this decay (VD-VAE: 0.9999), which evaluation, the
                                    # figures and the commands then use; 0 turns it off
  k.flatten = False                 # update the parameters as one raveled vector (optax.flatten):
                                    # the same arithmetic, one fused update instead of one per
                                    # array (faster to compile for models of many arrays)
  k.max_consecutive_skips = 20            # non-finite steps are skipped; this many in a row stop
  k.skip_nonfinite = "grads"            # which steps are skipped: grads (a non-finite loss or
                                        # any non-finite gradient) | loss (a non-finite loss
                                        # only; faster) | off (none: a non-finite loss stops
                                        # the run; fastest)
  return k


def _choice(value, allowed, key):
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of {tuple(allowed)}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot run."""
  for key in ("num_epochs", "batch_size", "model.latent_dim", "objective.num_samples",
              "eval.batch_size", "eval.iw_samples", "eval.iw_batch_size", "eval.iw_chunk",
              "log.chunks_per_epoch", "checkpoint.every",
              "checkpoint.keep", "optimizer.max_consecutive_skips"):
    value = c
    for part in key.split("."):
      value = value[part]
    check_positive(value, key)
  for key, value in (("figures_every", c.figures_every), ("num_steps", c.num_steps),
                     ("eval.every_steps", c.eval.every_steps)):
    if value < 0:
      raise ConfigError(f"config.{key}={value} must be >= 0 (0 turns it off)")
  _choice(c.loop_mode, loops.LOOP_MODES, "loop_mode")
  _choice(c.data.source, data.LOADERS, "data.source")
  _choice(c.data.binarize, data.BINARIZATIONS, "data.binarize")
  _validate_model(c.model)
  if c.model.arch == "topdown":
    _validate_topdown(c)
  _choice(c.optimizer.skip_nonfinite, SKIP_NONFINITE, "optimizer.skip_nonfinite")
  _choice(c.optimizer.schedule, optim.SCHEDULES, "optimizer.schedule")
  for key, value in (("model.obs_sigma", c.model.obs_sigma),
                     ("model.log_scale_bound", c.model.log_scale_bound),
                     ("optimizer.learning_rate", c.optimizer.learning_rate),
                     ("optimizer.eps", c.optimizer.eps)):
    check_positive(value, key, float)
  objectives.check(c)
  for key in ("b1", "b2"):
    if not 0 <= c.optimizer[key] < 1:
      raise ConfigError(f"config.optimizer.{key}={c.optimizer[key]} must be in [0, 1) (Adam's "
                        "moment decay rates; the usual values are b1=0.9, b2=0.999)")
  # A run measured in steps is checked once its epoch length is known (jaxvae.train).
  problem = optim.schedule_problem(c.optimizer, 0 if c.num_steps else c.num_epochs)
  if problem:
    raise ConfigError(problem)
  _validate_stabilizers(c.optimizer)
  if c.optimizer.grad_clip_norm < 0:
    raise ConfigError(f"config.optimizer.grad_clip_norm={c.optimizer.grad_clip_norm} must be >= 0 "
                      "(0 turns clipping off)")
  if not 0 <= c.data.sprites_subsample <= sprites.NUM_IMAGES:
    raise ConfigError(f"config.data.sprites_subsample={c.data.sprites_subsample} must be in "
                      f"[0, {sprites.NUM_IMAGES}] (0: the whole grid)")
  _choice(c.data.sprites_domain, sprites.DOMAINS, "data.sprites_domain")
  if c.data.sprites_domain != "source":
    raise ConfigError(f"config.data.sprites_domain={c.data.sprites_domain!r}: models train on the "
                      "binary 'source' sprites; the other domains are for transfer tests "
                      "(python -m jaxvae.evaluate --transfer), so set it to 'source'")
  if c.data.source == "sprites" and c.model.likelihood != "bernoulli":
    raise ConfigError(f"config.model.likelihood={c.model.likelihood!r} does not fit "
                      "data.source='sprites', whose images are binary; set it to 'bernoulli'")
  if c.data.source == "sprites" and c.data.binarize != "none":
    raise ConfigError(f"config.data.binarize={c.data.binarize!r}: data.source='sprites' images "
                      "are already binary; set it to 'none'")
  if c.data.source == "folder" and not c.data.path:
    raise ConfigError("config.data.source='folder' needs config.data.path (a folder laid out "
                      "split/class/*.png, or a .tar.gz of one)")


def _validate_model(m: ml_collections.ConfigDict) -> None:
  _choice(m.arch, models.BUILDERS, "model.arch")
  _choice(m.activation, tuple(models.ACTIVATIONS), "model.activation")
  _choice(m.likelihood, distributions.LIKELIHOODS, "model.likelihood")
  if m.mixtures < 1:
    raise ConfigError(f"config.model.mixtures={m.mixtures} must be >= 1 (the mixture_logistic "
                      "likelihood's components per pixel; PixelCNN++ uses 10)")
  _choice(m.obs_scale, models.OBS_SCALES, "model.obs_scale")
  _choice(m.decoder_mean, models.DECODER_MEANS, "model.decoder_mean")
  _choice(m.compute_dtype, models.COMPUTE_DTYPES, "model.compute_dtype")
  _choice(m.kernel_init, tuple(models.KERNEL_INITS), "model.kernel_init")
  _choice(m.output_bias_init, models.OUTPUT_BIAS_INITS, "model.output_bias_init")
  if m.output_bias_init == "data_mean" and m.arch != "mlp":
    raise ConfigError("config.model.output_bias_init='data_mean' needs config.model.arch='mlp' "
                      "(the conv decoder's output bias is one per channel, not per pixel)")
  for key in ("model.hidden", "model.decoder_hidden", "model.conv_channels",
              "model.decoder_channels", "model.middle_hidden"):
    widths = m[key.split(".")[1]]
    if not all(isinstance(w, int) and w > 0 for w in widths):
      raise ConfigError(f"config.{key}={widths!r} must be a tuple of positive ints, e.g. (512,)")
  if m.arch == "mlp" and not m.hidden:
    raise ConfigError("config.model.hidden=() leaves the MLP with no hidden layer; give e.g. (512,)")
  if m.middle_dim < 0:
    raise ConfigError(f"config.model.middle_dim={m.middle_dim} must be >= 0 (0: one stochastic "
                      "layer)")
  if m.middle_dim and m.arch != "mlp":
    raise ConfigError(f"config.model.middle_dim={m.middle_dim} (a second stochastic layer) needs "
                      f"config.model.arch='mlp', not {m.arch!r}")
  if m.middle_hidden and not m.middle_dim:
    raise ConfigError(f"config.model.middle_hidden={m.middle_hidden!r} sizes the layers around a "
                      "middle latent, and config.model.middle_dim=0 has none; set middle_dim")
  if m.arch in ("conv", "conv_grid", "larsen") and not m.conv_channels:
    raise ConfigError(f"config.model.conv_channels=() gives the {m.arch} arch no layer; give e.g. "
                      "(32, 64)")
  if m.arch == "conv_grid":
    check_positive(m.latent_channels, "model.latent_channels")


def _validate_stabilizers(o: ml_collections.ConfigDict) -> None:
  if not 0 <= o.ema_decay < 1:
    raise ConfigError(f"config.optimizer.ema_decay={o.ema_decay} must be in [0, 1) (0 turns the "
                      "moving average off; VD-VAE uses 0.9999)")
  if o.skip_grad_norm < 0:
    raise ConfigError(f"config.optimizer.skip_grad_norm={o.skip_grad_norm} must be >= 0 (0 turns "
                      "it off)")
  if o.skip_grad_norm and o.skip_nonfinite != "grads":
    raise ConfigError(f"config.optimizer.skip_grad_norm={o.skip_grad_norm} skips steps by their "
                      f"gradient, which config.optimizer.skip_nonfinite={o.skip_nonfinite!r} "
                      "does not look at; set skip_nonfinite='grads'")


TOPDOWN_OBJECTIVES = ("elbo", "capacity")  # those that read only the ELBO's two terms


def _validate_topdown(c: ml_collections.ConfigDict) -> None:
  """The arch=topdown keys that can be checked before the image shape is known, and what it
  trains with: the one-draw ELBO objectives, a discrete likelihood (it is a density model)."""
  m, o = c.model, c.objective
  if o.kind not in TOPDOWN_OBJECTIVES or o.num_samples != 1 or o.free_bits:
    raise ConfigError(f"config.model.arch='topdown' trains with objective.kind in "
                      f"{TOPDOWN_OBJECTIVES}, num_samples=1 and free_bits=0 (one posterior draw "
                      f"through its groups), not kind={o.kind!r}, num_samples={o.num_samples}, "
                      f"free_bits={o.free_bits}")
  if m.likelihood not in distributions.DISCRETE_LIKELIHOODS:
    raise ConfigError(f"config.model.arch='topdown' needs a discrete likelihood, one of "
                      f"{distributions.DISCRETE_LIKELIHOODS}, not {m.likelihood!r}")
  for key in ("width", "latent_channels"):
    check_positive(m[key], f"model.{key}")
  if not 0 < m.bottleneck <= 1:
    raise ConfigError(f"config.model.bottleneck={m.bottleneck} must be in (0, 1] (VD-VAE: 0.25)")
  if m.compute_dtype != "float32" or m.middle_dim:
    raise ConfigError("config.model.arch='topdown' computes in float32 with its own hierarchy; "
                      "set model.compute_dtype='float32' and model.middle_dim=0")
  try:
    topdown.parse_up(m.blocks_up), topdown.parse_down(m.blocks_down)
  except ValueError as e:
    raise ConfigError(str(e)) from None


# Keys a resumed run may change: they steer how long it runs, what it logs and evaluates, and
# how it checkpoints, never the trajectory of the parameters. All other keys are frozen.
RESUMABLE_KEYS = ("num_epochs", "num_steps", "figures_every", "log", "eval", "checkpoint", "data.cache_dir",
                  "optimizer.max_consecutive_skips")
_ABSENT = "<absent>"


def flatten(d: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resume_changes(saved: dict, current: dict) -> tuple[dict, dict]:
  """Splits what differs between two configs (as JSON dicts) into (frozen, allowed).

  Each is {dotted key: (saved value, current value)}, with "<absent>" for a key that one
  side lacks; `allowed` holds the keys under RESUMABLE_KEYS. A key newer than the saved run
  is no change when it holds its default (code that adds a key defaults to the old behavior).
  """
  old, new = flatten(saved), flatten(current)
  defaults = flatten(json.loads(base_config().to_json_best_effort()))
  frozen, allowed = {}, {}
  for key in sorted(old.keys() | new.keys()):
    before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if before == _ABSENT and key in defaults and after == defaults[key]:
      continue
    if before != after:
      resumable = any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)
      (allowed if resumable else frozen)[key] = (before, after)
  return frozen, allowed
