"""Shared test helpers: paths, the real-data location, and tiny configs."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The offline copies of CIFAR-10 and MNIST live beside the checkout, never inside it.
SHARED_DATA = Path(os.environ.get("JAXVAE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_TGZ = SHARED_DATA / "cifar10-jpeg.tar.gz"
MNIST_TGZ = SHARED_DATA / "mnist-png.tar.gz"


def tiny_digits_config(num_epochs: int = 2):
  """configs/digits.py shrunk so a run takes a second or two."""
  from configs import digits
  config = digits.get_config()
  config.num_epochs = num_epochs
  config.model.hidden = (64,)
  config.model.latent_dim = 4
  config.log.progress = False
  return config


def needs(path: Path):
  return pytest.mark.skipif(not path.exists(), reason=f"real data copy {path} is absent "
                            "(it lives in ../shared/data beside the checkout)")


def tiny_sprites_config(num_steps: int = 30):
  """dSprites cut to 2,000 grid points, a tiny MLP and `num_steps` steps, evaluated every 10:
  a run with factor labels in seconds."""
  from jaxvae.config import base_config
  config = base_config()
  config.data.source = "sprites"
  config.data.sprites_subsample = 2000
  config.model.likelihood = "bernoulli"
  config.model.hidden = (32,)
  config.model.latent_dim = 5
  config.num_steps = num_steps
  config.eval.every_steps = 10
  config.eval.batch_size = 1000
  config.log.progress = False
  config.log.tensorboard = False  # the digits runs cover it; TensorFlow takes seconds to import
  return config
