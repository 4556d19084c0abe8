"""Config keys, their defaults, and the checks every run makes before any compute.

`configs/*.py` start from `base_config()` and set what their experiment needs. Unknown keys
and wrong types in `--config.key=value` overrides are refused by ml_collections itself
(ConfigDicts here are locked and type-safe); `validate` then checks values and combinations.
"""

import json

import ml_collections

from jaxvae import data, distributions, loops, models


SKIP_NONFINITE = ("grads", "loss", "off")


class ConfigError(ValueError):
  """A config value that cannot run; the message names the key and the allowed values."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 10                # epochs to reach; a resumed run continues up to this
  c.batch_size = 32                # global batch, split over devices
  c.loop_mode = "auto"             # auto | scan | per_step: train steps and test batches in a
                                   # compiled loop (scan) or one compiled call each (per_step);
                                   # auto: per_step for a conv model on CPU, whose convolutions
                                   # run 10-20x slower in a loop (see jaxvae/loops.py). Frozen
                                   # on resume: the modes agree only up to float rounding

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"           # tfds | folder | digits
  c.data.name = "cifar10"          # the TFDS name (source=tfds)
  c.data.path = ""                 # folder or .tar.gz (source=folder); TFDS data_dir (tfds)
  c.data.cache_dir = ""            # decoded-folder cache; default ~/.cache/jaxvae
  c.data.binarize = "none"         # none | threshold | dynamic (Bernoulli draw per batch)

  c.model = ml_collections.ConfigDict()
  c.model.arch = "mlp"             # mlp | conv
  c.model.hidden = (512,)          # dense widths; the decoder mirrors them
  c.model.conv_channels = (32, 64)  # conv arch: channels of the stride-2 layers
  c.model.latent_dim = 256
  c.model.activation = "gelu"
  c.model.likelihood = "gaussian"  # gaussian | bernoulli | discretized_logistic
  c.model.obs_scale = "fixed"      # gaussian: fixed | learned_global | learned_pixel
  c.model.obs_sigma = 0.5 ** 0.5   # gaussian, fixed: sigma of p(x|z)
  c.model.decoder_mean = "sigmoid"  # gaussian: sigmoid (paper) | identity
  c.model.log_scale_bound = 7.0    # every log-scale is soft-clamped to (-bound, bound)
  c.model.compute_dtype = "float32"  # float32 | bfloat16: the layers' products (float32 sums);
                                     # parameters, activations, Adam and the loss stay float32

  c.objective = ml_collections.ConfigDict()
  c.objective.beta = 1.0           # KL weight in the loss; reported ELBOs always use 1
  c.objective.num_samples = 1      # L, Monte Carlo draws of z per example

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 turns it off
  c.optimizer.max_consecutive_skips = 20  # non-finite steps are skipped; this many in a row stop
  c.optimizer.skip_nonfinite = "grads"  # which steps are skipped: grads (a non-finite loss or
                                        # any non-finite gradient) | loss (a non-finite loss
                                        # only; faster) | off (none: a non-finite loss stops
                                        # the run; fastest)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1000         # test-split batch; the split is padded, never truncated
  c.eval.iw_samples = 1000         # K of the IWAE bound in `python -m jaxvae.evaluate`
  c.eval.iw_batch_size = 10        # IWAE: images per step; iw_batch_size * iw_chunk decoded at once
  c.eval.iw_chunk = 100            # IWAE: importance samples drawn per decoder call

  c.log = ml_collections.ConfigDict()
  c.log.chunks_per_epoch = 10      # compiled calls per epoch; the progress bar moves between
  c.log.progress = True            # progress bar on stderr when it is a terminal

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1    # also saved at the end of the run
  c.checkpoint.keep = 3            # the latest N, plus the best by test ELBO

  c.figures_every = 0              # also draw figures every N epochs (0: at the end only)
  return c


def _choice(value, allowed, key):
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} is not allowed; choose one of {tuple(allowed)}")


def _positive(value, key, number=int):
  if not isinstance(value, number) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"config.{key}={value!r} must be a positive {number.__name__}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first key whose value cannot run."""
  for key in ("num_epochs", "batch_size", "model.latent_dim", "objective.num_samples",
              "eval.batch_size", "eval.iw_samples", "eval.iw_batch_size", "eval.iw_chunk",
              "log.chunks_per_epoch", "checkpoint.every_epochs",
              "checkpoint.keep", "optimizer.max_consecutive_skips"):
    value = c
    for part in key.split("."):
      value = value[part]
    _positive(value, key)
  if c.figures_every < 0:
    raise ConfigError(f"config.figures_every={c.figures_every} must be >= 0")
  _choice(c.loop_mode, loops.LOOP_MODES, "loop_mode")
  _choice(c.data.source, data.SOURCES, "data.source")
  _choice(c.data.binarize, data.BINARIZATIONS, "data.binarize")
  _choice(c.model.arch, models.ARCHITECTURES, "model.arch")
  _choice(c.model.activation, tuple(models.ACTIVATIONS), "model.activation")
  _choice(c.model.likelihood, distributions.LIKELIHOODS, "model.likelihood")
  _choice(c.model.obs_scale, models.OBS_SCALES, "model.obs_scale")
  _choice(c.model.decoder_mean, models.DECODER_MEANS, "model.decoder_mean")
  _choice(c.model.compute_dtype, models.COMPUTE_DTYPES, "model.compute_dtype")
  _choice(c.optimizer.skip_nonfinite, SKIP_NONFINITE, "optimizer.skip_nonfinite")
  for key in ("model.hidden", "model.conv_channels"):
    widths = c.model[key.split(".")[1]]
    if not all(isinstance(w, int) and w > 0 for w in widths):
      raise ConfigError(f"config.{key}={widths!r} must be a tuple of positive ints, e.g. (512,)")
  if c.model.arch == "mlp" and not c.model.hidden:
    raise ConfigError("config.model.hidden=() leaves the MLP with no hidden layer; give e.g. (512,)")
  if c.model.arch == "conv" and not c.model.conv_channels:
    raise ConfigError("config.model.conv_channels=() gives the conv arch no layer; give e.g. (32, 64)")
  for key, value in (("model.obs_sigma", c.model.obs_sigma),
                     ("model.log_scale_bound", c.model.log_scale_bound),
                     ("optimizer.learning_rate", c.optimizer.learning_rate)):
    _positive(value, key, float)
  if c.objective.beta < 0:
    raise ConfigError(f"config.objective.beta={c.objective.beta} must be >= 0")
  if c.optimizer.grad_clip_norm < 0:
    raise ConfigError(f"config.optimizer.grad_clip_norm={c.optimizer.grad_clip_norm} must be >= 0 "
                      "(0 turns clipping off)")
  if c.data.source == "folder" and not c.data.path:
    raise ConfigError("config.data.source='folder' needs config.data.path (a folder laid out "
                      "split/class/*.png, or a .tar.gz of one)")


# Keys a resumed run may change: they steer how long it runs, what it logs and evaluates, and
# how it checkpoints, never the trajectory of the parameters. All other keys are frozen.
RESUMABLE_KEYS = ("num_epochs", "figures_every", "log", "eval", "checkpoint", "data.cache_dir",
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
