"""Flax linen encoders, decoders and the VAE that ties them to a likelihood.

Shapes: x f32[B, H, W, C] in [0, 1]; z f32[B, K]. Models know nothing of training.
"""

import functools
import math
from typing import Callable, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import distributions
from jaxvae.errors import ConfigError

ACTIVATIONS: dict[str, Callable] = {
    "gelu": nn.gelu, "relu": nn.relu, "elu": nn.elu, "silu": nn.silu, "tanh": jnp.tanh,
}
OBS_SCALES = ("fixed", "learned_global", "learned_pixel")
DECODER_MEANS = ("sigmoid", "identity")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Every dense and conv kernel; biases start at zero (but see OUTPUT_BIAS_INITS).
KERNEL_INITS: dict[str, Callable] = {
    "lecun_normal": nn.initializers.lecun_normal(),  # flax's default
    "glorot_uniform": nn.initializers.glorot_uniform(),  # U(+-sqrt(6 / (fan_in + fan_out)))
}
# The MLP decoder's output bias: zeros, or the output that decodes to the training split's
# mean image (`output_bias`), as Burda et al.'s code starts its Bernoulli decoder.
OUTPUT_BIAS_INITS = ("zeros", "data_mean")
MEAN_CLIP = 1e-3  # that code clips the mean into [0.001, 0.999] before its logit


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_product(x, kernel, dimension_numbers):
  """x f32[..., I] @ kernel f32[I, O] -> f32[..., O] from bfloat16 inputs, float32 sums."""
  return jax.lax.dot_general(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                             dimension_numbers, preferred_element_type=jnp.float32)


def _bf16_product_fwd(x, kernel, dimension_numbers):
  # With symbolic zeros, x.perturbed says whether anything asks for the gradient of x (not
  # so for the data entering the first layer), so that product is never formed.
  x16, k16 = x.value.astype(jnp.bfloat16), kernel.value.astype(jnp.bfloat16)
  out = jax.lax.dot_general(x16, k16, dimension_numbers, preferred_element_type=jnp.float32)
  return out, (x16, k16 if x.perturbed else None)


def _bf16_product_bwd(dimension_numbers, residuals, g):
  # Both backward products in bfloat16 too (autodiff alone would multiply the float32
  # cotangent by an upcast operand, in float32); the gradients come out float32.
  x16, k16 = residuals
  g16 = g.astype(jnp.bfloat16)
  dx = None if k16 is None else jax.lax.dot_general(
      g16, k16, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dk = jax.lax.dot_general(x16.reshape(-1, x16.shape[-1]), g16.reshape(-1, g16.shape[-1]),
                           (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx, dk


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd, symbolic_zeros=True)


def _bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's product (lhs [..., I] by rhs [I, O]) in bfloat16; see `_bf16_product`."""
  del precision, preferred_element_type  # bfloat16 inputs, float32 sums, whatever is asked
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
    raise ValueError(f"bfloat16 products support nn.Dense's contraction only, not "
                     f"{dimension_numbers} of {lhs.shape} by {rhs.shape}")
  return _bf16_product(lhs, rhs, dimension_numbers)


def _layer(cls, dtype, kernel_init):
  """nn.Dense, nn.Conv or nn.ConvTranspose with `kernel_init`, computing in `dtype`: float32,
  or bfloat16 products that sum in float32 (parameters and the activations between layers stay
  float32). Dense products are bfloat16 forward and backward; (transposed) convolutions forward
  only."""
  if dtype == jnp.float32:
    return functools.partial(cls, kernel_init=kernel_init)
  if cls is nn.Dense:
    return functools.partial(nn.Dense, kernel_init=kernel_init, dot_general=_bf16_dot_general)
  if cls is nn.ConvTranspose:
    return functools.partial(cls, kernel_init=kernel_init, dtype=dtype,
                             preferred_element_type=jnp.float32)
  return functools.partial(cls, kernel_init=kernel_init, dtype=dtype,
                           conv_general_dilated=functools.partial(
                               jax.lax.conv_general_dilated, preferred_element_type=jnp.float32))


class MLPEncoder(nn.Module):
  """x f32[B, H, W, C] -> (mean, raw log-scale) f32[B, K]; the paper's Table 1 encoder."""
  has_convolutions: ClassVar[bool] = False
  hidden: Sequence[int]
  latent_dim: int
  activation: Callable = nn.gelu
  dtype: jnp.dtype = jnp.float32  # of the layers' products (see `_layer`)
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]

  @nn.compact
  def __call__(self, x):
    dense = _layer(nn.Dense, self.dtype, self.kernel_init)
    h = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      h = self.activation(dense(width)(h))
    return dense(self.latent_dim, name="mean")(h), dense(self.latent_dim, name="log_scale")(h)


class MLPDecoder(nn.Module):
  """z f32[B, K] -> f32[B, H, W, out_channels] raw decoder outputs.

  `output_bias_init` initializes the output layer's bias f32[H * W * out_channels].
  """
  has_convolutions: ClassVar[bool] = False
  hidden: Sequence[int]
  image_shape: Sequence[int]
  out_channels: int = 1
  activation: Callable = nn.gelu
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]
  output_bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, z):
    dense = _layer(nn.Dense, self.dtype, self.kernel_init)
    h = z
    for width in reversed(self.hidden):
      h = self.activation(dense(width)(h))
    height, width, _ = self.image_shape
    out = dense(height * width * self.out_channels, bias_init=self.output_bias_init)(h)
    return out.reshape(z.shape[0], height, width, self.out_channels)


def _downsampled_sizes(size: int, levels: int) -> list[int]:
  """Spatial sizes after each stride-2 SAME conv: 28 -> [28, 14, 7]; 7 -> [7, 4, 2]."""
  sizes = [size]
  for _ in range(levels):
    sizes.append(math.ceil(sizes[-1] / 2))
  return sizes


class ConvEncoder(nn.Module):
  """Stride-2 SAME convolutions down, then dense layers to the two heads. Any H x W x C.
  x f32[B, H, W, C] -> (mean, raw log-scale) f32[B, K]."""
  has_convolutions: ClassVar[bool] = True
  channels: Sequence[int]
  hidden: Sequence[int]
  latent_dim: int
  activation: Callable = nn.gelu
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]
  kernel_sizes: Sequence[int] = ()  # each conv's kernel side; () is 4 for every one

  @nn.compact
  def __call__(self, x):
    dense = _layer(nn.Dense, self.dtype, self.kernel_init)
    h = _downsample_convs(x, self.channels, self.kernel_sizes, self.activation,
                          _layer(nn.Conv, self.dtype, self.kernel_init))
    h = h.reshape(h.shape[0], -1)
    for width in self.hidden:
      h = self.activation(dense(width)(h))
    return dense(self.latent_dim, name="mean")(h), dense(self.latent_dim, name="log_scale")(h)


def _downsample_convs(h, channels, kernel_sizes, activation, conv):
  """The conv encoders' way down, inside their compact call: a stride-2 SAME conv (k x k, 4 where
  `kernel_sizes` is empty) and the activation per entry of `channels`."""
  for ch, k in zip(channels, kernel_sizes or (4,) * len(channels)):
    h = activation(conv(ch, (k, k), strides=(2, 2), padding="SAME")(h))
  return h


def nearest_upsample(h: jax.Array, size: int, axis: int) -> jax.Array:
  """Half-pixel nearest-neighbour upsampling of one axis from m to `size` (m <= size <= 2m):
  output i copies input floor((i + 1/2) m / size). f32[..., m, ...] -> f32[..., size, ...].

  That is `jax.image.resize(..., "nearest")`, built from a 2x repeat and static slices instead
  of a gather: a gather's gradient is a scatter-add, and on XLA:CPU those (with the layout
  copies around them) made the CIFAR-10 conv step 1.4x slower; a repeat's gradient is a
  reshape and a sum. The source index is exact integer arithmetic: resize's float32 formula
  can round an exact tie down (on CPU, 22 -> 41 at i = 21), which this never does.
  """
  m = h.shape[axis]
  if not m <= size <= 2 * m:
    raise ValueError(f"nearest_upsample goes from {m} to between {m} and {2 * m}, not {size}")
  src = (2 * np.arange(size) + 1) * m // (2 * size)
  # Its position in the 2x repeat: the first copy of a source, or the second for a repeat.
  kept = 2 * src + np.concatenate([[0], src[1:] == src[:-1]])
  rep = jnp.repeat(h, 2, axis=axis)
  if size == 2 * m:
    return rep
  starts = np.flatnonzero(np.diff(kept, prepend=-2) != 1)  # runs of consecutive positions
  ends = np.append(starts[1:], size)
  return jnp.concatenate([jax.lax.slice_in_dim(rep, kept[a], kept[b - 1] + 1, axis=axis)
                          for a, b in zip(starts, ends)], axis=axis)


class ConvDecoder(nn.Module):
  """Dense to a small feature map, then nearest upsampling and 3x3 convs up to exactly H x W.

  Upsampling to the encoder's own sizes (rather than transposed convs) reaches any H, W,
  odd ones included, without checkerboard artefacts.
  """
  has_convolutions: ClassVar[bool] = True
  channels: Sequence[int]
  hidden: Sequence[int]
  image_shape: Sequence[int]
  out_channels: int = 1
  activation: Callable = nn.gelu
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]

  @nn.compact
  def __call__(self, z):
    dense = _layer(nn.Dense, self.dtype, self.kernel_init)
    height, width, _ = self.image_shape
    hs = _downsampled_sizes(height, len(self.channels))
    ws = _downsampled_sizes(width, len(self.channels))
    h = z
    for w in reversed(self.hidden):
      h = self.activation(dense(w)(h))
    top = self.channels[-1]
    h = self.activation(dense(hs[-1] * ws[-1] * top)(h)).reshape(z.shape[0], hs[-1], ws[-1], top)
    return _upsample_convs(h, self.channels, hs, ws, self.out_channels, self.activation,
                           _layer(nn.Conv, self.dtype, self.kernel_init))


def _upsample_convs(h, channels, hs, ws, out_channels, activation, conv):
  """The conv decoders' way up, inside their compact call: at each level from the top, nearest
  upsampling to (hs[i], ws[i]) and a 3x3 conv to the channels below (`out_channels` last).
  f32[B, hs[-1], ws[-1], channels[-1]] -> f32[B, hs[0], ws[0], out_channels]."""
  for i in reversed(range(len(channels))):
    h = nearest_upsample(nearest_upsample(h, hs[i], axis=1), ws[i], axis=2)
    h = conv(out_channels if i == 0 else channels[i - 1], (3, 3), padding="SAME")(h)
    if i > 0:
      h = activation(h)
  return h


class ConvGridEncoder(nn.Module):
  """A code with spatial extent: stride-2 SAME convolutions down to an h x w grid, then two 3x3
  conv heads of Z = `latent_channels` channels. x f32[B, H, W, C] -> (mean, raw log-scale)
  f32[B, h * w * Z], the grid flattened in (h, w, Z) order, so the prior N(0, I), the KL and
  every code-reading tool work on it unchanged."""
  has_convolutions: ClassVar[bool] = True
  channels: Sequence[int]
  image_shape: Sequence[int]
  latent_channels: int
  activation: Callable = nn.gelu
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]

  @property
  def grid(self) -> tuple[int, int]:
    """(h, w) of the code's grid."""
    levels = len(self.channels)
    return (_downsampled_sizes(self.image_shape[0], levels)[-1],
            _downsampled_sizes(self.image_shape[1], levels)[-1])

  @property
  def latent_dim(self) -> int:
    return math.prod(self.grid) * self.latent_channels

  @nn.compact
  def __call__(self, x):
    conv = _layer(nn.Conv, self.dtype, self.kernel_init)
    h = _downsample_convs(x, self.channels, (), self.activation, conv)
    heads = [conv(self.latent_channels, (3, 3), padding="SAME", name=name)(h)
             for name in ("mean", "log_scale")]
    return tuple(head.reshape(x.shape[0], -1) for head in heads)


class ConvGridDecoder(nn.Module):
  """The grid code back to an image: z f32[B, h * w * Z] -> its h x w x Z grid -> a 3x3 conv to
  the top channels, then `ConvDecoder`'s way up. -> f32[B, H, W, out_channels]."""
  has_convolutions: ClassVar[bool] = True
  channels: Sequence[int]
  image_shape: Sequence[int]
  latent_channels: int
  out_channels: int = 1
  activation: Callable = nn.gelu
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]

  @nn.compact
  def __call__(self, z):
    conv = _layer(nn.Conv, self.dtype, self.kernel_init)
    hs = _downsampled_sizes(self.image_shape[0], len(self.channels))
    ws = _downsampled_sizes(self.image_shape[1], len(self.channels))
    h = z.reshape(z.shape[0], hs[-1], ws[-1], self.latent_channels)
    h = self.activation(conv(self.channels[-1], (3, 3), padding="SAME")(h))
    return _upsample_convs(h, self.channels, hs, ws, self.out_channels, self.activation, conv)


# disentanglement_lib's conv_encoder (Locatello et al. 2019), a ConvEncoder: (channels, kernel
# side) of each stride-2 SAME convolution (64x64 -> 4x4), then one dense layer; its
# deconv_decoder mirrors the channels with 4x4 stride-2 transposed convolutions.
LOCATELLO_CONVS = ((32, 4), (32, 4), (64, 2), (64, 2))
LOCATELLO_DENSE = 256
LOCATELLO_DECONV_KERNEL = 4


class LocatelloDecoder(nn.Module):
  """disentanglement_lib's deconv_decoder: z f32[B, K] -> f32[B, H, W, out_channels].

  Dense 256, dense to an (H/16, W/16, 64) map, then 4x4 stride-2 SAME transposed convs to 64,
  32, 32 and the output channels, each doubling H and W (so H and W are multiples of 16)."""
  has_convolutions: ClassVar[bool] = True
  image_shape: Sequence[int]
  out_channels: int = 1
  activation: Callable = nn.relu
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = KERNEL_INITS["lecun_normal"]

  @nn.compact
  def __call__(self, z):
    height, width, _ = self.image_shape
    factor = 2 ** len(LOCATELLO_CONVS)
    channels = [ch for ch, _ in LOCATELLO_CONVS]
    top = (z.shape[0], height // factor, width // factor, channels[-1])
    dense = _layer(nn.Dense, self.dtype, self.kernel_init)
    deconv = _layer(nn.ConvTranspose, self.dtype, self.kernel_init)
    h = self.activation(dense(LOCATELLO_DENSE)(z))
    h = self.activation(dense(math.prod(top[1:]))(h)).reshape(top)
    outs = channels[-2::-1] + [self.out_channels]  # 64, 32, 32, out
    k = LOCATELLO_DECONV_KERNEL
    for i, ch in enumerate(outs):
      h = deconv(ch, (k, k), strides=(2, 2), padding="SAME")(h)
      if i < len(outs) - 1:
        h = self.activation(h)
    return h


def _gaussian(mean: jax.Array, raw: jax.Array, bound: float) -> tuple[jax.Array, jax.Array]:
  """A Gaussian head's (mean, raw log-scale) -> (mean, log_scale soft-clamped into (-bound,
  bound)). Whatever the layers compute in, the densities and the loss are float32."""
  return mean.astype(jnp.float32), distributions.soft_clamp(raw.astype(jnp.float32), bound)


def output_channels(likelihood: str, channels: int, mixtures: int) -> int:
  """The decoder's output channels for a likelihood over images of `channels` channels."""
  if likelihood == "mixture_logistic":
    return distributions.mixture_logistic_channels(mixtures, channels)
  return 2 * channels if likelihood == "discretized_logistic" else channels


def mixture_logistic_head(out: jax.Array, channels: int, mixtures: int,
                          bound: float) -> dict[str, jax.Array]:
  """Decoder output f32[B, H, W, M (1 + 2C) (+ 3M for C = 3)] -> the mixture's parameters
  (`distributions.mixture_logistic_pixel_log_probs`). The channels, in order: M logits; M x C
  means, sigmoid (in [0, 1], as the single logistic's); M x C log-scales, soft-clamped into
  (-bound, bound), which also floors them near -bound (PixelCNN++ cuts at -7 with a max, which
  stops their gradient; the bin masses here stay finite at any finite scale, so the smooth clamp
  that every other head uses is enough); for C = 3, M x 3 coupling coefficients, tanh."""
  m, c = mixtures, channels
  per_component = lambda v, k: v.reshape(v.shape[:-1] + (m, k))
  means, log_scales = jnp.split(out[..., m:m + 2 * m * c], 2, axis=-1)
  obs = {"logits": out[..., :m], "means": nn.sigmoid(per_component(means, c)),
         "log_scales": distributions.soft_clamp(per_component(log_scales, c), bound)}
  if c == 3:
    obs["coeffs"] = jnp.tanh(per_component(out[..., m + 2 * m * c:], 3))
  return obs


class VAE(nn.Module):
  """Encoder, decoder and the likelihood head that turns decoder outputs into p(x|z).

  `decode` returns the likelihood's parameters as a dict (see `distributions.log_likelihood`):
    gaussian: mean = sigmoid(out) (the paper's sigmoid output; `decoder_mean="identity"`
      leaves it unbounded) and log_scale, fixed
      (log obs_sigma) or learned (one scalar, or one per pixel, independent of z);
    bernoulli: logits = out;
    discretized_logistic: mean = sigmoid(out[..., :C]), log_scale from out[..., C:];
    mixture_logistic: `mixture_logistic_head` (M = `mixtures` components).
  Every log-scale passes through `soft_clamp(., log_scale_bound)`.
  """
  encoder: nn.Module
  decoder: nn.Module
  image_shape: Sequence[int]
  likelihood: str = "gaussian"
  obs_scale: str = "fixed"
  obs_sigma: float = 0.5 ** 0.5
  log_scale_bound: float = 7.0
  decoder_mean: str = "sigmoid"
  mixtures: int = 10  # mixture_logistic: components per pixel
  stochastic_layers: ClassVar[int] = 1
  # Whether the latents are a top-down hierarchy of grids without one code (`jaxvae.topdown`).
  top_down: ClassVar[bool] = False

  def networks(self) -> tuple[nn.Module, ...]:
    return (self.encoder, self.decoder)

  @property
  def has_convolutions(self) -> bool:
    """Whether a network holds a convolution: XLA:CPU runs those slowly inside compiled loops
    (see `jaxvae.loops`)."""
    missing = [type(net).__name__ for net in self.networks()
               if not hasattr(type(net), "has_convolutions")]
    if missing:
      raise TypeError(f"{', '.join(missing)} must say whether it holds convolutions: give the class "
                      "`has_convolutions: ClassVar[bool]` (see docs/extending.md)")
    return any(net.has_convolutions for net in self.networks())

  @property
  def has_batch_norm(self) -> bool:
    """Whether a network holds batch norm, whose statistics only an objective that trains them
    keeps (see `Objective.trains_batch_stats`); a network that does not say has none."""
    return any(getattr(type(net), "has_batch_norm", False) for net in self.networks())

  @property
  def code_dim(self) -> int:
    """The size of the code that `encode` returns and `decode` takes, the one with prior N(0, I)."""
    return self.encoder.latent_dim

  def setup(self):
    shape = {"learned_global": (), "learned_pixel": tuple(self.image_shape)}.get(self.obs_scale)
    if self.likelihood == "gaussian" and shape is not None:
      self.obs_log_scale = self.param("obs_log_scale", nn.initializers.zeros, shape)

  def encode(self, x):
    """x f32[B, H, W, C] -> (mean, log_scale) f32[B, K]."""
    return _gaussian(*self.encoder(x), self.log_scale_bound)

  def decode(self, z):
    """z f32[B, K] -> dict of likelihood parameters, each f32[B, H, W, C] or broadcastable."""
    return self.likelihood_params(self.decoder(z))

  def likelihood_params(self, out):
    """The decoder's raw output f32[B, H, W, out_channels] -> the likelihood's parameters."""
    out = out.astype(jnp.float32)
    expected = output_channels(self.likelihood, self.image_shape[-1], self.mixtures)
    if out.shape[-1] != expected:
      raise ValueError(f"{type(self.decoder).__name__} gave {out.shape[-1]} output channels; "
                       f"likelihood {self.likelihood!r} needs {expected}: an architecture "
                       "builder's decoder gives `out_channels` channels (see docs/extending.md)")
    clamp = lambda v: distributions.soft_clamp(v, self.log_scale_bound)
    if self.likelihood == "bernoulli":
      return {"logits": out}
    if self.likelihood == "mixture_logistic":
      return mixture_logistic_head(out, self.image_shape[-1], self.mixtures, self.log_scale_bound)
    if self.likelihood == "discretized_logistic":
      c = self.image_shape[-1]
      return {"mean": nn.sigmoid(out[..., :c]), "log_scale": clamp(out[..., c:])}
    if self.obs_scale == "fixed":
      log_scale = jnp.full((), math.log(self.obs_sigma), out.dtype)
    else:
      log_scale = clamp(self.obs_log_scale)
    mean = nn.sigmoid(out) if self.decoder_mean == "sigmoid" else out
    return {"mean": mean, "log_scale": log_scale}

  # The latent next to x and p(x|.) of it, by the names a `HierarchicalVAE` gives its bottom
  # layer: with one layer, that latent is the code itself.
  def encode_bottom(self, x):
    """x f32[B, H, W, C] -> (mean, log_scale) f32[B, K] of q(z|x)."""
    return VAE.encode(self, x)

  def decode_bottom(self, z):
    """z f32[N, K] -> likelihood parameters of p(x|z)."""
    return VAE.decode(self, z)

  # What the objectives and evaluation ask of the latents above the bottom one. Callers name
  # these methods (`method="log_prior"`), so a subclass's override is the one used.
  @staticmethod
  def layer_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(key of the draws next to x, key of the draws above them, or None with one layer).
    A one-layer model draws from `rng` itself."""
    return rng, None

  def log_prior(self, z, key):
    """log p(z) of bottom-latent draws z f32[S, B, K] -> f32[S, B] nats; `key` is unused here."""
    del key
    return distributions.standard_normal_log_prob(z)

  def kl(self, z, mean, log_scale, key):
    """KL(q(z|x) || p(z)) per example, f32[B] nats, and per dim of the top code f32[B, K]:
    analytic for N(0, I); z f32[S, B, K] (unused here) and `key` serve deeper models."""
    del z, key
    return distributions.kl_standard_normal(mean, log_scale), distributions.kl_per_dim(mean, log_scale)

  def posteriors(self, x, key):
    """((mean, log_scale) f32[B, K_l] of each stochastic layer, bottom first): the layers'
    posteriors along one draw keyed by `key` (unused with one layer)."""
    del key
    return (self.encode_bottom(x),)

  def __call__(self, x):
    """Decodes the posterior mean: x f32[B, H, W, C] -> likelihood parameters."""
    mean, _ = self.encode(x)
    return self.decode(mean)


class HierarchicalVAE(VAE):
  """Two stochastic layers (Burda et al. 2016, Table 1's second block), with p and q both
  chains through the middle latent h1 f32[B, K1] to the top latent h2 f32[B, K2]:

      q(h1, h2 | x) = q(h1|x) q(h2|h1)          p(x, h1, h2) = p(x|h1) p(h1|h2) N(h2; 0, I)

  Every conditional over a latent is a diagonal Gaussian from an MLP with two heads (an
  `MLPEncoder`); p(x|h1) is the `VAE`'s decoder and likelihood head.

  The exact maps, layer by layer, for the objectives: `encode_bottom` q(h1|x) and
  `decode_bottom` p(x|h1) (inherited), `encode_upper` q(h2|h1), `decode_upper` p(h1|h2).
  `encode` and `decode` go between x and the top code h2 along the conditional means
  (h1 = E[h1|x], or E[h1|h2]), so every figure, walk and sample that reads "the code" reads h2,
  whose prior is N(0, I); that encoding is not q(h2|x), which integrates over h1. (Callers
  name them, `model.apply(..., method="encode")`: `method=VAE.encode` would call the base
  class's.)
  """
  upper_encoder: nn.Module = None  # h1 f32[N, K1] -> (mean, raw log-scale) of q(h2|h1), [N, K2]
  upper_decoder: nn.Module = None  # h2 f32[N, K2] -> (mean, raw log-scale) of p(h1|h2), [N, K1]
  stochastic_layers: ClassVar[int] = 2

  def networks(self) -> tuple[nn.Module, ...]:
    return (self.encoder, self.decoder, self.upper_encoder, self.upper_decoder)

  @property
  def code_dim(self) -> int:
    return self.upper_encoder.latent_dim

  def encode_upper(self, h1):
    """h1 f32[N, K1] -> (mean, log_scale) f32[N, K2] of q(h2|h1)."""
    return _gaussian(*self.upper_encoder(h1), self.log_scale_bound)

  def decode_upper(self, h2):
    """h2 f32[N, K2] -> (mean, log_scale) f32[N, K1] of p(h1|h2)."""
    return _gaussian(*self.upper_decoder(h2), self.log_scale_bound)

  def encode(self, x):
    """x f32[B, H, W, C] -> (mean, log_scale) f32[B, K2] of q(h2 | h1 = E[h1|x])."""
    return self.encode_upper(self.encode_bottom(x)[0])

  def decode(self, z):
    """h2 f32[N, K2] -> likelihood parameters of p(x | h1 = E[h1|h2])."""
    return self.decode_bottom(self.decode_upper(z)[0])

  @staticmethod
  def layer_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    bottom, upper = jax.random.split(rng)
    return bottom, upper

  def upper_terms(self, h1, key):
    """The terms above h1, from one draw h2 ~ q(h2|h1) per h1 keyed by `key`.

    h1: f32[S, B, K1]. Returns f32[S, B] arrays, nats:
      log_p_h1   log p(h1|h2)
      log_ratio  log p(h2) - log q(h2|h1)
      kl_top     KL(q(h2|h1) || N(0, I)), analytic
    and `kl_top_per_dim` f32[S, B, K2]. log_p_h1 + log_ratio is the one-draw importance estimate
    of log p(h1) (its exp is unbiased for p(h1)).
    """
    flat = h1.reshape(-1, h1.shape[-1])
    mean2, log_scale2 = self.encode_upper(flat)
    h2 = distributions.sample_diag_gaussian(key, mean2, log_scale2)[0]
    mean1, log_scale1 = self.decode_upper(h2)
    per_dim = distributions.kl_per_dim(mean2, log_scale2)
    shape = h1.shape[:-1]
    log_q_h2 = distributions.diag_gaussian_log_prob(h2, mean2, log_scale2)
    return {"log_p_h1": distributions.diag_gaussian_log_prob(flat, mean1, log_scale1).reshape(shape),
            "log_ratio": (distributions.standard_normal_log_prob(h2) - log_q_h2).reshape(shape),
            "kl_top": per_dim.sum(axis=-1).reshape(shape),
            "kl_top_per_dim": per_dim.reshape(shape + per_dim.shape[-1:])}

  def log_prior(self, z, key):
    """log p(h1) of draws h1 f32[S, B, K1], estimated from one h2 draw per h1: f32[S, B]."""
    up = self.upper_terms(z, key)
    return up["log_p_h1"] + up["log_ratio"]

  def kl(self, z, mean, log_scale, key):
    """The draws' mean of log q(h1|x) - log p(h1|h2) + KL(q(h2|h1) || N(0, I)), h2 ~ q(h2|h1)
    once per h1 draw z f32[S, B, K1]: an unbiased estimate of KL(q(h1, h2|x) || p(h1, h2)),
    analytic in its top layer, f32[B]; and that top layer's KL per dim f32[B, K2]."""
    up = self.upper_terms(z, key)
    log_q = distributions.diag_gaussian_log_prob(z, mean, log_scale)  # [S, B]
    return (log_q - up["log_p_h1"] + up["kl_top"]).mean(axis=0), up["kl_top_per_dim"].mean(axis=0)

  def posteriors(self, x, key):
    """(q(h1|x), q(h2|h1)) with h1 drawn from q(h1|x) by `key` (as Burda et al. count the top
    layer's active units): ((mean, log_scale) f32[B, K1], (mean, log_scale) f32[B, K2])."""
    mean, log_scale = self.encode_bottom(x)
    h1 = distributions.sample_diag_gaussian(key, mean, log_scale)[0]
    return (mean, log_scale), self.encode_upper(h1)


def output_bias(model_cfg, pixel_mean: np.ndarray) -> np.ndarray:
  """The decoder output f32[H, W, out_channels] whose likelihood mean is `pixel_mean`.

  pixel_mean: f32[H, W, C] in [0, 1], the training split's mean image (for binary data, each
  pixel's probability of a 1), clipped to [MEAN_CLIP, 1 - MEAN_CLIP] so no logit is infinite.
  Bernoulli logits and sigmoid means get logit(mean), an identity Gaussian mean the mean
  itself; the discretized logistic's log-scale channels get 0; the mixture's components all
  get that mean, and its logits, log-scales and coefficients 0.
  """
  p = np.clip(np.asarray(pixel_mean, np.float64), MEAN_CLIP, 1 - MEAN_CLIP)
  identity = model_cfg.likelihood == "gaussian" and model_cfg.decoder_mean == "identity"
  out = p if identity else np.log(p) - np.log1p(-p)
  if model_cfg.likelihood == "discretized_logistic":
    out = np.concatenate([out, np.zeros_like(out)], axis=-1)
  if model_cfg.likelihood == "mixture_logistic":
    m, c = model_cfg.mixtures, out.shape[-1]
    rest = distributions.mixture_logistic_channels(m, c) - m - m * c  # log-scales, coefficients
    zeros = lambda k: np.zeros(out.shape[:-1] + (k,))
    out = np.concatenate([zeros(m), np.tile(out, m), zeros(rest)], axis=-1)
  return out.astype(np.float32)


class Parts(NamedTuple):
  """What an architecture builder returns; the model class adds the likelihood head."""
  encoder: nn.Module  # x f32[B, H, W, C] -> (mean, raw log-scale) f32[B, K]
  decoder: nn.Module  # z f32[N, K] -> f32[N, H, W, out_channels]
  model: type["VAE"] = VAE  # a subclass for networks that are not one code's encoder/decoder


# `config.model.arch` -> its builder (model_cfg, image_shape, pixel_mean, out_channels) -> Parts.
BUILDERS: dict[str, Callable[..., Parts]] = {}


def register_architecture(name: str):
  """Decorator: makes `builder(model_cfg, image_shape, pixel_mean, out_channels) -> Parts` the
  architecture `config.model.arch=name`. The encoder's code is `model_cfg.latent_dim` wide
  (`middle_dim` under a middle layer); the decoder gives `out_channels` channels per pixel
  (`output_channels`: C, 2C for the discretized logistic, the mixture's M (1 + 3C) or 3M),
  passed by keyword."""
  def register(builder):
    BUILDERS[name] = builder
    return builder
  return register


def _widths(model_cfg) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(encoder widths, decoder widths): the decoders take their widths in the encoder's order
  (outermost first) and reverse them."""
  hidden = tuple(model_cfg.hidden)
  return hidden, tuple(reversed(model_cfg.decoder_hidden)) or hidden


def _layers(model_cfg):
  """(activation, compute dtype, kernel initializer) of `model_cfg`."""
  return (ACTIVATIONS[model_cfg.activation], jnp.dtype(model_cfg.compute_dtype),
          KERNEL_INITS[model_cfg.kernel_init])


@register_architecture("mlp")
def _mlp(model_cfg, image_shape, pixel_mean, out_channels) -> Parts:
  act, dtype, kernel_init = _layers(model_cfg)
  hidden, decoder_hidden = _widths(model_cfg)
  # With a middle layer, this encoder's code is h1 (see HierarchicalVAE).
  encoder = MLPEncoder(hidden, model_cfg.middle_dim or model_cfg.latent_dim, act, dtype,
                       kernel_init)
  bias_init = nn.initializers.zeros_init()
  if model_cfg.output_bias_init == "data_mean":
    if pixel_mean is None:
      raise ValueError("model.output_bias_init='data_mean' needs the training split's mean "
                       "image: pass pixel_mean=data.pixel_mean(train_images, binarize)")
    bias = output_bias(model_cfg, pixel_mean).ravel()
    bias_init = lambda key, shape, dtype=jnp.float32: jnp.asarray(bias, dtype).reshape(shape)
  return Parts(encoder, MLPDecoder(decoder_hidden, tuple(image_shape), out_channels, act, dtype,
                                   kernel_init, bias_init))


@register_architecture("conv")
def _conv(model_cfg, image_shape, pixel_mean, out_channels) -> Parts:
  del pixel_mean
  act, dtype, kernel_init = _layers(model_cfg)
  hidden, decoder_hidden = _widths(model_cfg)
  channels = tuple(model_cfg.conv_channels)
  return Parts(ConvEncoder(channels, hidden, model_cfg.latent_dim, act, dtype, kernel_init),
               ConvDecoder(channels, decoder_hidden, tuple(image_shape), out_channels, act,
                           dtype, kernel_init))


@register_architecture("conv_grid")
def _conv_grid(model_cfg, image_shape, pixel_mean, out_channels) -> Parts:
  del pixel_mean
  act, dtype, kernel_init = _layers(model_cfg)
  channels, shape = tuple(model_cfg.conv_channels), tuple(image_shape)
  z = model_cfg.latent_channels
  return Parts(ConvGridEncoder(channels, shape, z, act, dtype, kernel_init),
               ConvGridDecoder(channels, shape, z, out_channels, act, dtype, kernel_init))


@register_architecture("locatello")
def _locatello(model_cfg, image_shape, pixel_mean, out_channels) -> Parts:
  del pixel_mean
  act, dtype, kernel_init = _layers(model_cfg)
  _check_locatello_shape(image_shape)
  encoder = ConvEncoder(tuple(ch for ch, _ in LOCATELLO_CONVS), (LOCATELLO_DENSE,),
                        model_cfg.latent_dim, act, dtype, kernel_init,
                        tuple(k for _, k in LOCATELLO_CONVS))
  return Parts(encoder, LocatelloDecoder(tuple(image_shape), out_channels, act, dtype,
                                         kernel_init))


def make_model(model_cfg, image_shape: Sequence[int], pixel_mean: np.ndarray | None = None) -> VAE:
  """Builds the VAE a `config.model` describes for images of `image_shape` (H, W, C), from the
  encoder and decoder of its `arch` (`BUILDERS`).

  pixel_mean: f32[H, W, C], the training split's mean image in [0, 1] (`data.pixel_mean`);
  needed by `model.output_bias_init="data_mean"` only.
  """
  if model_cfg.likelihood == "mixture_logistic" and image_shape[-1] not in (1, 3):
    raise ConfigError(f"config.model.likelihood='mixture_logistic' models images of 1 or 3 "
                      f"channels, and these have {image_shape[-1]}; choose 'discretized_logistic'")
  out_channels = output_channels(model_cfg.likelihood, image_shape[-1], model_cfg.mixtures)
  parts = BUILDERS[model_cfg.arch](model_cfg, image_shape, pixel_mean, out_channels=out_channels)
  head = (tuple(image_shape), model_cfg.likelihood, model_cfg.obs_scale, model_cfg.obs_sigma,
          model_cfg.log_scale_bound, model_cfg.decoder_mean, model_cfg.mixtures)
  if model_cfg.middle_dim:
    # x -> hidden -> h1 (middle_dim) -> middle_hidden -> h2 (latent_dim), mirrored back down.
    act, dtype, kernel_init = _layers(model_cfg)
    middle = tuple(model_cfg.middle_hidden)
    upper_encoder = MLPEncoder(middle, model_cfg.latent_dim, act, dtype, kernel_init)
    upper_decoder = MLPEncoder(tuple(reversed(middle)), model_cfg.middle_dim, act, dtype,
                               kernel_init)
    return HierarchicalVAE(parts.encoder, parts.decoder, *head, upper_encoder=upper_encoder,
                           upper_decoder=upper_decoder)
  return parts.model(parts.encoder, parts.decoder, *head)


def _check_locatello_shape(image_shape: Sequence[int]) -> None:
  """Raises unless the locatello decoder's doublings reach exactly (H, W)."""
  factor = 2 ** len(LOCATELLO_CONVS)
  height, width = image_shape[:2]
  if height % factor or width % factor:
    raise ValueError(f"config.model.arch='locatello' needs images whose height and width are "
                     f"multiples of {factor} (its decoder doubles a map {len(LOCATELLO_CONVS)} "
                     f"times; dSprites is 64x64), not {height}x{width}; use arch='conv' for these")


def init_params(model: VAE, rng: jax.Array, image_shape: Sequence[int]):
  """Parameters for a model, from a dummy batch of one image. Compiled: op by op it took
  twice as long on CPU, and the bits are the same (checked for every config in configs/)."""
  return jax.jit(model.init)(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def summary(model: VAE, image_shape: Sequence[int]) -> str:
  """A Table-1-style summary of the encoder and decoder layers: each layer's input and output
  shapes and parameters, and the total (flax's tabulate, plain text)."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  table = nn.tabulate(model, jax.random.key(0), depth=2, compute_flops=False,
                      console_kwargs={"width": 120, "force_terminal": False, "no_color": True,
                                      "force_jupyter": False})(x)
  return table.rstrip()
