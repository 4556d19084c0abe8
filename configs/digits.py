"""Offline quickstart: scikit-learn's 8x8 handwritten digits (no download), about a minute.

A small MLP VAE with a Bernoulli likelihood on dynamically binarized pixels.
"""

from jaxvae.config import base_config


def get_config():
  config = base_config()
  config.data.source = "digits"
  config.data.binarize = "dynamic"
  config.model.arch = "mlp"
  config.model.hidden = (256,)
  config.model.latent_dim = 8
  config.model.likelihood = "bernoulli"
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 32
  config.num_epochs = 60
  config.eval.batch_size = 297
  return config
