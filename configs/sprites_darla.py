"""DARLA's vision stage (Higgins et al. 2017) on the generated dSprites: docs/darla.md.

Four runs of configs/sprites_beta_vae.py's MLP (4096-1200-1200-10 / 10-1200-1200-1200-4096,
Bernoulli, Adam 1e-4, batch 64, bfloat16 products), chosen by the string after the path:

  configs/sprites_darla.py:dae           the denoising autoencoder (objective.kind=dae): occlusion
                                         noise, pixel loss against the clean image; the same MLP,
                                         its posterior mean as a deterministic code
  configs/sprites_darla.py:dae_conv      the DAE as disentanglement_lib's conv net (model.arch=
                                         locatello), whose conv features are overcomplete: J at
                                         Conv_1 (16x16x32); its beta_vae_dae run needs
                                         --config.objective.dae_layer=Conv_1
                                         --config.loop_mode=per_step on CPU (docs/darla.md)
  configs/sprites_darla.py:vae           beta = 1
  configs/sprites_darla.py:beta_vae      beta = 4 (sprites_beta_vae.py's)
  configs/sprites_darla.py:beta_vae_dae  E_q ||J(x^) - J(x)||^2 + beta KL (not an ELBO), J the
                                         DAE's last hidden layer (1200 ReLU units); needs
                                         --config.objective.dae_workdir=<the dae run>

beta_vae_dae's beta is on the scale of its feature term, not of nats of pixels: DARLA_BETA, chosen
as docs/darla.md says. Every variant trains on the source domain (white sprites on black); the
target domains are for `python -m jaxvae.evaluate --transfer`.
"""

from configs import sprites_beta_vae

VARIANTS = ("dae", "dae_conv", "vae", "beta_vae", "beta_vae_dae")
DARLA_BETA = 0.11  # 4 x 0.0276, the rate measured in docs/darla.md


def get_config(variant: str = "dae"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/sprites_darla.py:{variant}: choose one of {VARIANTS}, e.g. "
                     "configs/sprites_darla.py:dae")
  config = sprites_beta_vae.get_config()
  config.objective.beta = {"vae": 1.0, "beta_vae": 4.0, "beta_vae_dae": DARLA_BETA}.get(variant, 1.0)
  if variant in ("dae", "dae_conv"):
    config.objective.kind = "dae"
  if variant == "dae_conv":
    config.model.arch = "locatello"
  if variant == "beta_vae_dae":
    config.objective.kind = "beta_vae_dae"
    config.objective.dae_layer = "Dense_1"
  return config
