"""Latent-space walks and every figure of a trained tiny run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_digits_config
from jaxvae import batching, evaluate, figure_data, figures, parallel, sample
from jaxvae import restore
from jaxvae import train as train_lib


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  config = tiny_digits_config(num_epochs=3)
  config.log.figures = True
  train_lib.train_and_evaluate(config, str(workdir))
  return workdir


# Digits have no factor labels, and a sweep is drawn from several runs.
ONE_RUN_FIGURES = [n for n in figures.FIGSIZES
                   if n not in figures.FACTOR_FIGURES + figures.SWEEP_FIGURES
                   + figures.TOP_DOWN_FIGURES]


def _pixels(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def test_training_draws_every_figure_at_its_declared_size(run_dir):
  for name in ONE_RUN_FIGURES:
    w, h = figures.FIGSIZES[name]
    pixels = _pixels(run_dir / "figures" / f"{name}.png")
    assert pixels.shape[:2] == (round(h * figures.DPI), round(w * figures.DPI)), name
    # Not blank: many grey levels (text, curves or decoded images), not one flat colour.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, name


def test_redrawing_from_the_checkpoint_overwrites_the_same_files(run_dir):
  run = restore.restore_run(str(run_dir))
  paths = figures.draw_training_figures(str(run_dir), run.model, run.params, run.dataset,
                                        run.config, run.keys.eval)
  # All but the data preview, which training draws once, at its start.
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(
      f"{n}.png" for n in ONE_RUN_FIGURES if n != "data")


def test_metrics_rows_carry_the_kl_per_dim_beside_the_tensorboard_scalars(run_dir):
  rows = figures.read_metrics(str(run_dir))
  assert all(len(r["test/kl_per_dim_nats"]) == 4 for r in rows)
  assert any((run_dir / "tensorboard").iterdir())  # the writer skipped the list, did not fail


def test_kl_per_dim_curve_skips_rows_logged_before_the_key(tmp_path):
  kl = np.random.default_rng(0).uniform(0, 3, (3, 12))  # more dims than the legend names
  rows = [{"epoch": 1, "step": 10}] + [
      {"epoch": e, "step": 10 * e, "test/kl_per_dim_nats": kl[e - 2].tolist()} for e in (2, 3, 4)]
  path = figures.plot_kl_per_dim_training(rows, str(tmp_path), "old")
  assert _pixels(path).shape[:2] == (450, 1000)


def test_ssim_curve_reads_runs_logged_before_the_mean_and_draw_keys(tmp_path):
  rows = [{"epoch": e, "test/ssim": 0.1 * e} for e in (1, 2)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  path = figures.plot_ssim(figures.read_metrics(str(tmp_path)), str(tmp_path), "old")
  assert _pixels(path).shape[:2] == (450, 700)


def test_lerp_and_slerp_run_from_a_to_b():
  a = jax.random.normal(jax.random.key(0), (3, 16))
  b = jax.random.normal(jax.random.key(1), (3, 16))
  for fn in (sample.lerp, sample.slerp):
    path = fn(a, b, 7)
    assert path.shape == (3, 7, 16)
    np.testing.assert_allclose(path[:, 0], a, atol=1e-5)
    np.testing.assert_allclose(path[:, -1], b, atol=1e-5)
  np.testing.assert_allclose(sample.lerp(a, b, 3)[:, 1], (a + b) / 2, atol=1e-6)


def test_slerp_keeps_the_norm_of_equal_norm_ends_where_lerp_shrinks_it():
  a = jnp.array([[3.0, 0.0, 0.0]])
  b = jnp.array([[0.0, 0.0, 3.0]])
  norms = np.linalg.norm(sample.slerp(a, b, 5), axis=-1)
  np.testing.assert_allclose(norms, 3.0, rtol=1e-5)
  assert np.linalg.norm(sample.lerp(a, b, 5)[0, 2]) == pytest.approx(3 / math.sqrt(2), rel=1e-5)
  # The midpoint lies on the arc at 45 degrees.
  np.testing.assert_allclose(sample.slerp(a, b, 3)[0, 1], [3 / math.sqrt(2), 0, 3 / math.sqrt(2)],
                             rtol=1e-5)
  # Parallel ends: no division by zero, the line itself.
  np.testing.assert_allclose(sample.slerp(a, 2 * a, 3)[0, 1], 1.5 * a[0], rtol=1e-5)


def test_traversal_changes_only_the_traversed_dim():
  z = jnp.arange(5.0)
  grid = sample.traversal(z, [3, 0], [-1.0, 0.5])
  assert grid.shape == (2, 2, 5)
  np.testing.assert_array_equal(grid[0, :, 3], [-1.0, 0.5])
  np.testing.assert_array_equal(grid[1, :, 0], [-1.0, 0.5])
  np.testing.assert_array_equal(np.delete(np.asarray(grid[0]), 3, axis=1), [[0, 1, 2, 4]] * 2)


def test_image_grid_places_images_row_by_row():
  images = np.stack([np.full((2, 3, 1), i / 4) for i in range(5)]).astype(np.float32)
  grid = sample.image_grid(images, cols=3, zoom=2)
  # Tiles of 2x3 zoomed to 4x6, 2-pixel white lines between: 2 rows, 3 columns.
  assert grid.shape == (2 * 6 - 2, 3 * 8 - 2, 1) and grid.dtype == np.uint8
  assert grid[0, 0, 0] == 0 and grid[0, 8, 0] == 64 and grid[6, 0, 0] == 191
  np.testing.assert_array_equal(grid[6:10, 8:14], 255)  # image 4 = 1.0
  np.testing.assert_array_equal(grid[4:6], 255)  # the line between the rows
  assert grid[-1, -1, 0] == 0  # the unused sixth cell is black


def test_interpolation_pairs_cross_classes():
  labels = np.array([0, 0, 0, 1, 2, 2])
  pairs = figure_data.pairs(labels, 50, jax.random.key(0))
  assert np.all(labels[pairs[:, 0]] != labels[pairs[:, 1]])


def test_shown_images_visit_every_class_of_a_sorted_split():
  labels = np.repeat(np.arange(4), 5)  # stored sorted by class, as the image-folder loader does
  shown = figure_data.spread(labels, 6)
  np.testing.assert_array_equal(labels[shown], [0, 1, 2, 3, 0, 1])
  assert len(set(shown.tolist())) == 6


def test_drawing_again_reuses_the_compiled_encoder_pass(run_dir):
  """The figures' pass over the test split compiles once per run, not once per drawing."""
  run = restore.restore_run(str(run_dir))
  mesh, images = parallel.make_mesh(local=True), run.dataset.test.images
  args = (run.model, run.params, images, run.keys.eval, run.config.data.binarize,
          run.config.eval.batch_size, mesh, "scan")
  batched = batching.Batched(images, run.config.eval.batch_size, mesh, "scan")
  program = evaluate._posterior_program(run.model, run.config.data.binarize, "scan",
                                        batched.sharding, -1)
  first = evaluate.posterior_stats(*args)
  compiled = program._cache_size()
  second = evaluate.posterior_stats(*args)
  assert compiled >= 1 and program._cache_size() == compiled  # the second call compiled nothing
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_the_comparison_draws_each_runs_training_terms_with_their_signs(tmp_path):
  vae_gan = [{"step": s, "test/elbo_nats": -9.0, "train/kl_nats": 3.0 + s,
              "train/log_lik_nats": -8.0, "train/llike": 5.0, "train/disc_loss": 0.5}
             for s in (10, 20)]
  gan = [{"step": s, "test/elbo_nats": -9.0, "train/disc_loss": 0.7} for s in (10, 20)]
  terms = figures.loss_terms(vae_gan)
  assert list(terms) == ["KL", "pixel -log p(x|z)", "feature term", "D's loss"]
  np.testing.assert_array_equal(terms["KL"], [13.0, 23.0])
  np.testing.assert_array_equal(terms["pixel -log p(x|z)"], [8.0, 8.0])  # -log p, positive
  assert list(figures.loss_terms(gan)) == ["D's loss"]
  path = figures.plot_compare_training({"vae_gan": vae_gan, "gan": gan}, str(tmp_path))
  with Image.open(path) as im:
    assert im.size == tuple(round(v * figures.DPI) for v in figures.FIGSIZES["compare_training"])
