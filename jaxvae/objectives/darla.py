"""DARLA's vision stage (Higgins et al. 2017): a denoising autoencoder, then the beta-VAE_DAE.

  dae           -log p(x | z = mu(occlude(x))): the model's encoder (its posterior mean as a
                deterministic code) and decoder trained as an autoencoder of occluded images,
                scored against the clean image under the model's likelihood
  beta_vae_dae  E_q ||J(x^) - J(x)||^2 + beta KL, J the features of a trained DAE (frozen) at
                `objective.dae_layer`, x^ the mean of p(x|z). NOT an ELBO: the metrics report
                the plain ELBO of the same model beside it (`elbo_nats`), and the feature
                term as `dae_feature_sqerr` (squared feature units per image, not nats)

The DAE is the model of an ordinary run (`objective.kind=dae`, any arch), not a network of its
own: it trains, checkpoints and draws its figures as every run does, and on this CPU the sprites
MLP avoids convolutions, which run 20-50x slower inside compiled loops (jaxvae/loops.py).
`beta_vae_dae` rebuilds that model from the DAE run's config.json, so its architecture may differ
from the VAE's, and holds its parameters (from the run's latest checkpoint) as the group "dae",
which has no optimizer: frozen, checkpointed with the VAE.
"""

import copy
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import checkpoint, distributions, models
from jaxvae.elbo import elbo_terms
from jaxvae.errors import ConfigError
from jaxvae.objectives import base
from jaxvae.state import VAE_GROUP

DAE_GROUP = "dae"
HEADS = ("mean", "log_scale")  # encoder layers read as they are; the others after the activation


def occlude(rng: jax.Array, x: jax.Array) -> jax.Array:
  """DARLA's occlusion noise: one axis-aligned rectangle of each image set to 0.

  x f32[B, H, W, C] -> f32[B, H, W, C]. The rectangle's two corners are drawn uniformly and
  independently (each row on 0..H, each column on 0..W); it spans rows [min, max) and columns
  [min, max), so it may be empty, and covers 1/9 of the image on average.
  """
  batch, height, width = x.shape[:3]
  row_key, col_key = jax.random.split(rng)
  rows = jax.random.randint(row_key, (batch, 2), 0, height + 1)
  cols = jax.random.randint(col_key, (batch, 2), 0, width + 1)

  def inside(ends, size):  # int[B, 2] -> bool[B, size]
    at = jnp.arange(size)[None, :]
    return (at >= ends.min(axis=1, keepdims=True)) & (at < ends.max(axis=1, keepdims=True))

  hole = inside(rows, height)[:, :, None] & inside(cols, width)[:, None, :]
  return jnp.where(hole[..., None], 0.0, x)


def _no_kl_keys(config, kind: str) -> None:
  o = config.objective
  for key in ("warmup_steps", "free_bits"):
    if o[key]:
      raise ConfigError(f"config.objective.{key}={o[key]} is not used by objective.kind={kind!r}; "
                        "set it to 0")
  base.check_one_layer(config, f"objective.kind={kind!r}")


class DAE(base.Objective):
  """-log p(x | mu(occlude(x))), mean over the batch: a deterministic denoising autoencoder."""
  kind = "dae"

  @classmethod
  def check(cls, config):
    _no_kl_keys(config, cls.kind)
    if config.objective.num_samples != 1:
      raise ConfigError(f"config.objective.num_samples={config.objective.num_samples}: the DAE "
                        "draws no z; set it to 1")

  def loss(self, params, rng, x, step):
    del step
    mean, _ = self.model.apply(params, occlude(rng, x), method="encode")
    obs = self.model.apply(params, mean, method="decode")
    log_lik = distributions.log_likelihood(self.model.likelihood, x, obs).mean()
    return -log_lik, {"loss": -log_lik, "dae_log_lik_nats": log_lik}


class FrozenDAE(NamedTuple):
  """A trained DAE's model, the encoder layer J reads, and its parameters (numpy)."""
  model: models.VAE
  layer: str
  params: Any

  def features(self, params, x: jax.Array) -> jax.Array:
    """J(x): x f32[B, H, W, C] -> the encoder layer's output f32[B, D] (after the model's
    activation, except for the heads `HEADS`)."""
    path = ("encoder", self.layer)
    _, state = self.model.apply(
        params, x, method="encode",
        capture_intermediates=lambda m, name: name == "__call__" and m.scope.path == path)
    h = state["intermediates"]["encoder"][self.layer]["__call__"][0].astype(jnp.float32)
    if self.layer not in HEADS:
      h = self.model.encoder.activation(h)
    return h.reshape(h.shape[0], -1)


def encoder_layers(model: models.VAE, image_shape) -> list[str]:
  """The names of the encoder's layers (its direct submodules), sorted."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  def run(params):
    return model.apply(params, x, method="encode", capture_intermediates=True)[1]

  params = jax.eval_shape(lambda k: models.init_params(model, k, image_shape), jax.random.key(0))
  found = jax.eval_shape(run, params)["intermediates"]["encoder"]
  return sorted(name for name in found if name != "__call__")


def load_dae(workdir: str, layer: str, model_cfg, image_shape) -> FrozenDAE:
  """The DAE trained in `workdir` (objective.kind='dae'): its model rebuilt from its config.json
  (laid over `model_cfg`, today's keys), its latest checkpoint's parameters, and `layer`.
  Raises ConfigError when the run is missing, is not a DAE, or does not fit `image_shape`."""
  saved = _dae_config(workdir)
  cfg = copy.deepcopy(model_cfg)
  for key, value in saved["model"].items():
    if key in cfg:
      cfg[key] = tuple(value) if isinstance(value, list) else value
  dae = models.make_model(cfg, image_shape, np.zeros(image_shape, np.float32))
  want = jax.eval_shape(lambda k: models.init_params(dae, k, image_shape), jax.random.key(0))
  params = checkpoint.read_group(workdir, VAE_GROUP)
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  if shapes(params) != shapes(want):
    raise ConfigError(f"config.objective.dae_workdir={workdir!r}: its checkpoint's parameters do "
                      f"not fit the model of its config.json for images {tuple(image_shape)} "
                      "(another image size or architecture); train the DAE on this data")
  layers = encoder_layers(dae, image_shape)
  if layer not in layers:
    raise ConfigError(f"config.objective.dae_layer={layer!r} is not a layer of the DAE's encoder; "
                      f"choose one of {layers}")
  return FrozenDAE(dae, layer, params)


def _dae_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.exists(path):
    raise ConfigError(f"config.objective.dae_workdir={workdir!r} holds no config.json; train a "
                      "DAE first (objective.kind='dae', e.g. configs/sprites_darla.py:dae) and "
                      "give its --workdir")
  with open(path) as f:
    saved = json.load(f)
  if saved["objective"]["kind"] != "dae":
    raise ConfigError(f"config.objective.dae_workdir={workdir!r} is a run of objective.kind="
                      f"{saved['objective']['kind']!r}, not 'dae'; give the workdir of a DAE run")
  return saved


class BetaVAEDAE(base.Objective):
  """E_q ||J(x^) - J(x)||^2 + beta KL (DARLA's beta-VAE_DAE; not an ELBO), beta after warm-up."""
  kind = "beta_vae_dae"
  reads_beta = True
  defaults = {
      "dae_workdir": "",       # beta_vae_dae: the workdir of a trained objective.kind='dae' run
      "dae_layer": "Dense_1",  # beta_vae_dae: the DAE encoder's layer J reads (the mlp arch:
                               # Dense_0, Dense_1, ... hidden, then the head "mean")
  }

  @classmethod
  def check(cls, config):
    if config.objective.free_bits:
      raise ConfigError(f"config.objective.free_bits={config.objective.free_bits} is not used by "
                        "objective.kind='beta_vae_dae'; set it to 0")
    base.check_one_layer(config, "objective.kind='beta_vae_dae'")
    _dae_config(config.objective.dae_workdir)

  def __init__(self, config, model, dataset_size=None):
    super().__init__(config, model, dataset_size)
    self.dae = load_dae(self.cfg.dae_workdir, self.cfg.dae_layer, config.model, model.image_shape)

  def init(self, rng, image_shape):
    params = super().init(rng, image_shape)
    params[DAE_GROUP] = jax.tree.map(jnp.asarray, self.dae.params)
    return params

  def gradients(self, params, rng, x, step):
    dae_params = params[DAE_GROUP]
    target = jax.lax.stop_gradient(self.dae.features(dae_params, x))  # f32[B, D]
    beta = self.weight(self.cfg.beta, step)

    def loss(vae_params):
      t = elbo_terms(vae_params, rng, x, model=self.model, num_samples=self.cfg.num_samples)
      recon = distributions.likelihood_mean(self.model.likelihood, t["obs"])  # [L * B, ...]
      feats = self.dae.features(dae_params, recon).reshape(-1, *target.shape)
      sqerr = jnp.sum((feats - target) ** 2, axis=-1).mean()
      log_lik, kl = t["log_lik"].mean(), t["kl"].mean()
      value = sqerr + beta * kl
      return value, dict(base.elbo_metrics(value, log_lik, kl), dae_feature_sqerr=sqerr,
                         beta=jnp.asarray(beta, jnp.float32))

    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params[VAE_GROUP])
    return base.StepGradients({VAE_GROUP: value}, {VAE_GROUP: grads}, metrics)
