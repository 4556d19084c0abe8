"""Larsen et al. (2016)'s VAE-GAN on CIFAR-10, as their code sets it for 32x32 images
(`cifar_aegan.py`, `architectures.img32x32`); see jaxvae/objectives/vae_gan.py.

Encoder 5x5 stride-2 convs 64, 128, 256 and dense 1024 with batch norm and ReLU, k = 128;
decoder dense to 4x4x256, transposed convs 192, 128, 32, a 5x5 conv to 3 channels;
discriminator convs 32, 128, 192, 256 and dense 512, its features for the reconstruction
the third conv's output before batch norm (their `recon_depth=6`); w = 5e-6, r = 0.66; RMSProp
annealed from 0.02 / 64 to 1e-5 / 64 over the run; batch 64. They ran 150 "epochs" of 250
batches (37,500 steps); one epoch here is the whole training split (781 steps).

`configs/cifar10_vae_gan.py:quarter` divides every width by 4 (about 1/16 of the products),
for the 2-core CPU.

The controls at the same steps: `--config.objective.variant=vae` (this architecture as a VAE
of pixels, its discriminator watching) and `--config.objective.variant=gan`.

Offline, point at the JPEG copy instead of TFDS:
  --config.data.source=folder --config.data.path=/path/to/cifar10-jpeg.tar.gz
"""

from jaxvae.config import base_config


def get_config(width: str = "full"):
  """width: "full" (the authors') or "quarter" (every width / 4, the `:quarter` after the path)."""
  if width not in ("full", "quarter"):
    raise ValueError(f"configs/cifar10_vae_gan.py:{width}: the width is 'full' or 'quarter'")
  div = 4 if width == "quarter" else 1
  config = base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.model.arch = "larsen"
  config.model.conv_channels = (64 // div, 128 // div, 256 // div)
  config.model.hidden = (1024 // div,)
  config.model.decoder_channels = (192 // div, 128 // div, 32 // div)
  config.model.latent_dim = 128
  config.model.likelihood = "gaussian"
  config.objective.kind = "vae_gan"
  config.objective.disc_channels = (32 // div, 128 // div, 192 // div, 256 // div)
  config.objective.disc_hidden = 512 // div
  config.batch_size = 64
  config.num_epochs = 48               # 37,500 steps: the authors' 150 x 250 batches
  config.eval.batch_size = 100
  return config
