"""Evaluation metrics against closed forms, scikit-image, and a trained tiny model."""

import functools
import math

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import convolutions_in_loops, tiny_conv_config, tiny_digits_config
from jaxvae import baselines, data, distributions, evaluate, metrics, models, parallel, report
from jaxvae.objectives import iwae as iwae_lib
from jaxvae import restore
from jaxvae import train as train_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny digits VAE trained for a few epochs, restored from its workdir."""
  workdir = tmp_path_factory.mktemp("digits")
  train_lib.train_and_evaluate(tiny_digits_config(num_epochs=6), str(workdir))
  return restore.restore_run(str(workdir))


# ----------------------------------------------------------------------------- IWAE


def test_iwae_is_at_least_the_elbo_and_rises_with_k(trained):
  mesh = parallel.make_mesh()
  run = trained
  elbo = evaluate.Evaluator(run.model, run.config, run.dataset.test, mesh)(run.params,
                                                                          run.keys.eval)
  bounds = {k: evaluate.iwae_on_split(run.model, run.params, run.config, run.dataset.test,
                                      mesh, run.keys.eval, k)
            for k in (1, 10, 100, 400)}
  iwae = [bounds[k]["iwae"] for k in sorted(bounds)]
  # K = 1 is itself an unbiased ELBO estimate: within Monte Carlo noise of the analytic-KL one.
  assert iwae[0] == pytest.approx(elbo["elbo_nats"], abs=0.5)
  assert all(b > elbo["elbo_nats"] for b in iwae[1:])
  assert all(a < b for a, b in zip(iwae, iwae[1:])), iwae
  for k, b in bounds.items():  # the K-draw ELBO of the same draws stays at the ELBO
    assert b["iwae"] >= b["elbo"]
    assert b["elbo"] == pytest.approx(elbo["elbo_nats"], abs=0.5)


def test_iwae_chunks_fold_into_one_logsumexp(trained):
  # K = 10 drawn 4 at a time: 3 chunks, the last one's 2 surplus draws must count for nothing.
  run = trained
  x = data.to_unit_interval(run.dataset.test.images[:5], None, "threshold")
  key = jax.random.key(3)
  out = iwae_lib.iwae_bound(run.params, key, x, model=run.model, num_samples=10,
                              chunk_size=4)
  mean, log_scale = run.model.apply(run.params, x, method=models.VAE.encode)
  log_w = []
  for i in range(3):
    z = distributions.sample_diag_gaussian(jax.random.fold_in(key, i), mean, log_scale, 4)
    for z_k in z:
      obs = run.model.apply(run.params, z_k, method=models.VAE.decode)
      log_w.append(distributions.log_likelihood("bernoulli", x, obs)
                   + distributions.standard_normal_log_prob(z_k)
                   - distributions.diag_gaussian_log_prob(z_k, mean, log_scale))
  log_w = np.asarray(jnp.stack(log_w[:10]), np.float64)
  expected = np.log(np.mean(np.exp(log_w - log_w.max(0)), axis=0)) + log_w.max(0)
  np.testing.assert_allclose(out["iwae"], expected, rtol=1e-5)
  np.testing.assert_allclose(out["elbo"], log_w.mean(0), rtol=1e-5)
  assert np.all(np.asarray(out["iwae"]) >= np.asarray(out["elbo"]))


def test_unrolled_iwae_has_no_convolution_in_a_loop_and_the_same_bound():
  image_shape = (8, 8, 1)
  model = models.make_model(tiny_conv_config().model, image_shape)
  params = models.init_params(model, jax.random.key(0), image_shape)
  x = jax.random.uniform(jax.random.key(1), (5,) + image_shape)
  compiled = {unroll: jax.jit(functools.partial(
      iwae_lib.iwae_bound, model=model, num_samples=10, chunk_size=4, unroll=unroll)).lower(
          params, jax.random.key(2), x).compile() for unroll in (False, True)}
  assert convolutions_in_loops(compiled[False].as_text())
  assert convolutions_in_loops(compiled[True].as_text()) == []
  scanned, unrolled = (compiled[u](params, jax.random.key(2), x) for u in (False, True))
  for k in ("iwae", "elbo"):
    np.testing.assert_allclose(unrolled[k], scanned[k], rtol=1e-6)


def _ppca_vae(scales, sigma, offset, image_shape):
  """A VAE with a linear decoder x = W z + b + sigma * eps and a linear Gaussian encoder whose
  posterior is exact: W has orthogonal columns of norms `scales`, so the true posterior
  N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I, is diagonal. Returns (model,
  params, W, b)."""
  d, k = int(np.prod(image_shape)), len(scales)
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, k)))
  w = q * np.asarray(scales)[None, :]                          # [D, K]
  m = np.asarray(scales) ** 2 + sigma ** 2                      # diag of M
  model = models.VAE(models.MLPEncoder((), k), models.MLPDecoder((), image_shape), image_shape,
                     "gaussian", "fixed", sigma, decoder_mean="identity")
  params = models.init_params(model, jax.random.key(0), image_shape)
  p = params["params"]
  bound = model.log_scale_bound
  log_scale = 0.5 * np.log(sigma ** 2 / m)
  p["decoder"]["Dense_0"] = {"kernel": jnp.asarray(w.T, jnp.float32),
                             "bias": jnp.asarray(offset, jnp.float32)}
  p["encoder"]["mean"] = {"kernel": jnp.asarray(w / m, jnp.float32),
                          "bias": jnp.asarray(-(offset @ w) / m, jnp.float32)}
  p["encoder"]["log_scale"] = {  # soft_clamp(raw) = log_scale
      "kernel": jnp.zeros((d, k)), "bias": jnp.asarray(bound * np.arctanh(log_scale / bound),
                                                       jnp.float32)}
  return model, params, w


def test_iwae_approaches_the_exact_marginal_of_a_linear_gaussian_model():
  image_shape, sigma = (3, 2, 1), 0.5
  offset = np.linspace(-0.5, 0.5, 6)
  model, params, w = _ppca_vae([2.0, 1.0], sigma, offset, image_shape)
  x = np.random.default_rng(1).normal(size=(32, 6)) * 1.5
  exact = stats.multivariate_normal(offset, w @ w.T + sigma ** 2 * np.eye(6)).logpdf(x)
  x = jnp.asarray(x.reshape((32,) + image_shape), jnp.float32)
  bound = lambda params, k: np.asarray(iwae_lib.iwae_bound(
      params, jax.random.key(k), x, model=model, num_samples=k, chunk_size=1000)["iwae"])
  # The exact posterior makes every weight equal p(x): one sample is already exact.
  np.testing.assert_allclose(bound(params, 1), exact, atol=2e-4)
  # A wrong posterior (shifted, too wide): the bound starts far below log p(x) and closes in.
  params["params"]["encoder"]["mean"]["bias"] += 0.8
  params["params"]["encoder"]["log_scale"]["bias"] += 0.7
  gaps = [float(np.mean(exact - bound(params, k))) for k in (1, 10, 100, 1000, 10000)]
  assert gaps[0] > 0.5
  assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
  # At K = 10^4 the estimate is within Monte Carlo noise of log p(x) (it may land just above).
  assert abs(gaps[-1]) < 0.01, gaps


# ----------------------------------------------------------------------------- bits/dim


def _constant_model(likelihood, image_shape):
  """Zero parameters: q(z|x) = N(0, I) = p(z) (KL 0) and a decoder output of 0 everywhere
  (Bernoulli p = 1/2; Gaussian mean sigmoid(0) = 1/2 with sigma sqrt(1/2))."""
  config = tiny_digits_config()
  config.model.likelihood = likelihood
  config.data.binarize = "none" if likelihood == "gaussian" else "dynamic"
  model = models.make_model(config.model, image_shape)
  params = jax.tree.map(jnp.zeros_like, models.init_params(model, jax.random.key(0), image_shape))
  return config, model, params


def test_bits_per_dim_of_a_fair_coin_decoder_is_one():
  # Bernoulli(1/2) per pixel and q = p: log p(x) = -D ln 2 for every image, exactly 1 bit/dim.
  image_shape = (8, 8, 1)
  config, model, params = _constant_model("bernoulli", image_shape)
  images = np.random.default_rng(0).integers(0, 256, (40,) + image_shape, dtype=np.uint8)
  split, mesh = data.Split(images, np.zeros(40, np.int32)), parallel.make_mesh()
  out = evaluate.Evaluator(model, config, split, mesh)(params, jax.random.key(0))
  assert out["elbo_nats"] == pytest.approx(-64 * math.log(2), rel=1e-6)
  assert out["bits_per_dim"] == pytest.approx(1.0, rel=1e-6)
  iw = evaluate.iwae_on_split(model, params, config, split, mesh, jax.random.key(0), 7)
  assert float(distributions.bits_per_dim(iw["iwae"], 64)) == pytest.approx(1.0, rel=1e-6)


def test_bits_per_dim_of_a_gaussian_decoder_uses_the_binned_probability():
  # Decoder N(1/2, 1/2) for every pixel; an image of level 100 everywhere has probability
  # Phi((100.5/255 - 1/2) / sigma) - Phi((99.5/255 - 1/2) / sigma) per pixel.
  image_shape = (8, 8, 1)
  config, model, params = _constant_model("gaussian", image_shape)
  images = np.full((5,) + image_shape, 100, np.uint8)
  sigma = math.sqrt(0.5)
  per_pixel = (stats.norm.cdf((100.5 / 255 - 0.5) / sigma)
               - stats.norm.cdf((99.5 / 255 - 0.5) / sigma))
  expected_bits = -math.log2(per_pixel)  # about 8.2: a broad Gaussian is nearly uniform
  out = evaluate.Evaluator(model, config, data.Split(images, np.zeros(5, np.int32)),
                           parallel.make_mesh(), full=True)(params, jax.random.key(0))
  assert out["bits_per_dim"] == pytest.approx(expected_bits, rel=1e-5)
  assert out["elbo_discrete_nats"] == pytest.approx(64 * math.log(per_pixel), rel=1e-5)
  # The continuous density is a different number (a density exceeds 1 here: positive nats).
  assert out["elbo_nats"] == pytest.approx(
      64 * stats.norm.logpdf(100 / 255, 0.5, sigma), rel=1e-5)


def test_discrete_log_likelihood_is_the_binned_law_whatever_the_scale_shape():
  k = jax.random.split(jax.random.key(0), 3)
  x = jnp.round(jax.random.uniform(k[0], (3, 4, 5, 3)) * 255) / 255
  mean = jax.random.uniform(k[1], x.shape)
  per_pixel = jax.random.normal(k[2], x.shape[1:]) - 2  # learned_pixel: one scale per pixel
  for log_scale in (jnp.float32(-2.0), per_pixel):
    obs = {"mean": mean, "log_scale": log_scale}
    np.testing.assert_allclose(
        evaluate.discrete_log_likelihood("gaussian", x, obs),
        distributions.discretized_gaussian_log_prob(x, mean, log_scale), rtol=1e-6)
  obs = {"mean": mean, "log_scale": jnp.broadcast_to(per_pixel, x.shape)}
  np.testing.assert_allclose(evaluate.discrete_log_likelihood("discretized_logistic", x, obs),
                             distributions.log_likelihood("discretized_logistic", x, obs),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- SSIM


def _smooth_images(n, h, w, c, seed=0):
  """Images with structure (sums of random sinusoids) in [0, 1]: f32[n, h, w, c]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  out = np.zeros((n, h, w, c))
  for _ in range(4):
    f = rng.uniform(0.1, 0.6, (n, 1, 1, c, 2))
    phase = rng.uniform(0, 6, (n, 1, 1, c))
    out += np.sin(f[..., 0] * yy[None, ..., None] + f[..., 1] * xx[None, ..., None] + phase)
  return ((out - out.min()) / (out.max() - out.min())).astype(np.float32)


@pytest.mark.parametrize("metric", [metrics.ssim, metrics.paper_ssim])
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_ssim_is_one_for_identical_images_and_falls_with_noise(metric, shape):
  x = jnp.asarray(_smooth_images(4, *shape))
  np.testing.assert_allclose(metric(x, x), 1.0, atol=1e-5)
  previous = np.ones(4)
  for level in (0.05, 0.1, 0.2, 0.4):
    noise = jax.random.normal(jax.random.key(0), x.shape)
    score = np.asarray(metric(x, jnp.clip(x + level * noise, 0, 1)))
    assert np.all(score < previous), (level, score, previous)
    previous = score


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_ssim_outside_a_loop_is_dm_pix_ssim_with_its_own_convolutions(shape):
  x = jnp.asarray(_smooth_images(3, *shape, seed=3))
  y = jnp.clip(x + 0.15 * jax.random.normal(jax.random.key(4), x.shape), 0, 1)
  size, sigma = metrics.ssim_filter(*shape[:2])
  convolved = dm_pix.ssim(x, y, max_val=1.0, filter_size=size, filter_sigma=sigma)
  np.testing.assert_array_equal(metrics.ssim(x, y, in_loop=True), convolved)
  np.testing.assert_allclose(metrics.ssim(x, y), convolved, atol=1e-5)


def test_paper_ssim_matches_scikit_image_with_its_old_defaults():
  skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is not installed "
                                        "(a test-only comparison; pip install scikit-image)")
  for shape in ((8, 8, 1), (28, 28, 1), (32, 32, 3)):
    x = _smooth_images(3, *shape, seed=1)
    y = np.clip(x + 0.15 * np.random.default_rng(2).normal(size=x.shape), 0, 1).astype(np.float32)
    ours = np.asarray(metrics.paper_ssim(jnp.asarray(x), jnp.asarray(y)))
    theirs = [skimage_metrics.structural_similarity(a, b, win_size=7, data_range=2,
                                                    channel_axis=-1) for a, b in zip(x, y)]
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_paper_ssim_refuses_images_smaller_than_its_window():
  x = jnp.zeros((1, 6, 6, 1))
  with pytest.raises(ValueError, match="7x7"):
    metrics.paper_ssim(x, x)


# ----------------------------------------------------------------------------- latents


def test_active_units_counts_a_planted_collapsed_dimension():
  rng = np.random.default_rng(0)
  means = rng.normal(size=(500, 5))
  means[:, 2] = 0.3 + 0.01 * rng.normal(size=500)  # variance 1e-4: collapsed
  count, variance = metrics.active_units(means)
  assert count == 4
  assert variance[2] < metrics.ACTIVE_UNIT_THRESHOLD < np.delete(variance, 2).min()


def test_collapsing_a_trained_dimension_removes_one_active_unit(trained):
  run, mesh = trained, parallel.make_mesh()
  stats_of = lambda params: evaluate.posterior_stats(
      run.model, params, run.dataset.test.images, run.keys.eval, run.config.data.binarize, 100,
      mesh, "scan")
  means, kl = stats_of(run.params)
  count, _ = metrics.active_units(means)
  j = int(np.argmax(kl.mean(0)))
  # Both heads of dim j output 0 for every input: q(z_j|x) = N(0, 1), the prior.
  params = jax.tree.map(lambda v: v, run.params)
  for head in ("mean", "log_scale"):
    layer = params["params"]["encoder"][head]
    layer["kernel"] = layer["kernel"].at[:, j].set(0.0)
    layer["bias"] = layer["bias"].at[j].set(0.0)
  collapsed_means, collapsed_kl = stats_of(params)
  assert metrics.active_units(collapsed_means)[0] == count - 1
  assert np.all(collapsed_kl[:, j] == 0)
  np.testing.assert_array_equal(np.delete(collapsed_kl, j, 1), np.delete(kl, j, 1))


@pytest.mark.parametrize("loop", ["scan", "per_step"])
def test_binarization_does_not_depend_on_the_batching(trained, loop):
  # Each image's binarization is keyed by its index, so any eval batch size sees the same x.
  run, mesh = trained, parallel.make_mesh()
  means = [evaluate.posterior_stats(run.model, run.params, run.dataset.test.images,
                                    run.keys.eval, "dynamic", b, mesh, loop)[0] for b in (297, 64)]
  np.testing.assert_allclose(means[0], means[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- PCA


def test_pca_matches_scikit_learn_and_is_exact_at_full_rank():
  from sklearn.decomposition import PCA as SkPCA
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(300, 3)) @ rng.normal(size=(3, 12)) * 4
       + rng.normal(size=(300, 12)) * 0.1).astype(np.float32)
  ours = baselines.fit_pca(x, 3, chunk=64)  # chunked accumulation across uneven chunks
  theirs = SkPCA(3).fit(x)
  np.testing.assert_allclose(np.abs(ours.components @ theirs.components_.T), np.eye(3), atol=1e-4)
  np.testing.assert_allclose(ours.variance, theirs.explained_variance_ * 299 / 300, rtol=1e-4)
  np.testing.assert_allclose(ours.reconstruct(x), theirs.inverse_transform(theirs.transform(x)),
                             atol=1e-3)
  full = baselines.fit_pca(x, 50)  # k capped at D = 12: reconstruction is the identity
  assert full.components.shape == (12, 12) and full.explained_fraction == pytest.approx(1.0)
  np.testing.assert_allclose(full.reconstruct(x), x, atol=1e-3)


def test_pca_baseline_improves_with_k():
  ds = data.load(tiny_digits_config().data)
  scores = [baselines.pca_baseline(ds.train.images, ds.test.images, k, 100) for k in (2, 8, 64)]
  assert [s["k"] for s in scores] == [2, 8, 64]
  assert scores[0]["recon_mse"] > scores[1]["recon_mse"] > scores[2]["recon_mse"]
  assert scores[0]["recon_ssim"] < scores[1]["recon_ssim"] < scores[2]["recon_ssim"]
  assert scores[2]["recon_mse"] < 1e-9 and scores[2]["paper_protocol_ssim"] == pytest.approx(1.0)


def test_pca_baseline_fits_on_a_random_subset_of_a_large_split(monkeypatch):
  ds = data.load(tiny_digits_config().data)
  # Sorted by class, as dSprites' grid is by factor: the first 400 rows alone would miss classes.
  train = ds.train.images[np.argsort(ds.train.labels, kind="stable")]
  fitted, fit = [], baselines.fit_pca
  monkeypatch.setattr(baselines, "fit_pca", lambda rows, *a, **kw: fitted.append(rows) or fit(
      rows, *a, **kw))
  full = baselines.pca_baseline(train, ds.test.images, 8, 100)
  monkeypatch.setattr(baselines, "PCA_FIT_IMAGES", 400)
  subset = baselines.pca_baseline(train, ds.test.images, 8, 100)
  assert [len(rows) for rows in fitted] == [len(train), 400]
  row_of = {row.tobytes(): i for i, row in enumerate(train.reshape(len(train), -1))}
  picked = [row_of[row.tobytes()] for row in fitted[1]]
  assert len(set(picked)) == 400 and picked == sorted(picked)  # without replacement, in order
  assert len(set(ds.train.labels[np.argsort(ds.train.labels, kind="stable")][picked])) == 10
  assert subset["recon_mse"] == pytest.approx(full["recon_mse"], rel=0.1)


# ----------------------------------------------------------------------------- the whole run


def test_evaluator_is_deterministic_given_the_key(trained):
  run = trained
  evaluator = evaluate.Evaluator(run.model, run.config, run.dataset.test, parallel.make_mesh())
  first = evaluator(run.params, run.keys.eval)
  assert evaluator(run.params, run.keys.eval) == first
  assert evaluator(run.params, jax.random.key(99))["elbo_nats"] != first["elbo_nats"]


def test_per_step_evaluation_matches_the_scanned_one(trained):
  run, mesh = trained, parallel.make_mesh()
  out = {}
  for loop in ("scan", "per_step"):
    config = run.config.copy_and_resolve_references()
    config.loop_mode = loop
    evaluator = evaluate.Evaluator(run.model, config, run.dataset.test, mesh)
    out[loop] = evaluator(run.params, run.keys.eval), evaluate.iwae_on_split(
        run.model, run.params, config, run.dataset.test, mesh, run.keys.eval, 9)
    assert evaluator.cache_size() == 1
  # The same up to float rounding (SSIM's window runs as convolutions in a loop only).
  per_step, scan = out["per_step"][0], out["scan"][0]
  assert per_step.keys() == scan.keys()
  for k in scan:
    assert np.asarray(per_step[k]) == pytest.approx(np.asarray(scan[k]), rel=1e-5), k
  assert out["per_step"][1] == pytest.approx(out["scan"][1], rel=1e-6)


def test_evaluate_run_labels_every_number(trained):
  first = evaluate.evaluate_run(trained, iw_samples=50, name="tiny")
  vae = first["vae"]
  assert vae["iwae_nats"] > vae["elbo_nats"]
  assert vae["iwae_bits_per_dim"] < vae["bits_per_dim"]
  assert vae["iwae_bits_per_dim"] == pytest.approx(-vae["iwae_nats"] / (64 * math.log(2)))
  assert first["pca"]["k"] == trained.config.model.latent_dim
  assert len(first["kl_per_dim_nats"]) == trained.config.model.latent_dim
  assert sum(first["kl_per_dim_nats"]) == pytest.approx(vae["kl_nats"], rel=1e-4)
  described = first["estimators"]
  for key in vae:
    assert key in described or any(
        pattern.strip("*") in key for pattern in described if "*" in pattern), key
  table = report.format_table(first)
  assert "PCA k=4" in table and "IWAE K=50" in table and "paper protocol" in table
