"""A convolutional VAE of CIFAR-10 as a density model, scored in bits/dim, for a CPU.

Encoder: 4x4 stride-2 convs 3 -> 32 -> 64 channels (32x32 -> 16x16 -> 8x8, GELU), dense
4096 -> 512 -> k = 128 (mean and log-scale heads); decoder: 128 -> 512 -> 8x8x64, nearest
upsampling and 3x3 conv up to 16x16x32 and 32x32x6: a discretized logistic per pixel and channel
(mean and log-scale) over the 256 levels, so the ELBO is a log-probability and bits/dim a
density score. 4,450,886 parameters.

On CPU it trains with one compiled call per step (`loop_mode` auto, see jaxvae/loops.py).
Pace on the project's idle 2-core CPU (benchmarks/throughput.py on the real data): 89-100 ms per
step, 70-78 s per epoch plus 7 s of evaluation (batches of 100), so an hour is 40-45 epochs;
this config's 30 take about 40 minutes. In 600 steps on the real data it reached 6.67 bits/dim
on 2,000 test images, ahead of the alternatives measured at the same step: a residual block at
each resolution (6.88, at 1.8x the time per step), k = 256 (6.80), channels (64, 128) (7.14
at 400 steps against 6.81, 2.3x the time per step).

grid (`configs/cifar10_conv.py:grid`): the code is the last conv's 8x8 grid instead of a vector
(`model.arch=conv_grid`), 32 channels (8x8x32 = 2,048 dims), convs 3 -> 64 -> 128, 100 epochs. In
800-step trials (docs/cifar10_conv.md#a-grid-code) a grid code beat the vector one at every size
tried: channels (64, 128) with 16 grid channels 6.06 bits/dim against the vector model's 6.62
(which needed 30 epochs to reach 6.03), and 32 grid channels beat 16 at channels (32, 64).

grid_mixture: grid with PixelCNN++'s mixture of 10 discretized logistics per pixel (channels
coupled within a pixel) instead of the factorized logistic: at step 400 of the trial setting
(channels (64, 128), 16 grid channels) 5.40 bits/dim against 6.39. Its step took 8x grid's with
XLA's default convolutions, 3.1x since they run on Eigen (873 against 284 ms on the idle CPU,
docs/speed.md#convolutions-on-xlacpu). On the JPEG q75 copy it reached 4.362 bits/dim (ELBO,
all test images) after 4 epochs; the paper's 4.54 is on the original images (docs/cifar10_conv.md).

Offline, point at the JPEG copy instead of TFDS:
  --config.data.source=folder --config.data.path=/path/to/cifar10-jpeg.tar.gz
"""

from jaxvae.config import base_config


def get_config(variant: str = "vector"):
  if variant not in ("vector", "grid", "grid_mixture"):
    raise ValueError(f"configs/cifar10_conv.py:{variant}: choose 'vector', 'grid' or "
                     "'grid_mixture'")
  config = base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.model.arch = "conv"
  config.model.conv_channels = (32, 64)
  config.model.hidden = (512,)
  config.model.latent_dim = 128
  config.model.activation = "gelu"
  config.model.likelihood = "discretized_logistic"
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 64
  config.num_epochs = 30             # the hour of docs/cifar10_conv.md's run (then 120 s an epoch)
  config.eval.iw_samples = 100       # each IWAE draw decodes every test image once
  config.eval.batch_size = 100       # on the 2-core CPU 1.5x faster than batches of 1000
  if variant.startswith("grid"):
    config.model.arch = "conv_grid"
    config.model.conv_channels = (64, 128)
    config.model.latent_channels = 32
    config.num_epochs = 100
  if variant == "grid_mixture":
    config.model.likelihood = "mixture_logistic"
  return config
