"""`python -m jaxvae.{evaluate,figures,sample}` end to end on a tiny trained digits run."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_digits_config
from jaxvae import figures
from jaxvae import train as train_lib

EPOCHS = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  train_lib.train_and_evaluate(tiny_digits_config(num_epochs=EPOCHS), str(workdir))
  return workdir


def _command(*args) -> str:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_evaluate_prints_the_table_and_writes_eval_json(run_dir):
  out = _command("jaxvae.evaluate", "--workdir", str(run_dir), "--iw_samples", "30")
  result = json.loads((run_dir / "eval.json").read_text())
  assert result["epoch"] == EPOCHS and result["iw_samples"] == 30
  vae, pca = result["vae"], result["pca"]
  assert vae["iwae_nats"] > vae["elbo_nats"] and 0 < vae["iwae_bits_per_dim"] < vae["bits_per_dim"]
  assert 0 <= vae["active_units"] <= 4 and pca["k"] == 4
  # The table shows what eval.json holds, VAE beside PCA.
  assert f"{vae['iwae_nats']:.4f}" in out and f"{pca['recon_ssim']:.4f}" in out
  assert "PCA k=4" in out and "paper protocol" in out and "IWAE K=30" in out
  # The last per-epoch row was scored with the same key: the command reproduces its ELBO.
  last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
  assert vae["elbo_nats"] == pytest.approx(last["test/elbo_nats"], rel=1e-5)


def test_figures_redraws_every_figure(run_dir):
  shutil.rmtree(run_dir / "figures", ignore_errors=True)  # training drew none (log.figures)
  out = _command("jaxvae.figures", "--workdir", str(run_dir))
  for name, (w, h) in figures.FIGSIZES.items():
    # dSprites only; several runs; the data preview, drawn once when training starts
    skipped = figures.FACTOR_FIGURES + figures.SWEEP_FIGURES + figures.TOP_DOWN_FIGURES
    if name in skipped + ("data",):
      continue
    path = run_dir / "figures" / f"{name}.png"
    assert str(path) in out
    with Image.open(path) as im:
      assert im.size == (round(w * figures.DPI), round(h * figures.DPI)), name
      assert np.asarray(im.convert("L")).std() > 5, name  # not a blank page


def test_sample_writes_a_grid_of_prior_samples(run_dir, tmp_path):
  grids = {}
  for temperature in ("0", "1"):
    path = tmp_path / f"t{temperature}.png"
    _command("jaxvae.sample", "--workdir", str(run_dir), "--num", "10", "--out", str(path),
             "--temperature", temperature, "--zoom", "2")
    with Image.open(path) as im:
      grids[temperature] = np.asarray(im)
  # 10 samples of 8x8 at zoom 2: 4 columns x 3 rows of 16x16 tiles 2 pixels apart, greyscale.
  cols, rows = math.ceil(math.sqrt(10)), 3
  assert grids["1"].shape == (rows * 18 - 2, cols * 18 - 2)
  tiles = lambda g: [g[18 * (i // cols):18 * (i // cols) + 16, 18 * (i % cols):18 * (i % cols) + 16]
                     for i in range(10)]
  # Temperature 0 decodes z = 0 ten times; temperature 1 draws ten different z.
  assert all(np.array_equal(t, tiles(grids["0"])[0]) for t in tiles(grids["0"]))
  assert len({t.tobytes() for t in tiles(grids["1"])}) == 10


@pytest.mark.parametrize("args,message", [
    (["jaxvae.sample", "--workdir", "/no/such/dir", "--out", "x.png"],
     "error: /no/such/dir holds no config.json; give the --workdir of a jaxvae run"),
    (["jaxvae.evaluate", "--workdir", "RUN", "--iw_samples", "0"],
     "error: --iw_samples=0 must be a positive number of importance samples"),
    (["jaxvae.sample", "--workdir", "RUN", "--out", "x.png", "--num", "0"],
     "error: --num=0 must be positive"),
    (["jaxvae.evaluate", "--workdir", "RUN", "--iw_samples", "2", "--fid", "1"],
     "error: --fid=1: FID needs at least 2 images"),
])
def test_bad_input_ends_a_command_with_one_error_line(run_dir, args, message):
  args = [str(run_dir) if a == "RUN" else a for a in args]
  done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
  assert done.returncode == 1
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith(message) and "Traceback" not in done.stderr
