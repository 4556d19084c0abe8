"""disentanglement_lib's beta-VAE on dSprites (Locatello et al. 2019), for a GPU.

The model runs of the study "unsupervised_study_v1" (model_configs/shared.gin,
methods/shared/architectures.py), on `dsprites_full`:
  encoder (conv_encoder): convs 32 4x4, 32 4x4, 64 2x2, 64 2x2, all stride 2 "same" (64x64 ->
    4x4x64), ReLU; dense 256, ReLU; dense heads z mean and log-scale, z = 10.
  decoder (deconv_decoder): dense 256, ReLU; dense 4*4*64 = 1024, ReLU; transposed convs 4x4
    stride 2 "same" to 64, 32, 32 channels (ReLU) and the 1 output channel: pixel logits.
  690,517 parameters. Bernoulli likelihood on the binary pixels (bernoulli_loss: sigmoid cross
  entropy summed over pixels) plus beta * KL, mean over the batch. Adam, lr 1e-4, beta1 0.9,
  beta2 0.999, epsilon 1e-8 (optax.adam's defaults); batch 64; 300,000 steps (26 epochs of the
  737,280 images). beta: shared.gin's vae.beta = 1; the study sweeps 1, 2, 4, 6, 8, 16:
  --config.objective.beta=4. The study's MIG is computed on encoder means of 10,000 images, as
  `jaxvae.disentanglement.factor_metrics` does.

Deviations:
  - Data: the procedurally generated dSprites of `jaxvae/sprites.py` (the same factor grid),
    not DeepMind's file; batches are shuffled epochs (each image once per epoch), where
    disentanglement_lib draws every batch independently at random.
  - Initialization: flax's defaults (LeCun normal kernels, zero biases), not TF's Glorot uniform.
  - The encoder's second head is log sigma, soft-clamped to (-7, 7) (`model.log_scale_bound`),
    not log sigma^2: the same family, reparameterized.
  - Adam's epsilon: TF1 adds it to the root of the uncorrected second moment, optax to the
    bias-corrected one, i.e. TF's is optax's epsilon / sqrt(1 - 0.999^t): 3e-7 at step 1, within
    1% of 1e-8 from step 4,000 on.
  - Transposed convs: flax's kernels are not flipped (transpose_kernel=False), a relabelling of
    TF's conv2d_transpose weights; the output positions each input reaches are the same.

On this project's 2-core CPU a convolution inside the trainer's compiled loop runs 20-50x
slower than alone (jax-ml/jax#12868); use configs/sprites_beta_vae.py there.
"""

from jaxvae.config import base_config


def get_config():
  config = base_config()
  config.data.source = "sprites"     # all 737,280 images; test: a fixed 10,000 of them
  config.data.binarize = "none"      # the sprites are already binary
  config.model.arch = "locatello"    # conv_encoder and deconv_decoder, fixed (see models.py)
  config.model.latent_dim = 10       # encoder.num_latent
  config.model.activation = "relu"
  config.model.likelihood = "bernoulli"  # reconstruction_loss.loss_fn = @bernoulli_loss
  config.objective.beta = 1.0        # vae.beta
  config.optimizer.learning_rate = 1e-4  # vae/AdamOptimizer.learning_rate
  config.batch_size = 64             # model.batch_size
  config.num_steps = 300_000         # model.training_steps
  config.eval.every_steps = 10_000   # 30 evaluations and checkpoints over the run
  config.eval.batch_size = 1000
  config.log.chunks_per_epoch = 12   # 960 steps per compiled call
  return config
