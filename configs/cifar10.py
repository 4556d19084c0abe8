"""The paper's CIFAR-10 experiment (section 4.1, Table 1), exactly.

MLP VAE 3072 -> 512 (GELU) -> k=256 (mean and log-scale heads); decoder 256 -> 512 (GELU)
-> 3072 with a sigmoid output: 3,543,552 parameters. Loss SSE + KL, i.e. a Gaussian
likelihood with sigma^2 = 1/2 (up to a constant). Adam, lr 1e-3, batch 32, 100 epochs, SSIM
per epoch.

Offline, point at the JPEG copy instead of TFDS:
  --config.data.source=folder --config.data.path=/path/to/cifar10-jpeg.tar.gz
"""

from jaxvae.config import base_config


def get_config():
  config = base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.model.arch = "mlp"
  config.model.hidden = (512,)       # Table 1: Linear-1 3072 -> 512, Linear-5 256 -> 512
  config.model.latent_dim = 256      # "latent space of dimension k = 256"
  config.model.activation = "gelu"   # "the GeLu function for non-linearity"
  config.model.likelihood = "gaussian"
  config.model.obs_scale = "fixed"
  config.model.obs_sigma = 0.5 ** 0.5  # sigma^2 = 1/2: -log p(x|z) = SSE + const
  config.optimizer.learning_rate = 1e-3  # "Adam optimizer with a learning rate of 0.001"
  config.batch_size = 32             # "1,563 batches of 32 images"
  config.num_epochs = 100            # "We train the model for 100 epochs"
  return config
