"""A hierarchical top-down VAE of CIFAR-10 (VD-VAE style, jaxvae/topdown.py) as a density model.

  python train.py --config configs/cifar10_topdown.py        # sized for the 2-core CPU
  python train.py --config configs/cifar10_topdown.py:gpu    # VD-VAE's CIFAR-10 shape

cpu: width 64 (bottleneck 16), 8 latent channels per group, 12 latent groups at 1, 4, 8, 16
  and 32 pixels; about 0.4M parameters; 22 GFLOP of products per step at batch 32 (the
  conv VAE of configs/cifar10_conv.py: 5.9 at batch 64). docs/cifar10_topdown.md has its
  measured pace and curve.
gpu: Child (2021)'s CIFAR-10 model: width 384, 16 latent channels, 43 groups; VD-VAE trained it
  with Adam(W) at 2e-4, b2 0.9, batch 32 (16 per GPU), EMA 0.9999, gradient clipping 200 and
  a skip threshold of 400 on its per-dimension loss.

Both: the mixture of discretized logistics (PixelCNN++'s) over the 256 levels, so bits/dim is a
density score, and VD-VAE's stabilizers. jaxvae's loss is summed over the 3,072 dims of an
image (VD-VAE's is their mean), so the gradient-norm thresholds are theirs times 3,072; Adam
is unchanged by that scale.

Offline, point at the JPEG copy instead of TFDS:
  --config.data.source=folder --config.data.path=/path/to/cifar10-jpeg.tar.gz
"""

from jaxvae.config import base_config

DIMS = 32 * 32 * 3  # VD-VAE's loss is per dim, jaxvae's per image


def get_config(variant: str = "cpu"):
  if variant not in ("cpu", "gpu"):
    raise ValueError(f"configs/cifar10_topdown.py:{variant}: choose 'cpu' or 'gpu'")
  config = base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  m = config.model
  m.arch = "topdown"
  m.likelihood = "mixture_logistic"   # 10 components
  config.optimizer.b2 = 0.9
  config.optimizer.grad_clip_norm = 200.0 * DIMS
  config.optimizer.skip_grad_norm = 400.0 * DIMS
  config.batch_size = 32
  config.eval.batch_size = 100
  if variant == "cpu":
    m.blocks_up = "32x2,32d2,16x2,16d2,8x2,8d2,4x1,4d4,1x1"
    m.blocks_down = "1x1,4m1,4x1,8m4,8x2,16m8,16x2,32m16,32x2"
    m.width, m.latent_channels = 64, 8
    config.optimizer.learning_rate = 5e-4
    config.optimizer.ema_decay = 0.999
    config.optimizer.flatten = True
    config.num_epochs = 40
    config.eval.iw_samples = 10     # each draw passes every test image through the model
  else:
    m.blocks_up = "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3"
    m.blocks_down = "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21"
    m.width, m.latent_channels = 384, 16
    config.optimizer.learning_rate = 2e-4
    config.optimizer.ema_decay = 0.9999
    config.optimizer.flatten = True
    config.num_epochs = 650
    config.eval.iw_samples = 100
  return config
