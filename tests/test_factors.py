"""A tiny dSprites run end to end: MIG and DCI in eval.json, traversals labelled by factor (PNG
and GIF), the KL of each latent dim over training, and the sweep figure of several runs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_sprites_config
from jaxvae import baselines, evaluate, figure_data, figures, metrics, report, sprites
from jaxvae import restore
from jaxvae import train as train_lib

LATENTS = 5


@pytest.fixture(scope="module")
def traversals_drawn():
  """What training passed to `figures.plot_factor_traversals`: [(grid, row labels)]."""
  return []


@pytest.fixture(scope="module")
def sprites_run(tmp_path_factory, traversals_drawn):
  workdir = tmp_path_factory.mktemp("sprites")
  draw = figures.plot_factor_traversals
  with pytest.MonkeyPatch.context() as patch:  # watched, not replaced: the figures are drawn
    patch.setattr(figures, "plot_factor_traversals", lambda grid, labels, *args: (
        traversals_drawn.append((grid, labels)) or draw(grid, labels, *args)))
    train_lib.train_and_evaluate(tiny_sprites_config(), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def evaluated(sprites_run):
  """WORKDIR/eval.json as the evaluate command writes it, and its printed report; all but the
  PCA baseline, whose eigendecomposition of 4,096 pixels takes a minute on 2 cores (it has
  tests of its own)."""
  run = restore.restore_run(str(sprites_run))
  no_pca = lambda train, test, k, batch_size: {"k": k, "recon_ssim": 0.0, "recon_psnr_db": 0.0,
                                               "recon_mse": 0.0}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(baselines, "pca_baseline", no_pca)
    result = evaluate.evaluate_run(run, iw_samples=3, name="sprites")
  (sprites_run / "eval.json").write_text(json.dumps(result, indent=2))
  return json.loads((sprites_run / "eval.json").read_text()), report.report(result)


def _pixels(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def test_eval_json_holds_mig_and_dci_of_all_five_factors(evaluated):
  result, printed = evaluated
  factors = result["factors"]
  names = list(sprites.FACTOR_NAMES)
  assert list(factors["per_factor"]) == names and list(factors["mig_per_factor"]) == names
  assert 0 <= factors["mig"] <= 1
  for key in ("dci_disentanglement", "dci_completeness", "dci_informativeness_test"):
    assert 0 <= factors[key] <= 1, key
  assert np.shape(factors["mutual_info_nats"]) == (LATENTS, 5)
  # 1,000 train-split images: the protocol's 10,000 + 5,000 points cut 2:1.
  assert (factors["num_points"], factors["num_test"]) == (666, 334)
  assert "1000 of the 1000 train-split images" in factors["estimators"]["codes"]
  assert "disentanglement_lib protocol" in factors["estimators"]["mig"]
  assert result["seconds"]["factors"] > 0
  assert "kl_per_dim_nats" not in result["vae"] and len(result["kl_per_dim_nats"]) == LATENTS
  assert f"MIG {factors['mig']:.4f}" in printed and "factor metrics: posterior means" in printed
  assert all(f"\n{name} " in printed for name in names)


def test_factor_sample_is_the_protocol_or_the_whole_split_cut_two_to_one():
  assert evaluate.factor_sample_sizes(sprites.NUM_IMAGES) == (10_000, 5_000)
  assert evaluate.factor_sample_sizes(15_000) == (10_000, 5_000)
  assert evaluate.factor_sample_sizes(300) == (200, 100)


def test_every_evaluation_logs_the_kl_of_each_latent_dim(sprites_run):
  rows = figures.read_metrics(str(sprites_run))
  assert [r["step"] for r in rows] == [10, 20]
  for r in rows:
    kl = r["test/kl_per_dim_nats"]
    assert len(kl) == LATENTS and all(isinstance(v, float) and v >= 0 for v in kl)
    assert sum(kl) == pytest.approx(r["test/kl_nats"], rel=1e-4)


def test_training_draws_the_factor_figures(sprites_run):
  out = sprites_run / "figures"
  for name, (w, h) in figures.FIGSIZES.items():
    if (name in figures.SWEEP_FIGURES + figures.TOP_DOWN_FIGURES
        or name == "factor_traversals_animated"):
      continue
    pixels = _pixels(out / f"{name}.png")
    assert pixels.shape[:2] == (round(h * figures.DPI), round(w * figures.DPI)), name
  w, h = figures.FIGSIZES["factor_traversals_animated"]
  with Image.open(out / "factor_traversals_animated.gif") as gif:
    assert gif.n_frames == len(figure_data.FACTOR_TRAVERSAL_VALUES)
    assert gif.size == (round(w * figures.DPI), round(h * figures.DPI))
    assert gif.info["loop"] == 0
    frames = []
    for i in (0, gif.n_frames - 1):
      gif.seek(i)
      frames.append(np.asarray(gif.convert("L")))
  assert frames[0].std() > 5 and not np.array_equal(*frames)


def test_traversal_rows_are_the_dims_by_kl_labelled_with_eval_json_mutual_info(
    traversals_drawn, evaluated):
  (grid, labels), = traversals_drawn  # drawn once, at the end of training
  assert grid.shape == (LATENTS, len(figure_data.FACTOR_TRAVERSAL_VALUES), 64, 64, 1)
  result = evaluated[0]
  kl, mi = np.array(result["kl_per_dim_nats"]), np.array(result["factors"]["mutual_info_nats"])
  variance = np.array(result["posterior_mean_variance"])
  for label, d in zip(labels, np.argsort(kl)[::-1]):
    assert label.startswith(f"z{d}  KL {kl[d]:.2f}\n"), (label, d)
    f = int(np.argmax(mi[d]))
    expected = (f"{sprites.FACTOR_NAMES[f]} (MI {mi[d, f]:.2f} nats)"
                if variance[d] > metrics.ACTIVE_UNIT_THRESHOLD else "\u2014")
    assert label.endswith(expected), (label, expected)


def test_factor_labels_name_the_most_informative_factor_or_a_dash():
  mi = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.3]])
  labels = figure_data.factor_labels(mi, np.array([True, True, False]), ("shape", "scale"))
  assert labels == ["scale (MI 0.90 nats)", "shape (MI 0.50 nats)", "\u2014"]


def _fake_run(source, target, beta, kind=None, with_eval=True):
  """A copy of run `source` whose config.json says objective.beta = beta (and objective.kind)."""
  target.mkdir()
  config = json.loads((source / "config.json").read_text())
  config["objective"]["beta"] = beta
  if kind:
    config["objective"]["kind"] = kind
  (target / "config.json").write_text(json.dumps(config))
  shutil.copy(source / "metrics.jsonl", target)
  if with_eval:
    shutil.copy(source / "eval.json", target)
  return target


def test_sweep_command_draws_rate_distortion_and_mig_against_beta(sprites_run, evaluated,
                                                                   tmp_path):
  runs = [_fake_run(sprites_run, tmp_path / "b1", 1.0),
          _fake_run(sprites_run, tmp_path / "b4", 4.0),
          _fake_run(sprites_run, tmp_path / "cap", 1.0, kind="capacity"),
          _fake_run(sprites_run, tmp_path / "logged", 0.5, with_eval=False)]
  result = evaluated[0]
  read = [figures.read_sweep_run(str(r)) for r in runs]
  assert [(r["beta"], r["kind"]) for r in read] == [(1.0, "elbo"), (4.0, "elbo"),
                                                    (1.0, "capacity"), (0.5, "elbo")]
  assert read[0]["mig"] == result["factors"]["mig"] and read[3]["mig"] is None
  assert read[0]["rate"] == result["vae"]["kl_nats"]
  assert read[3]["rate"] == figures.read_metrics(str(sprites_run))[-1]["test/kl_nats"]
  done = subprocess.run(
      [sys.executable, "-m", "jaxvae.figures", "--sweep", ",".join(map(str, runs)), "--out",
       str(tmp_path / "out")], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
      capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  path = tmp_path / "out" / "sweep.png"
  assert f"wrote {path}" in done.stdout
  w, h = figures.FIGSIZES["sweep"]
  assert _pixels(path).shape[:2] == (round(h * figures.DPI), round(w * figures.DPI))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    figures.read_sweep_run(str(tmp_path / "out"))
