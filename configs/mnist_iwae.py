"""Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders", Table 1, MNIST,
one stochastic layer: the VAE column (k = 1 here; k = 5, 50 with `objective.num_samples`).

MNIST from an image folder or its .tar.gz (train/<digit>/*.png, test/<digit>/*.png):

  python train.py --config configs/mnist_iwae.py --workdir runs/mnist_vae \\
    --config.data.path=/path/to/mnist-png.tar.gz
  python -m jaxvae.evaluate --workdir runs/mnist_vae   # test NLL = -(IWAE bound, K = 5000)

The protocol, as the paper's text gives it:
  - data: the standard split, 60,000 training and 10,000 test images, dynamically binarized (a
    fresh Bernoulli(x / 255) draw each time a training batch is used). The test split is
    binarized once per image from the run's eval key, so every evaluation scores the same
    binary images.
  - model: 784 -> 200 -> 200 (tanh) -> two linear heads, the mean and log-sigma of a diagonal
    Gaussian q(z|x) over 50 dims; 50 -> 200 -> 200 (tanh) -> 784 Bernoulli logits; 425,284
    parameters. Weights Glorot-uniform, biases zero except the decoder's output bias, which
    starts at the logit of the training mean (clipped to [0.001, 0.999]).
  - training: Adam b1 = 0.9, b2 = 0.999, eps = 1e-4; batch 20 (3,000 steps a pass); 3^i passes
    at learning rate 1e-3 * 10^(-i/7) for i = 0..7, 3,280 passes in all.
  - evaluation: the test log-likelihood estimated by the IWAE bound with K = 5000.

Where the authors' released code (github.com/yburda/iwae) differs, this follows the text:
  - Adam: the code's b1 is 0.99 (its Adam's default, never overridden), its second moment
    starts at ones rather than zeros, and its eps (1e-4) is added to the root of the
    uncorrected second moment;
  - the learning rates: the code rounds 10 * 10^(-i/7) to one decimal (7.2e-4 for i = 1, ...);
  - the split: the code trains on the first 59,600 training images, holding out the last 400
    (and takes the output bias from those 59,600); the text says 60,000;
  - the code seeds every layer's initialization alike (seed 123: the mean and sigma heads
    start identical); here each layer draws its own;
  - the code visits the training images in the same order every pass; here each epoch is a
    fresh permutation.
Departures of jaxvae itself: sigma = exp(log_scale) with log_scale soft-clamped into (-7, 7)
(`model.log_scale_bound`; the code's exp head is unbounded), and non-finite steps are skipped
(`optimizer.skip_nonfinite`).

For the VAE rows with k > 1, `objective.num_samples=k` averages the ELBO over k draws; the IWAE
rows need the IWAE objective with k samples.

The table's second block, two stochastic layers, is `--config configs/mnist_iwae.py:2`: a
100-unit latent h1 between x and the 50-unit code h2 (`models.HierarchicalVAE`),

  x -> 200 -> 200 (tanh) -> h1 (100) -> 100 -> 100 (tanh) -> h2 (50)          q(h1|x) q(h2|h1)
  h2 -> 100 -> 100 (tanh) -> h1 (100) -> 200 -> 200 (tanh) -> 784 logits      p(h1|h2) p(x|h1)

as the authors' code builds it (latent units [100, 50], hidden [[200, 200], [100, 100]]; 521,084
parameters), with everything else as above. Its VAE's KL is estimated from the draws (analytic
only in the top layer), and eval.json adds the active units per layer. On the same CPU: 1.97 ms
a step, 5.9 s a pass, 11.5 minutes per K = 5000 measurement.

Speed (2 CPU cores, idle, benchmarks/throughput.py): 1.53 ms a step at k = 1 (batch-20
matmuls, Adam over 425,284 parameters, the binarization draw), 4.6 s a pass, so 3,280 passes
take 4.2 hours at k = 1 and 33 at k = 50 (IWAE, 36.8 s a pass). Hence `optimizer.skip_nonfinite="loss"` (the
default "grads" check of every gradient cost 20-70% more per step; non-finite parameters still
stop the run before any checkpoint holds them), evaluation and checkpoints every 10 passes
(and at the end), and IWAE evaluation in calls of 20 images x 250 draws: K = 5000 over the
10,000 test images took 542-568 s on the idle machine.
"""

from jaxvae.config import base_config


def get_config(layers: str = "1"):
  """layers: the stochastic layers, "1" or "2" (the `:2` after the config path)."""
  if layers not in ("1", "2"):
    raise ValueError(f"configs/mnist_iwae.py:{layers}: the table has 1 or 2 stochastic layers; "
                     "use configs/mnist_iwae.py or configs/mnist_iwae.py:2")
  config = base_config()
  config.data.source = "folder"
  config.data.path = ""                   # --config.data.path=/path/to/mnist-png.tar.gz
  config.data.binarize = "dynamic"
  config.model.arch = "mlp"
  config.model.hidden = (200, 200)        # the decoder mirrors them: 50 -> 200 -> 200 -> 784
  config.model.latent_dim = 50
  config.model.activation = "tanh"
  config.model.likelihood = "bernoulli"
  config.model.kernel_init = "glorot_uniform"
  config.model.output_bias_init = "data_mean"
  config.optimizer.learning_rate = 1e-3   # stage 0 of the schedule
  config.optimizer.schedule = "iwae"      # 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-4
  config.batch_size = 20
  config.num_epochs = 3280
  # Speed, not the protocol: see the module docstring.
  config.optimizer.skip_nonfinite = "loss"
  config.eval.every_steps = 10 * 3000     # every 10 passes (and at the end)
  config.eval.iw_samples = 5000
  config.eval.iw_batch_size = 20          # x iw_chunk = 5,000 decodes a call (16 MB of logits)
  config.eval.iw_chunk = 250
  if layers == "2":
    config.model.middle_dim = 100
    config.model.middle_hidden = (100, 100)  # between h1 and h2, both ways
  return config
