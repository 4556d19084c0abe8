"""Figures, one function each, written as PNG with matplotlib. They only read arrays and
metrics rows; `draw_training_figures` gathers what a finished run needs.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxvae import data, distributions, models  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_loss(rows: list[dict], path: str, run: str = "") -> str:
  """Paper Figure 15: training and test negative ELBO (nats per example) per epoch."""
  epochs = [r["epoch"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(epochs, [-r["train/elbo_nats"] for r in rows], label="train -ELBO")
  ax.plot(epochs, [-r["test/elbo_nats"] for r in rows], label="test -ELBO")
  if any(r["train/loss"] != -r["train/elbo_nats"] for r in rows):
    ax.plot(epochs, [r["train/loss"] for r in rows], "--", label="train loss (beta-weighted)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("negative ELBO (nats per image)")
  ax.set_title(f"{run} loss, epoch {epochs[-1]}")
  ax.legend()
  return _save(fig, path)


def plot_ssim(rows: list[dict], path: str, run: str = "") -> str:
  """Paper Figure 16: test-split SSIM per epoch (dm-pix, posterior-mean reconstructions)."""
  epochs = [r["epoch"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(epochs, [r["test/ssim"] for r in rows], marker=".")
  ax.set_xlabel("epoch")
  ax.set_ylabel("SSIM (test split mean)")
  ax.set_ylim(0, 1)
  ax.set_title(f"{run} SSIM, epoch {epochs[-1]}")
  return _save(fig, path)


def _grid(ax, images: np.ndarray, title: str):
  """images: f32[N, H, W, C] in [0, 1], drawn in one row."""
  row = np.concatenate(list(images), axis=1)
  ax.imshow(row.squeeze(-1) if row.shape[-1] == 1 else row, cmap="gray", vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_title(title, fontsize=9)
  ax.axis("off")


def plot_reconstructions(originals: np.ndarray, recons: np.ndarray, path: str,
                         title: str = "") -> str:
  """Paper Figure 17: originals above their reconstructions. f32[N, H, W, C] in [0, 1]."""
  fig, axes = plt.subplots(2, 1, figsize=(1.2 * len(originals), 3))
  _grid(axes[0], originals, "test originals")
  _grid(axes[1], recons, "reconstructions (decoded posterior mean)")
  fig.suptitle(title)
  return _save(fig, path)


def draw_training_figures(workdir, model, params, ds: data.Dataset, config, key) -> list[str]:
  """Figures 15-17 of a run into WORKDIR/figures/."""
  rows = read_metrics(workdir)
  run = os.path.basename(os.path.abspath(workdir))
  out = os.path.join(workdir, "figures")
  x = data.to_unit_interval(ds.test.images[:10], None)
  mean, _ = model.apply(params, x, method=models.VAE.encode)
  recon = distributions.likelihood_mean(model.likelihood,
                                        model.apply(params, mean, method=models.VAE.decode))
  return [
      plot_loss(rows, os.path.join(out, "fig15_loss.png"), run),
      plot_ssim(rows, os.path.join(out, "fig16_ssim.png"), run),
      plot_reconstructions(np.asarray(x), np.asarray(recon), os.path.join(out, "fig17_reconstructions.png"),
                           f"{run}, epoch {rows[-1]['epoch']}"),
  ]
