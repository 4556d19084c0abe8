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
