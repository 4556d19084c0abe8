"""The VAE-GAN networks of Larsen et al. (2016), "Autoencoding beyond pixels using a learned
similarity metric", as their code builds them for 32x32 images (`architectures.img32x32`):

  encoder        5x5 stride-2 convs `conv_channels` (64, 128, 256), each without bias, then
                 batch norm and ReLU; dense `hidden` (1024,) the same way; the two heads of q(z|x)
  decoder        dense to an (H/2^n, W/2^n, conv_channels[-1]) map, batch norm, ReLU; 5x5
                 stride-2 transposed convs `decoder_channels` (192, 128, 32) the same way; a 5x5
                 conv to the output (their tanh on [-1, 1] is the VAE head's sigmoid on [0, 1])
  Discriminator  a 5x5 conv 32 with ReLU, then 5x5 stride-2 convs 128, 192, 256 with batch norm
                 and ReLU, dense 512 the same way, and one logit; it also returns the output
                 of one conv before its batch norm (the "learned similarity" features)

Batch norm uses the batch's statistics while the "batch_stats" collection is mutable (a
training step) and their running averages otherwise, so evaluation, sampling and every figure
read the averages without saying so. Its momentum 0.9 and epsilon 1e-6 are the authors'.
"""

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvae import models

KERNEL = (5, 5)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-6


def _norm(module: nn.Module) -> nn.BatchNorm:
  """Batch norm that trains exactly when its caller lets it write "batch_stats"."""
  return nn.BatchNorm(use_running_average=not module.is_mutable_collection("batch_stats"),
                      momentum=BN_MOMENTUM, epsilon=BN_EPSILON)


def _signed(x: jax.Array) -> jax.Array:
  """Images in [0, 1] -> [-1, 1], the range the authors' networks read."""
  return 2.0 * x - 1.0


class LarsenEncoder(nn.Module):
  """x f32[B, H, W, C] in [0, 1] -> (mean, raw log-scale) f32[B, K]."""
  has_convolutions: ClassVar[bool] = True
  has_batch_norm: ClassVar[bool] = True
  channels: Sequence[int]
  hidden: Sequence[int]
  latent_dim: int

  @nn.compact
  def __call__(self, x):
    h = _signed(x)
    for ch in self.channels:
      h = nn.relu(_norm(self)(nn.Conv(ch, KERNEL, strides=(2, 2), use_bias=False)(h)))
    h = h.reshape(h.shape[0], -1)
    for width in self.hidden:
      h = nn.relu(_norm(self)(nn.Dense(width, use_bias=False)(h)))
    return nn.Dense(self.latent_dim, name="mean")(h), nn.Dense(self.latent_dim, name="log_scale")(h)


class LarsenDecoder(nn.Module):
  """z f32[N, K] -> f32[N, H, W, out_channels]; H and W are multiples of 2^len(channels)."""
  has_convolutions: ClassVar[bool] = True
  has_batch_norm: ClassVar[bool] = True
  top_channels: int
  channels: Sequence[int]
  image_shape: Sequence[int]
  out_channels: int = 1

  @nn.compact
  def __call__(self, z):
    height, width, _ = self.image_shape
    factor = 2 ** len(self.channels)
    top = (z.shape[0], height // factor, width // factor, self.top_channels)
    h = nn.Dense(top[1] * top[2] * top[3], use_bias=False)(z)
    h = nn.relu(_norm(self)(h)).reshape(top)
    for ch in self.channels:
      h = nn.ConvTranspose(ch, KERNEL, strides=(2, 2), padding="SAME", use_bias=False)(h)
      h = nn.relu(_norm(self)(h))
    return nn.Conv(self.out_channels, KERNEL)(h)


class Discriminator(nn.Module):
  """x f32[B, H, W, C] in [0, 1] -> (logit f32[B] that x is a data image, the output of conv
  number `feature_layer` (1-based) before its batch norm, f32[B, h, w, channels])."""
  channels: Sequence[int] = (32, 128, 192, 256)
  hidden: int = 512
  feature_layer: int = 3

  @nn.compact
  def __call__(self, x):
    h, features = _signed(x), None
    for i, ch in enumerate(self.channels):
      first = i == 0  # stride 1, a bias and no batch norm, as the authors' first layer
      h = nn.Conv(ch, KERNEL, strides=(1, 1) if first else (2, 2), use_bias=first)(h)
      if i + 1 == self.feature_layer:
        features = h
      h = nn.relu(h if first else _norm(self)(h))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(_norm(self)(nn.Dense(self.hidden, use_bias=False)(h)))
    return nn.Dense(1)(h)[:, 0], features


def check_shape(image_shape: Sequence[int], decoder_channels: Sequence[int]) -> None:
  """Raises unless the decoder's doublings reach exactly (H, W)."""
  factor = 2 ** len(decoder_channels)
  height, width = image_shape[:2]
  if not decoder_channels or height % factor or width % factor:
    raise ValueError(f"config.model.arch='larsen' doubles a map once per entry of "
                     f"config.model.decoder_channels={tuple(decoder_channels)}, so the images' "
                     f"height and width must be multiples of {factor}, not {height}x{width}; "
                     "give as many decoder channels as the size allows (3 for 32x32)")


@models.register_architecture("larsen")
def _larsen(model_cfg, image_shape, pixel_mean, out_channels) -> models.Parts:
  del pixel_mean
  check_shape(image_shape, model_cfg.decoder_channels)
  channels = tuple(model_cfg.conv_channels)
  encoder = LarsenEncoder(channels, tuple(model_cfg.hidden), model_cfg.latent_dim)
  return models.Parts(encoder, LarsenDecoder(channels[-1], tuple(model_cfg.decoder_channels),
                                             tuple(image_shape), out_channels))
