"""Larsen et al. (2016)'s VAE-GAN (`objective.kind="vae_gan"`) and its two controls.

A step draws z ~ q(z|x) and z_p ~ N(0, I), decodes both in one pass (x~ and x_p, the
likelihood's means) and shows the discriminator D the batch [x; x~; x_p] once. With
Dis_l(x) the output of its conv number `feature_layer`, per example:

    L_prior = KL(q(z|x) || N(0, I))
    L_llike = 1/2 ||Dis_l(x~) - Dis_l(x)||^2            (a unit Gaussian on the features, nats
                                                         up to a constant)
    L_D     = -r log(D(x) + e) - (1 - r) mean_f log(1 - D(x_f) + e)    over the fakes x~, x_p
    L_G     = log(1 - D(x~) + e) + log(1 - D(x_p) + e)

each then averaged over the batch (r = real_weight, e = 1e-3). The networks get their own
gradients:

    encoder        <- L_prior + L_llike
    decoder        <- w L_llike + (1 - w) L_G                 (w = recon_weight)
    discriminator  <- L_D

so the GAN term never reaches the encoder and the feature reconstruction never the
discriminator. As in the authors' code the decoder ascends the discriminator's own loss on its
fakes (the minimax form) and the step is balanced: the discriminator is held back while its
cost on the reals or on the fakes (the mean -log terms above) is below equilibrium - margin,
the decoder while either is above equilibrium + margin, neither when both would be. A network
held back gets a zero gradient: under RMSProp its parameters stay put (its mean square decays
one step).

variant="vae": encoder and decoder <- -ELBO with the model's pixel likelihood, the control of
  the same architecture; the discriminator trains beside it and never touches it.
variant="gan": decoder <- L_G over prior samples only, D sees [x; x_p]; no encoder pass.

Both groups ("vae", the encoder and decoder; "discriminator") train with RMSProp as the authors'
(decay 0.9, epsilon outside the root) at a rate annealed per epoch as their GammaAnnealer:
lr(e) = lr_0 - (e / E)^gamma (lr_0 - lr_E) over the run's E epochs (`num_steps` / epoch
length when the run is set in steps). Their rates, 0.02 to 1e-5
divided by the batch size 64 (their losses are sums over the batch), are the defaults as rates
of batch means. Deviations from their code: one discriminator pass serves the features and the
GAN terms (they ran [x~; x] and [x; x~; x_p] separately, so batch statistics differ); no weight
decay (theirs 1e-5); q(z|x)'s scale is the model's soft-clamped log-scale, not a log-variance.
"""

import jax
import jax.numpy as jnp
import optax

from jaxvae import distributions, larsen, models
from jaxvae.errors import ConfigError
from jaxvae.objectives import base

VARIANTS = ("vae_gan", "vae", "gan")
DISCRIMINATOR = "discriminator"
LOG_EPS = 1e-3  # inside the authors' log(D + eps)


def balance(real_cost: jax.Array, fake_cost: jax.Array, equilibrium: float, margin: float
            ) -> tuple[jax.Array, jax.Array]:
  """(update the decoder, update the discriminator) bool[] from the discriminator's mean costs
  on the reals and on the fakes, as the authors' `GradientDescent.train_epoch`."""
  train_dis = ~((real_cost < equilibrium - margin) | (fake_cost < equilibrium - margin))
  train_dec = ~((real_cost > equilibrium + margin) | (fake_cost > equilibrium + margin))
  neither = ~(train_dis | train_dec)
  return train_dec | neither, train_dis | neither


def _vae_pass(vae: models.VAE, x: jax.Array, eps: jax.Array, z_prior: jax.Array):
  """The VAE's training pass: q(z|x) of x f32[B, ...], its draw with noise eps f32[B, K], and
  the decoder on [z; z_prior] -> (mean, log_scale, likelihood parameters f32[2B, ...])."""
  mean, log_scale = vae.encode(x)
  z = mean + jnp.exp(log_scale) * eps
  return mean, log_scale, vae.decode(jnp.concatenate([z, z_prior]))


def _log_d(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log(D + e), log(1 - D + e)) f32[N] of the discriminator's logits."""
  d = jax.nn.sigmoid(logits)
  return jnp.log(d + LOG_EPS), jnp.log(1.0 - d + LOG_EPS)


def _gate(grads, on: jax.Array):
  """The gradients, or zeros where the balance holds the network back."""
  return jax.tree.map(lambda g: jnp.where(on, g, 0.0), grads)


def _only(tree: dict, network: str) -> dict:
  """The gradient of the "vae" group with every network but `network` zeroed."""
  return {col: {name: (g if name == network else jax.tree.map(jnp.zeros_like, g))
                for name, g in sub.items()} if col == "params" else jax.tree.map(jnp.zeros_like, sub)
          for col, sub in tree.items()}


class VAEGAN(base.Objective):
  """A VAE whose reconstruction is scored in a discriminator's features (see the module).

  Its "loss" metric is the sum of the encoder's and the decoder's losses (the decoder's alone
  for variant "gan", -ELBO for "vae"); the discriminator's is `disc_loss`; `update_decoder`
  and `update_discriminator` are the share of steps the balance let through.
  """
  kind = "vae_gan"
  trains_batch_stats = True
  defaults = {
      "variant": "vae_gan",           # vae_gan | vae | gan (the two controls, see the module)
      "recon_weight": 5e-6,           # w: the decoder's weight of L_llike against L_G (CIFAR's)
      "real_weight": 0.66,            # r: the reals' share of the discriminator's loss
      "equilibrium": 0.68,            # the balance of the updates (see `balance`)
      "margin": 0.35,
      "disc_channels": (32, 128, 192, 256),
      "disc_hidden": 512,
      "feature_layer": 3,             # Dis_l: this conv's output before its batch norm
      "rmsprop_learning_rate": 0.02 / 64,
      "rmsprop_final_learning_rate": 1e-5 / 64,
      "rmsprop_gamma": 0.75,          # the annealing's exponent
  }

  @classmethod
  def check_keys(cls, o):
    base.check_nonnegative(o, "margin", "rmsprop_final_learning_rate")
    for key in ("recon_weight", "real_weight"):
      if not 0 <= o[key] <= 1:
        raise ConfigError(f"config.objective.{key}={o[key]} must be in [0, 1]")

  @classmethod
  def check(cls, config):
    o = config.objective
    if o.variant not in VARIANTS:
      raise ConfigError(f"config.objective.variant={o.variant!r} is not allowed; choose one of "
                        f"{VARIANTS}")
    if not 1 <= o.feature_layer <= len(o.disc_channels):
      raise ConfigError(f"config.objective.feature_layer={o.feature_layer} must name one of the "
                        f"{len(o.disc_channels)} convs of config.objective.disc_channels (1-based)")
    if config.model.arch != "larsen" or config.model.likelihood != "gaussian":
      raise ConfigError("objective.kind='vae_gan' trains Larsen et al.'s networks with a Gaussian "
                        "pixel likelihood: set config.model.arch='larsen' and "
                        "config.model.likelihood='gaussian' (see configs/cifar10_vae_gan.py)")
    if o.num_samples != 1 or o.warmup_steps or o.free_bits:
      raise ConfigError("objective.kind='vae_gan' draws one z per image without warm-up or free "
                        "bits: leave objective.num_samples=1, warmup_steps=0, free_bits=0")

  @property
  def discriminator(self) -> larsen.Discriminator:
    return larsen.Discriminator(tuple(self.cfg.disc_channels), self.cfg.disc_hidden,
                                self.cfg.feature_layer)

  def init(self, rng, image_shape):
    params = super().init(rng, image_shape)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    params[DISCRIMINATOR] = jax.jit(self.discriminator.init)(jax.random.fold_in(rng, 1), x)
    return params

  def optimizers(self, steps_per_epoch):
    o = self.cfg
    total = self.config.num_steps or self.config.num_epochs * steps_per_epoch

    def rate(count):  # per epoch, the share of the run's steps behind
      done = jnp.minimum(count // steps_per_epoch * steps_per_epoch / total, 1.0)
      return (o.rmsprop_learning_rate
              - done ** o.rmsprop_gamma * (o.rmsprop_learning_rate - o.rmsprop_final_learning_rate))

    tx = lambda: optax.rmsprop(rate, decay=0.9, eps=1e-8, eps_in_sqrt=False)
    return {base.VAE_GROUP: tx(), DISCRIMINATOR: tx()}

  def terms(self, vae_params, disc_params, x: jax.Array, eps: jax.Array, z_prior: jax.Array):
    """One training pass: the terms f32[] of the module's losses (and the metrics beside them)
    and the new batch statistics (of "vae", of the discriminator).

    x f32[B, H, W, C] in [0, 1]; eps, z_prior f32[B, K]: the reparameterization's noise and the
    prior draws. Keys: disc_loss, gen_loss, real_cost, fake_cost, d_real, d_sample; unless
    variant="gan" also kl, log_lik (nats, the pixel likelihood), llike, recon_mse, d_recon.
    """
    o, model, batch = self.cfg, self.model, x.shape[0]
    if o.variant == "gan":
      obs, vae_stats = model.apply(vae_params, z_prior, method="decode", mutable=["batch_stats"])
      t = {}
    else:
      (mean, log_scale, obs), vae_stats = model.apply(vae_params, x, eps, z_prior,
                                                      method=_vae_pass, mutable=["batch_stats"])
      recon = dict(obs, mean=obs["mean"][:batch])  # a Gaussian's scale is not per example
      t = {"kl": distributions.kl_standard_normal(mean, log_scale).mean(),
           "log_lik": distributions.log_likelihood(model.likelihood, x, recon).mean(),
           "recon_mse": jnp.mean((recon["mean"] - x) ** 2)}
    fakes = obs["mean"]
    if o.variant == "vae":  # the discriminator watches: nothing of it, a NaN included, flows back
      fakes = jax.lax.stop_gradient(fakes)
    (logits, feats), disc_stats = self.discriminator.apply(
        disc_params, jnp.concatenate([x, fakes]), mutable=["batch_stats"])
    log_d, log_1md = _log_d(logits)
    d = jax.nn.sigmoid(logits)
    t.update(real_cost=-log_d[:batch].mean(), fake_cost=-log_1md[batch:].mean(),
             gen_loss=log_1md[batch:].reshape(-1, batch).sum(axis=0).mean(),
             d_real=d[:batch].mean(), d_sample=d[-batch:].mean())
    t["disc_loss"] = o.real_weight * t["real_cost"] + (1 - o.real_weight) * t["fake_cost"]
    if o.variant != "gan":
      diff = (feats[batch:2 * batch] - feats[:batch]).reshape(batch, -1)
      t.update(llike=0.5 * jnp.sum(diff ** 2, axis=-1).mean(), d_recon=d[batch:2 * batch].mean())
    return t, (vae_stats, disc_stats)

  def gradients(self, params, rng, x, step):
    del step
    o = self.cfg
    eps_key, prior_key = jax.random.split(rng)
    shape = (x.shape[0], self.model.code_dim)
    eps, z_prior = jax.random.normal(eps_key, shape), jax.random.normal(prior_key, shape)
    t, pullback, (vae_stats, disc_stats) = jax.vjp(
        lambda v, d: self.terms(v, d, x, eps, z_prior), params[base.VAE_GROUP],
        params[DISCRIMINATOR], has_aux=True)

    def grad_of(weights: dict[str, float]):
      """(d/d "vae", d/d discriminator) of sum_k weights[k] * t[k]: one backward pass."""
      return pullback({k: jnp.asarray(weights.get(k, 0.0), v.dtype) for k, v in t.items()})

    if o.variant == "vae":
      train_dec = train_dis = jnp.ones((), bool)
      vae_value, vae_grads = t["kl"] - t["log_lik"], grad_of({"kl": 1.0, "log_lik": -1.0})[0]
    else:
      train_dec, train_dis = balance(t["real_cost"], t["fake_cost"], o.equilibrium, o.margin)
      w = o.recon_weight
      vae_value = (1 - w) * t["gen_loss"] + w * t.get("llike", 0.0)
      vae_grads = _gate(_only(grad_of({"llike": w, "gen_loss": 1 - w})[0], "decoder"), train_dec)
      if o.variant == "vae_gan":
        vae_value += t["kl"] + t["llike"]
        enc_grads = _only(grad_of({"kl": 1.0, "llike": 1.0})[0], "encoder")
        vae_grads = jax.tree.map(jnp.add, enc_grads, vae_grads)
    disc_grads = _gate(grad_of({"disc_loss": 1.0})[1], train_dis)
    metrics = {k: v for k, v in t.items() if k not in ("kl", "log_lik")}
    if o.variant != "gan":
      metrics.update(base.elbo_metrics(vae_value, t["log_lik"], t["kl"]))
    metrics.update(loss=vae_value, update_decoder=train_dec.astype(jnp.float32),
                   update_discriminator=train_dis.astype(jnp.float32))
    return base.StepGradients(
        {base.VAE_GROUP: vae_value, DISCRIMINATOR: t["disc_loss"]},
        {base.VAE_GROUP: vae_grads, DISCRIMINATOR: disc_grads}, metrics,
        {base.VAE_GROUP: vae_stats, DISCRIMINATOR: disc_stats})
