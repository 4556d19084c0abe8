"""jaxvae: variational auto-encoders in JAX/Flax, correct to the equation."""

__version__ = "0.1.0"
