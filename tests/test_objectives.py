"""The ELBO against an exactly solvable model, its reductions, and the models' shapes."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import cifar10
from jaxvae import models, objectives
from jaxvae.config import base_config

# ----------------------------------------------------------------------------- PPCA
# z ~ N(0, I_K), x | z ~ N(W z + b, s^2 I_D). With orthogonal columns of W the exact
# posterior is diagonal: N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I.
D_SHAPE, K, S = (2, 2, 1), 2, 0.5


class LinearEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    mean = nn.Dense(K, name="mean")(x.reshape(x.shape[0], -1))
    raw = self.param("raw_log_scale", nn.initializers.zeros, (K,))
    return mean, jnp.broadcast_to(raw, mean.shape)


class LinearDecoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    return nn.Dense(int(np.prod(D_SHAPE)))(z).reshape((z.shape[0],) + D_SHAPE)


def _ppca():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(4, K)))
  c = np.array([2.0, 0.7])
  w, b = q * c, rng.normal(size=4)
  model = models.VAE(LinearEncoder(), LinearDecoder(), D_SHAPE, "gaussian", "fixed", S,
                     log_scale_bound=7.0, decoder_mean="identity")
  m_diag = c ** 2 + S ** 2
  a = (w / m_diag).T  # M^-1 W^T, [K, D]
  post_log_scale = 0.5 * np.log(S ** 2 / m_diag)
  return model, w, b, a, post_log_scale


def _params(w, b, enc_kernel, enc_bias, log_scale):
  raw = 7.0 * np.arctanh(log_scale / 7.0)  # undo the soft clamp
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return {"params": {
      "encoder": {"mean": {"kernel": f32(enc_kernel), "bias": f32(enc_bias)},
                  "raw_log_scale": f32(raw)},
      "decoder": {"Dense_0": {"kernel": f32(w.T), "bias": f32(b)}}}}


def _elbo_samples(model, params, x, n=40_000):
  """n independent one-sample ELBO estimates for the single image x (n copies in a batch)."""
  batch = jnp.broadcast_to(jnp.asarray(x, jnp.float32).reshape((1,) + D_SHAPE), (n,) + D_SHAPE)
  elbo = jax.jit(objectives.elbo, static_argnames=("model",))
  return np.asarray(elbo(params, jax.random.key(7), batch, model=model), np.float64)


def test_elbo_equals_log_evidence_at_exact_posterior_and_is_below_elsewhere():
  model, w, b, a, post_ls = _ppca()
  x = np.array([0.3, -1.2, 2.0, 0.5])
  log_px = stats.multivariate_normal.logpdf(x, b, w @ w.T + S ** 2 * np.eye(4))

  exact = _params(w, b, a.T, -a @ b, post_ls)
  e = _elbo_samples(model, exact, x)
  stderr = e.std() / np.sqrt(len(e))
  assert abs(e.mean() - log_px) < 5 * stderr + 1e-3, (e.mean(), log_px, stderr)

  # A worse q: shifted mean and wrong scales. Exact ELBO = log p(x) - KL(q || posterior).
  post_mean, post_s = a @ (x - b), np.exp(post_ls)
  q_shift, q_ls = np.array([0.4, -0.3]), post_ls + np.array([0.5, -0.4])
  off = _params(w, b, a.T, -a @ b + q_shift, q_ls)
  e_off = _elbo_samples(model, off, x)
  q_s = np.exp(q_ls)
  kl_gap = np.sum(np.log(post_s / q_s) + (q_s ** 2 + q_shift ** 2) / (2 * post_s ** 2) - 0.5)
  assert kl_gap > 0.1
  stderr = e_off.std() / np.sqrt(len(e_off))
  assert abs(e_off.mean() - (log_px - kl_gap)) < 5 * stderr + 1e-3
  assert e_off.mean() < log_px - 0.05
  del post_mean


# ----------------------------------------------------------------------------- reductions


def _small_model(likelihood="gaussian"):
  cfg = base_config().model
  cfg.hidden, cfg.latent_dim, cfg.likelihood = (16,), 3, likelihood
  model = models.make_model(cfg, (4, 4, 3))
  return model, models.init_params(model, jax.random.key(0), (4, 4, 3))


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "discretized_logistic"])
def test_loss_per_example_is_independent_of_batch_size(likelihood):
  model, params = _small_model(likelihood)
  x = jax.random.uniform(jax.random.key(1), (1, 4, 4, 3))
  if likelihood == "bernoulli":
    x = jnp.round(x)
  if likelihood == "discretized_logistic":
    x = jnp.round(x * 255) / 255
  # 64 copies with one draw each use the same normals as one copy with 64 draws, so a
  # mean-over-batch reduction gives identical losses; a sum would be 64 times larger.
  loss = jax.jit(objectives.loss, static_argnames=("model", "num_samples"))
  batch_loss, m_batch = loss(params, jax.random.key(2), jnp.repeat(x, 64, 0), model=model)
  single_loss, m_single = loss(params, jax.random.key(2), x, model=model, num_samples=64)
  np.testing.assert_allclose(batch_loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(m_batch["kl_nats"], m_single["kl_nats"], rtol=1e-5)
  assert float(m_batch["elbo_nats"]) == pytest.approx(-float(batch_loss), rel=1e-6)


def test_beta_weights_only_the_kl_and_reported_elbo_ignores_it():
  model, params = _small_model()
  x = jax.random.uniform(jax.random.key(1), (8, 4, 4, 3))
  loss = jax.jit(objectives.loss, static_argnames=("model",))
  l1, m1 = loss(params, jax.random.key(2), x, model=model, beta=1.0)
  l4, m4 = loss(params, jax.random.key(2), x, model=model, beta=4.0)
  np.testing.assert_allclose(l4 - l1, 3.0 * m1["kl_nats"], rtol=1e-5)
  np.testing.assert_allclose(m4["elbo_nats"], m1["elbo_nats"], rtol=1e-6)


# ----------------------------------------------------------------------------- models


def test_paper_model_has_table1_parameter_count():
  config = cifar10.get_config()
  model = models.make_model(config.model, (32, 32, 3))
  params = models.init_params(model, jax.random.key(0), (32, 32, 3))
  assert models.count_params(params) == 3_543_552
  sizes = {"/".join(str(getattr(p, "key", p)) for p in path): leaf.size
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  # Table 1, layer by layer (kernel + bias).
  assert sizes["params/encoder/Dense_0/kernel"] + sizes["params/encoder/Dense_0/bias"] == 1_573_376
  assert sizes["params/encoder/mean/kernel"] + sizes["params/encoder/mean/bias"] == 131_328
  assert sizes["params/encoder/log_scale/kernel"] + sizes["params/encoder/log_scale/bias"] == 131_328
  assert sizes["params/decoder/Dense_0/kernel"] + sizes["params/decoder/Dense_0/bias"] == 131_584
  assert sizes["params/decoder/Dense_1/kernel"] + sizes["params/decoder/Dense_1/bias"] == 1_575_936


@pytest.mark.parametrize("shape,likelihood", [((8, 8, 1), "gaussian"), ((7, 7, 1), "gaussian"),
                                              ((32, 32, 3), "discretized_logistic"),
                                              ((13, 20, 2), "gaussian")])
def test_conv_model_reconstructs_any_image_shape(shape, likelihood):
  cfg = base_config().model
  cfg.arch, cfg.hidden, cfg.conv_channels, cfg.latent_dim = "conv", (32,), (8, 16), 5
  cfg.likelihood = likelihood
  model = models.make_model(cfg, shape)

  @jax.jit
  def encode_decode(x):
    params = models.init_params(model, jax.random.key(0), shape)
    mean, log_scale = model.apply(params, x, method=models.VAE.encode)
    return mean, log_scale, model.apply(params, mean, method=models.VAE.decode)

  mean, log_scale, obs = encode_decode(jnp.zeros((3,) + shape))
  assert mean.shape == log_scale.shape == (3, 5)
  assert obs["mean"].shape == (3,) + shape
  assert jnp.broadcast_shapes(obs["log_scale"].shape, (3,) + shape) == (3,) + shape


def test_learned_observation_scales_are_parameters_of_the_right_shape():
  cfg = base_config().model
  cfg.hidden, cfg.latent_dim = (8,), 2
  for obs_scale, shape in (("learned_global", ()), ("learned_pixel", (4, 4, 3))):
    cfg.obs_scale = obs_scale
    params = models.init_params(models.make_model(cfg, (4, 4, 3)), jax.random.key(0), (4, 4, 3))
    assert params["params"]["obs_log_scale"].shape == shape


def test_scale_head_cannot_overflow_with_huge_weights():
  model, params = _small_model()
  huge = jax.tree.map(lambda p: p * 1e4, params)
  loss = jax.jit(objectives.loss, static_argnames=("model",))
  _, m = loss(huge, jax.random.key(0), jnp.ones((2, 4, 4, 3)), model=model)
  assert all(bool(jnp.isfinite(v)) for v in m.values())


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_bfloat16_compute_runs_the_layers_in_bfloat16_and_keeps_float32_elsewhere(arch):
  cfg = base_config().model
  cfg.arch, cfg.hidden, cfg.latent_dim, cfg.conv_channels = arch, (32,), 4, (8,)
  f32_model = models.make_model(cfg, (8, 8, 3))
  cfg.compute_dtype = "bfloat16"
  bf16_model = models.make_model(cfg, (8, 8, 3))
  params = models.init_params(bf16_model, jax.random.key(0), (8, 8, 3))
  same = models.init_params(f32_model, jax.random.key(0), (8, 8, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)))

  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 3))
  loss_fn = lambda p, model: objectives.loss(p, jax.random.key(2), x, model=model)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, bf16_model)[0]))(params)
  products = {"dot_general": [], "conv_general_dilated": []}

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in products:
        products[e.primitive.name].append(tuple(v.aval.dtype for v in e.invars))
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  # Every dense product, forward and both backward ones, except the gradient of the data that
  # enters the MLP, which nothing asks for; convolutions forward.
  dense = products["dot_general"]
  assert len(dense) == 3 * (2 * len(cfg.hidden) + 3) - (arch == "mlp")
  assert set(dense) == {(jnp.dtype(jnp.bfloat16),) * 2}
  convs = products["conv_general_dilated"]
  assert (arch == "mlp") == (not convs)
  assert sum(dtypes == (jnp.dtype(jnp.bfloat16),) * 2 for dtypes in convs) == 2 * len(cfg.conv_channels) * (arch == "conv")

  (bf16_loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(p, bf16_model),
                                                   has_aux=True)(params)
  f32_loss, _ = loss_fn(params, f32_model)
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  f32_grads = jax.grad(lambda p: loss_fn(p, f32_model)[0])(params)
  for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(f32_grads)):
    assert g.dtype == jnp.float32
    assert float(jnp.linalg.norm(g - g32)) < 3e-2 * float(jnp.linalg.norm(g32))
  # bfloat16 keeps 8 bits of mantissa: the loss agrees to well under a percent, not exactly.
  assert float(bf16_loss) == pytest.approx(float(f32_loss), rel=1e-2)
  assert float(bf16_loss) != float(f32_loss)
