"""A hierarchical top-down VAE in the style of VD-VAE (Child 2021, "Very Deep VAEs Generalize
Autoregressive Models and Can Outperform Them on Images"): `config.model.arch="topdown"`.

Shapes: x f32[B, R, R, C] in [0, 1] (square, R a power of two); every latent group l is a grid
z_l f32[B, r_l, r_l, Z] at its block's resolution r_l; `width` channels W throughout.

Bottom-up (`BottomUp`): a 3x3 conv to W channels, then residual bottleneck blocks (`Block`),
given as `blocks_up` "32x3,32d2,16x2,..." ("r x n": n blocks at r x r; "r d k": one block then
k x k average pooling). The last activation at each resolution, a_r, feeds the top-down pass.

Top-down (`TopDown`): the state h starts at every resolution from a learned bias; each block
of `blocks_down` "1x1,4m1,4x2,8m4,..." ("r m s": first mix in the state at s, upsampled by
nearest neighbour) draws one latent group:

    q(z_l | x, z_<l) = N(mu_q, sigma_q) from Block(concat(h, a_r))
    p(z_l | z_<l)    = N(mu_p, sigma_p) and features f from Block(h);   h <- h + f
    h <- h + proj(z_l);   h <- Block(h)

The state at the image's resolution goes through a 1x1 conv to the likelihood's parameters.
The ELBO is E_q[log p(x|z)] - sum_l KL(q(z_l|x, z_<l) || p(z_l|z_<l)), each KL analytic given
the one posterior draw of z_<l above it (summed over the group's grid, f32[B] per group).

Initialization follows VD-VAE: each residual branch's last conv and the latent projection are
scaled by sqrt(1 / number of blocks), and the prior's last conv starts at zero, so every group
starts with p = N(0, I) and adds nothing to h.
"""

import re
from typing import Callable, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvae import distributions, models
from jaxvae.errors import ConfigError


class UpSpec(NamedTuple):
  res: int   # the block's input resolution
  down: int  # average pooling after it (1: none)


class DownSpec(NamedTuple):
  res: int    # the block's resolution
  mixin: int  # the resolution whose state is upsampled into h first (0: none)


def parse_up(spec: str) -> tuple[UpSpec, ...]:
  """"32x2,32d2,16x1" -> (UpSpec(32, 1), UpSpec(32, 1), UpSpec(32, 2), UpSpec(16, 1))."""
  return _parse(spec, "blocks_up", "d", UpSpec, plain=1)


def parse_down(spec: str) -> tuple[DownSpec, ...]:
  """"1x1,4m1,4x2" -> (DownSpec(1, 0), DownSpec(4, 1), DownSpec(4, 0), DownSpec(4, 0))."""
  return _parse(spec, "blocks_down", "m", DownSpec, plain=0)


def _parse(spec: str, key: str, op: str, block: type, plain: int) -> tuple:
  """"r x n" -> n blocks block(r, plain); "r <op> k" -> one block(r, k)."""
  out = []
  for part in _parts(spec, key, rf"(\d+)([x{op}])(\d+)"):
    res, kind, n = int(part[0]), part[1], int(part[2])
    out += [block(res, plain)] * n if kind == "x" else [block(res, n)]
  return tuple(out)


def _parts(spec: str, key: str, pattern: str) -> list[tuple[str, ...]]:
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  bad = [p for p in parts if not re.fullmatch(pattern, p)]
  if not parts or bad:
    example = "32x3,32d2,16x3,16d2,8x2" if key == "blocks_up" else "8x2,16m8,16x2,32m16,32x2"
    raise ValueError(f"config.model.{key}={spec!r} is not a block list like {example!r}"
                     + (f" (cannot read {bad})" if bad else ""))
  return [re.fullmatch(pattern, p).groups() for p in parts]


def spec_problem(up: str, down: str, image_shape: Sequence[int]) -> str | None:
  """Why the block lists cannot run on images of `image_shape`, or None."""
  try:
    ups, downs = parse_up(up), parse_down(down)
  except ValueError as e:
    return str(e)
  height, width = image_shape[:2]
  if height != width or height & (height - 1):
    return (f"config.model.arch='topdown' needs square images with a power-of-two side, not "
            f"{height}x{width}")
  res = height
  for block in ups:
    if block.res != res:
      return (f"config.model.blocks_up={up!r}: a block at {block.res} where the pooling so far "
              f"leaves {res}x{res}")
    if res % block.down:
      return f"config.model.blocks_up={up!r}: {res} does not divide by the pooling {block.down}"
    res //= block.down
  seen = {b.res // b.down for b in ups}  # where an activation is kept
  state = set()
  for block in downs:
    if block.res not in seen:
      return (f"config.model.blocks_down={down!r}: a block at {block.res}, where the bottom-up "
              f"pass has no activation (it has {sorted(seen)})")
    if block.mixin and (block.mixin not in state or block.res % block.mixin):
      return (f"config.model.blocks_down={down!r}: {block.res}m{block.mixin} mixes in a "
              "resolution that no earlier block has reached, or that does not divide it")
    state.add(block.res)
  if downs[-1].res != height:
    return (f"config.model.blocks_down={down!r} must end at the image's resolution {height}, "
            f"not {downs[-1].res}")
  return None


def _scaled(scale: float) -> Callable:
  """lecun_normal with its variance times `scale` (VD-VAE scales weights by sqrt(scale))."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Block(nn.Module):
  """VD-VAE's bottleneck block: GELU, 1x1 conv to `mid`, two 3x3 convs (1x1 at resolutions
  below 3), 1x1 conv to `out`; with `residual`, x + that. f32[B, r, r, *] -> f32[B, r, r, out].

  Every 1x1 conv is an `nn.Dense` on the channel axis, the same map: XLA:CPU runs a product
  as a matrix multiply, while its 1x1 convolutions (and their gradients) ran many times slower
  and took longer to compile."""
  mid: int
  out: int
  residual: bool = True
  last_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    spatial = x.shape[1] > 2
    inner = (lambda name: nn.Conv(self.mid, (3, 3), padding="SAME", name=name)) if spatial else (
        lambda name: nn.Dense(self.mid, name=name))
    h = nn.Dense(self.mid, name="reduce")(nn.gelu(x))
    h = inner("inner_a")(nn.gelu(h))
    h = inner("inner_b")(nn.gelu(h))
    h = nn.Dense(self.out, kernel_init=self.last_init, name="expand")(nn.gelu(h))
    return x + h if self.residual else h


class BottomUp(nn.Module):
  """x f32[B, R, R, C] in [0, 1] -> {r: a_r f32[B, r, r, W]}, the last activation at each
  resolution (after a block's pooling, as VD-VAE keeps them)."""
  has_convolutions: ClassVar[bool] = True
  blocks: tuple[UpSpec, ...]
  width: int
  mid: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.width, (3, 3), padding="SAME")(2.0 * x - 1.0)
    acts = {}
    scale = _scaled(1.0 / len(self.blocks))
    for spec in self.blocks:
      h = Block(self.mid, self.width, last_init=scale)(h)
      if spec.down > 1:
        h = nn.avg_pool(h, (spec.down, spec.down), (spec.down, spec.down))
      acts[h.shape[1]] = h
    return acts


class GroupStats(NamedTuple):
  """Per example, nats, f32[B]: the analytic KL(q || p) of a group given the draws above it,
  and log q(z_l) - log p(z_l) at its draw."""
  kl: jax.Array
  log_ratio: jax.Array


def _posterior_draw(post, key, at_mean: bool, p_mean, p_log_scale, bound: float):
  """q(z_l | x, z_<l) from the posterior block's output f32[B, r, r, 2Z], and the group's
  prior -> (z, GroupStats); z is q's mean with `at_mean`, else a draw keyed by `key`."""
  q_mean, q_log_scale = jnp.split(post, 2, axis=-1)
  q_log_scale = distributions.soft_clamp(q_log_scale, bound)
  if at_mean:
    z = q_mean
  else:
    z = q_mean + jnp.exp(q_log_scale) * jax.random.normal(key, q_mean.shape, q_mean.dtype)
  log_ratio = (distributions.diag_gaussian_log_prob_per_dim(z, q_mean, q_log_scale)
               - distributions.diag_gaussian_log_prob_per_dim(z, p_mean, p_log_scale))
  kl = distributions.kl_diag_gaussians(q_mean, q_log_scale, p_mean, p_log_scale)
  sums = distributions.sum_except_batch
  return z, GroupStats(sums(kl), sums(log_ratio))


class DecBlock(nn.Module):
  """One latent group of the top-down pass: (h, a_r or None, key) -> (h, GroupStats).

  `mode`: "posterior" draws z ~ q, "mean" takes z = mu_q, "prior" draws z ~ p with its scale
  times `temperature` (a_r unused; the stats are zeros)."""
  width: int
  mid: int
  zdim: int
  num_blocks: int
  log_scale_bound: float

  @nn.compact
  def __call__(self, h, a, key, mode: str, temperature: float = 1.0):
    prior = Block(self.mid, 2 * self.zdim + self.width, residual=False,
                  last_init=nn.initializers.zeros, name="prior")(h)
    p_mean, p_log_scale, features = jnp.split(prior, [self.zdim, 2 * self.zdim], axis=-1)
    p_log_scale = distributions.soft_clamp(p_log_scale, self.log_scale_bound)
    if mode == "prior":
      eps = jax.random.normal(key, p_mean.shape, p_mean.dtype)
      z = p_mean + temperature * jnp.exp(p_log_scale) * eps
      stats = GroupStats(*(jnp.zeros(h.shape[:1], h.dtype),) * 2)
    else:
      post = Block(self.mid, 2 * self.zdim, residual=False, name="posterior")(
          jnp.concatenate([h, a], axis=-1))
      z, stats = _posterior_draw(post, key, mode == "mean", p_mean, p_log_scale,
                                 self.log_scale_bound)
    h = h + features + nn.Dense(self.width, kernel_init=_scaled(1.0 / self.num_blocks),
                                name="z_proj")(z)
    h = Block(self.mid, self.width, last_init=_scaled(1.0 / self.num_blocks), name="resnet")(h)
    return h, stats


class TopDown(nn.Module):
  """The top-down pass: (acts {r: a_r} or None, key, batch) -> (the likelihood head's input
  f32[B, R, R, out_channels], GroupStats with f32[B, G] fields, G groups in `blocks` order)."""
  has_convolutions: ClassVar[bool] = True
  blocks: tuple[DownSpec, ...]
  width: int
  mid: int
  zdim: int
  out_channels: int
  log_scale_bound: float

  @nn.compact
  def __call__(self, acts, key, batch: int, mode: str = "posterior", temperature: float = 1.0):
    states = {}
    keys = jax.random.split(key, len(self.blocks))
    kls, ratios = [], []
    for i, spec in enumerate(self.blocks):
      if spec.res not in states:
        bias = self.param(f"bias_{spec.res}", nn.initializers.zeros,
                          (1, spec.res, spec.res, self.width))
        states[spec.res] = jnp.broadcast_to(bias, (batch,) + bias.shape[1:])
      h = states[spec.res]
      if spec.mixin:
        factor = spec.res // spec.mixin
        h = h + jnp.repeat(jnp.repeat(states[spec.mixin], factor, axis=1), factor, axis=2)
      a = None if acts is None else acts[spec.res]
      h, stats = DecBlock(self.width, self.mid, self.zdim, len(self.blocks), self.log_scale_bound,
                          name=f"group_{i}")(h, a, keys[i], mode, temperature)
      states[spec.res] = h
      kls.append(stats.kl)
      ratios.append(stats.log_ratio)
    out = nn.Dense(self.out_channels, name="out")(states[self.blocks[-1].res])
    return out, GroupStats(jnp.stack(kls, axis=-1), jnp.stack(ratios, axis=-1))


class TopDownVAE(models.VAE):
  """A VAE whose latents are grids in a top-down hierarchy (see the module docstring).

  `encoder` is a `BottomUp`, `decoder` a `TopDown`; the likelihood head is the `VAE`'s. It has
  no single code with prior N(0, I): `encode`, `decode`, the latent walks and the factor
  metrics do not apply; the objectives and evaluation call `terms`, `reconstruct`,
  `log_weight` and `sample` (names for `model.apply(..., method=...)`).
  """
  top_down: ClassVar[bool] = True

  @property
  def num_groups(self) -> int:
    return len(self.decoder.blocks)

  @property
  def code_dim(self) -> int:
    raise TypeError("a top-down VAE has no single code with prior N(0, I); draw samples with "
                    "its `sample` method")

  def _pass(self, x, key, mode):
    obs_raw, stats = self.decoder(self.encoder(x), key, x.shape[0], mode)
    return self.likelihood_params(obs_raw), stats

  def terms(self, x, key):
    """One posterior draw through every group: {"log_lik", "kl" f32[B], "kl_groups" f32[B, G],
    "log_ratio" f32[B] (log q(z|x) - log p(z) at the draw), "obs" (likelihood parameters)}."""
    obs, stats = self._pass(x, key, "posterior")
    return {"log_lik": distributions.log_likelihood(self.likelihood, x, obs),
            "kl": stats.kl.sum(axis=-1), "kl_groups": stats.kl,
            "log_ratio": stats.log_ratio.sum(axis=-1), "obs": obs}

  def reconstruct(self, x):
    """Likelihood parameters of x decoded along the posterior means of every group."""
    return self._pass(x, jax.random.key(0), "mean")[0]  # the key is not drawn from

  def log_weight(self, x, key):
    """log p(x, z) - log q(z|x) at one posterior draw z: f32[B] nats (its exp is unbiased for
    p(x))."""
    t = self.terms(x, key)
    return t["log_lik"] - t["log_ratio"]

  def sample(self, key, num: int, temperature: float = 1.0):
    """Likelihood parameters of `num` draws from the prior, each group's scale times
    `temperature` (VD-VAE's low-temperature samples)."""
    obs_raw, _ = self.decoder(None, key, num, "prior", temperature)
    return self.likelihood_params(obs_raw)

  def __call__(self, x):
    """Every parameter is created by one posterior pass (used by `init`)."""
    return self.terms(x, jax.random.key(0))


@models.register_architecture("topdown")
def _topdown(model_cfg, image_shape, pixel_mean, out_channels) -> models.Parts:
  del pixel_mean
  problem = spec_problem(model_cfg.blocks_up, model_cfg.blocks_down, image_shape)
  if problem:
    raise ConfigError(problem)
  width = model_cfg.width
  mid = max(1, round(width * model_cfg.bottleneck))
  encoder = BottomUp(parse_up(model_cfg.blocks_up), width, mid)
  decoder = TopDown(parse_down(model_cfg.blocks_down), width, mid, model_cfg.latent_channels,
                    out_channels, model_cfg.log_scale_bound)
  return models.Parts(encoder, decoder, TopDownVAE)
