"""Training objectives, one module per kind, behind one seam (`base.Objective`):

    elbo        -E[log p(x|z)] + beta(step) KL                                  (beta-VAE)
    capacity    -E[log p(x|z)] + gamma(step) |KL - C(step)|                     (Burgess 2018)
    beta_tcvae  -E[log p(x|z)] + alpha MI + beta TC + gamma DWKL, MWS estimates (Chen 2018)
    iwae        -(logsumexp_k log w_k - log k)                                  (Burda 2016)
    dae         -log p(x | mu(occlude(x))), a denoising autoencoder        (DARLA, Higgins 2017)
    beta_vae_dae  E_q ||J(x^) - J(x)||^2 + beta KL, J a frozen DAE's features: not an ELBO (DARLA)

KL warm-up (elbo, capacity, beta_tcvae) scales the KL weights by min(step / warmup_steps, 1);
free bits floor each latent dim's batch-mean KL at `free_bits` nats in the loss. Every
schedule is a traced function of the optimizer step, so it is exact across a resume. Whatever
the objective, the metrics report the plain ELBO (beta = 1).

A new kind is one new module here defining a subclass of `base.Objective` with its `kind`:
importing this package imports every module in it, which registers the kind and its config
keys (docs/extending.md).
"""

import importlib
import pkgutil

import ml_collections

from jaxvae.errors import ConfigError
from jaxvae.objectives import base
from jaxvae.objectives.base import KINDS, Objective, StepGradients

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")


def default_config() -> ml_collections.ConfigDict:
  """The `config.objective` section: the shared keys and every kind's own, with defaults."""
  keys = dict(base.SHARED_DEFAULTS)
  for cls in KINDS.values():
    keys.update(cls.defaults)
  return ml_collections.ConfigDict(keys)


def check(config: ml_collections.ConfigDict) -> None:
  """Checks `config.objective` (every kind's key ranges, then the chosen kind's own checks)."""
  o = config.objective
  if o.kind not in KINDS:
    raise ConfigError(f"config.objective.kind={o.kind!r} is not allowed; choose one of "
                      f"{tuple(KINDS)}")
  for cls in KINDS.values():
    cls.check_keys(o)
  if not KINDS[o.kind].reads_beta and o.beta != 1.0:
    readers = " and ".join(repr(k) for k, c in KINDS.items() if c.reads_beta)
    raise ConfigError(f"config.objective.beta={o.beta} weights the KL of kind={readers} only; "
                      f"kind={o.kind!r} has its own weights (see its module in jaxvae/objectives)")
  KINDS[o.kind].check(config)


def make(config: ml_collections.ConfigDict, model, dataset_size: int | None = None) -> Objective:
  """The objective `config.objective.kind` for `model`; `dataset_size`: training examples."""
  check(config)
  return KINDS[config.objective.kind](config, model, dataset_size)
