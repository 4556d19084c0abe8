"""Figures of a run, one function each, written as PNG with matplotlib, and the `figures` command.

  python -m jaxvae.figures --workdir DIR

redraws every figure of DIR's latest checkpoint and metrics.jsonl into DIR/figures/; training
calls `draw_training_figures` at the end and every `config.figures_every` epochs. The paper's
Figures 15-20 keep its numbers in their file names; the rest are what a VAE user looks at next.
For data with factor labels (dSprites) the traversals also come labelled by factor, and as a GIF.
Each figure has a fixed size (`FIGSIZES` inches at `DPI`), so its pixel size is known.

  python -m jaxvae.figures --sweep DIR1,DIR2,... --out OUT

draws OUT/sweep.png from several runs: rate against distortion, and MIG against beta;
`--compare DIR1,DIR2,...` draws their training curves and images side by side.
"""

import dataclasses
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from jaxvae import baselines, data, evaluate, figure_data, metrics, restore  # noqa: E402

DPI = 100
FIGSIZES = {  # inches (width, height)
    "fig15_loss": (11, 4),
    "fig16_ssim": (7, 4.5),
    "fig17_reconstructions": (12, 3.9),
    "fig18_latent_2d": (8, 6.5),
    "fig19_prior_samples": (7.5, 8),
    "fig20_neighbourhood": (10, 6.6),
    "interpolation_linear": (12, 4.7),
    "interpolation_spherical": (12, 4.7),
    "latent_traversals": (10, 8.5),
    "kl_per_dim": (10, 4.5),
    "kl_per_dim_training": (10, 4.5),
    "kl_per_group_training": (10, 4.5),  # a top-down model's (jaxvae.topdown)
    "temperature_samples": (10, 5.5),
    "data": (10, 5.6),
    "factor_traversals": (12, 9),
    "factor_traversals_animated": (9, 6),  # a GIF, one frame per traversal value
    "sweep": (13, 5),
    "compare_training": (20, 4.5),
    "compare_images": (12, 8),
    "transfer": (12, 4.5),
    "domain_traversals": (16, 4.2),
}
FACTOR_FIGURES = ("factor_traversals", "factor_traversals_animated")  # data with factor labels
# Drawn from several runs (--sweep, --compare), never by one run.
SWEEP_FIGURES = ("sweep", "compare_training", "compare_images", "transfer", "domain_traversals")
# A top-down model's own (jaxvae.topdown), drawn beside the curves and fig17 in place of the
# latent walks.
TOP_DOWN_FIGURES = ("kl_per_group_training", "temperature_samples")
GIF_FRAME_MS = 250


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _figure(name: str, **kwargs):
  return plt.subplots(figsize=FIGSIZES[name], layout="constrained", **kwargs)


def _save(fig, out_dir: str, name: str) -> str:
  """Writes out_dir/name.png at exactly FIGSIZES[name] * DPI pixels (no tight cropping)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def _title(run: str, epoch: int, what: str) -> str:
  return f"{run}, epoch {epoch}: {what}"


def _series(rows: list[dict], *keys: str) -> np.ndarray | None:
  """The first of `keys` that the rows carry, per row; None if none does."""
  for key in keys:
    if all(key in r for r in rows):
      return np.array([r[key] for r in rows], np.float64)
  return None


def plot_loss(rows: list[dict], out_dir: str, run: str = "") -> str:
  """Paper Figure 15: training and test -ELBO per epoch, and the KL term beside it."""
  epochs = [r["epoch"] for r in rows]
  fig, (ax, ax_kl) = _figure("fig15_loss", ncols=2)
  train = _series(rows, "train/elbo_nats")  # None for an objective without an encoder pass
  if train is not None:
    ax.plot(epochs, -train, marker=".", label="train -ELBO")
  ax.plot(epochs, -_series(rows, "test/elbo_nats"), marker=".", label="test -ELBO")
  loss = _series(rows, "train/loss")
  if train is None or np.any(loss != -train):
    ax.plot(epochs, loss, "--", label="train loss (the objective's own)")
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("negative ELBO (nats per image)")
  ax.set_title("loss (lower is better)")
  ax.legend()
  if train is not None:
    ax_kl.plot(epochs, _series(rows, "train/kl_nats"), marker=".", label="train")
  ax_kl.plot(epochs, _series(rows, "test/kl_nats"), marker=".", label="test")
  ax_kl.set_xlabel("epoch")
  ax_kl.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax_kl.set_ylabel("KL(q(z|x) || p(z)) (nats per image)")
  ax_kl.set_title("KL term")
  ax_kl.legend()
  fig.suptitle(_title(run, epochs[-1], "training and test loss"))
  return _save(fig, out_dir, "fig15_loss")


def plot_ssim(rows: list[dict], out_dir: str, run: str = "") -> str:
  """Paper Figure 16: test-split SSIM (dm-pix) per epoch of reconstructions decoded from the
  posterior mean."""
  epochs = [r["epoch"] for r in rows]
  fig, ax = _figure("fig16_ssim")
  # "test/ssim": the key of runs logged before reconstructions said how they were decoded.
  ax.plot(epochs, _series(rows, "test/recon_mean_ssim", "test/ssim"), marker=".",
          label="decoded from the posterior mean")
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("SSIM (dm-pix, test split mean)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(_title(run, epochs[-1], "reconstruction SSIM (1 = identical)"))
  return _save(fig, out_dir, "fig16_ssim")


def _mosaic(images: np.ndarray, pad: int = 1) -> np.ndarray:
  """f32[R, C, H, W, ch] -> one image f32[R*(H+pad)-pad, C*(W+pad)-pad, ch], white gaps."""
  r, c, h, w, ch = images.shape
  out = np.ones((r * (h + pad) - pad, c * (w + pad) - pad, ch), np.float32)
  for i in range(r):
    for j in range(c):
      out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = images[i, j]
  return out


def _show_grid(ax, images: np.ndarray, row_labels=None, col_labels=None, pad: int = 1):
  """Draws f32[R, C, H, W, ch] in [0, 1] as a grid, with optional row and column labels."""
  r, c, h, w, _ = images.shape
  mosaic = _mosaic(images, pad)
  ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_xticks([j * (w + pad) + (w - 1) / 2 for j in range(c)] if col_labels is not None else [])
  ax.set_yticks([i * (h + pad) + (h - 1) / 2 for i in range(r)] if row_labels is not None else [])
  if col_labels is not None:
    ax.set_xticklabels(col_labels, fontsize=8)
  if row_labels is not None:
    ax.set_yticklabels(row_labels, fontsize=8)
  ax.tick_params(length=0)
  for side in ax.spines.values():
    side.set_visible(False)


def plot_reconstructions(originals: np.ndarray, from_mean: np.ndarray, from_sample: np.ndarray,
                         out_dir: str, title: str = "") -> str:
  """Paper Figure 17: test originals above their reconstructions. f32[N, H, W, C] in [0, 1]."""
  fig, ax = _figure("fig17_reconstructions")
  _show_grid(ax, np.stack([originals, from_mean, from_sample]),
             row_labels=["original", "decoded from\nposterior mean",
                         "decoded from\nposterior draw"])
  ax.set_title(title)
  return _save(fig, out_dir, "fig17_reconstructions")


def plot_latent_2d(means: np.ndarray, labels: np.ndarray, class_names, out_dir: str,
                   title: str = "") -> str:
  """Paper Figure 18: posterior means f32[N, K] of the test split in 2-D, coloured by class:
  the means themselves when K <= 2, else their first two principal components."""
  k = means.shape[1]
  if k >= 3:
    pca = baselines.fit_pca(means, 2)
    xy = pca.project(means)
    share = pca.variance / pca.total_variance
    axis_names = [f"PC{i + 1} of the posterior means ({100 * s:.0f}% of variance)"
                  for i, s in enumerate(share)]
  elif k == 2:
    xy, axis_names = means, ["posterior mean z1", "posterior mean z2"]
  else:  # one latent dim: spread the classes apart on the other axis
    jitter = np.random.default_rng(0).uniform(-0.3, 0.3, len(labels))
    xy = np.stack([means[:, 0], labels + jitter], axis=1)
    axis_names = ["posterior mean z1", "class (jittered)"]
  fig, ax = _figure("fig18_latent_2d")
  cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
  for c, name in enumerate(class_names):
    sel = labels == c
    if sel.any():
      ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, color=cmap(c % cmap.N), label=name)
  ax.set_xlabel(axis_names[0])
  ax.set_ylabel(axis_names[1])
  ax.legend(title="class", markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
  ax.set_title(title)
  return _save(fig, out_dir, "fig18_latent_2d")


def plot_image_grid(name: str, images: np.ndarray, out_dir: str, title: str, row_labels=None,
                    col_labels=None, xlabel: str = "") -> str:
  """Any grid of decoded images f32[R, C, H, W, ch] as figure `name` (a key of FIGSIZES)."""
  fig, ax = _figure(name)
  _show_grid(ax, images, row_labels, col_labels)
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  return _save(fig, out_dir, name)


def plot_kl_per_dim(kl: np.ndarray, variance: np.ndarray, out_dir: str, title: str = "") -> str:
  """KL per latent dim f32[K] (nats, test-split mean), largest first, active units coloured."""
  order = np.argsort(kl)[::-1]
  active = variance[order] > metrics.ACTIVE_UNIT_THRESHOLD
  fig, ax = _figure("kl_per_dim")
  positions = np.arange(len(kl))
  for sel, color, label in (
      (active, "tab:blue", f"active ({active.sum()}): Cov_x E_q[z_j] > "
                           f"{metrics.ACTIVE_UNIT_THRESHOLD}"),
      (~active, "tab:gray", f"inactive ({(~active).sum()})")):
    if sel.any():
      ax.bar(positions[sel], kl[order][sel], color=color, label=label)
  if len(kl) <= 32:
    ax.set_xticks(positions, [f"z{j}" for j in order], fontsize=8)
  ax.set_xlabel("latent dimension, sorted by KL")
  ax.set_ylabel("KL(q(z_j|x) || N(0, 1)) (nats, test mean)")
  ax.legend()
  ax.set_title(title)
  return _save(fig, out_dir, "kl_per_dim")


def plot_kl_per_dim_training(rows: list[dict], out_dir: str, run: str = "",
                             split: str = "dim") -> str:
  """The test KL of each latent dim at every evaluation, one line per dim against the step
  (metrics.jsonl's test/kl_per_dim_nats): under capacity annealing or a falling beta, dims
  switch on one at a time. The 10 dims of largest final KL are named, the rest grey. With
  `split="group"`, a top-down model's KL per latent group (test/kl_per_group_nats)."""
  key, unit = f"test/kl_per_{split}_nats", "z" if split == "dim" else "group "
  rows = [r for r in rows if key in r]
  steps = [r["step"] for r in rows]
  kl = np.array([r[key] for r in rows])  # [T, K]
  order = np.argsort(kl[-1])[::-1]
  named = 10
  fig, ax = _figure(f"kl_per_{split}_training")
  cmap = plt.get_cmap("tab10")
  for rank, d in reversed(list(enumerate(order))):  # the named dims drawn last, on top
    ax.plot(steps, kl[:, d], marker="." if len(steps) <= 30 else None, lw=1.2,
            color=cmap(rank) if rank < named else "0.7",
            label=f"{unit}{d}" if rank < named else None)
  if len(order) > named:
    ax.plot([], [], color="0.7", label=f"{len(order) - named} other {split}s")
  handles, labels = ax.get_legend_handles_labels()
  ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5),
            title="by final KL")
  ax.set_xlabel("training step")
  ax.set_ylabel("KL(q(z_j|x) || N(0, 1)) (nats, test mean)" if split == "dim" else
                "KL(q(z_l|x, z_<l) || p(z_l|z_<l)) (nats, test mean)")
  ax.set_ylim(bottom=0)  # a dim switched off sits at 0
  ax.grid(alpha=0.3)
  ax.set_title(_title(run, rows[-1]["epoch"], f"KL per latent {split} over training, "
                                              f"{kl.shape[1]} {split}s"))
  return _save(fig, out_dir, f"kl_per_{split}_training")


def plot_factor_traversals(grid: np.ndarray, row_labels, values, original: np.ndarray,
                           out_dir: str, title: str = "") -> list[str]:
  """Latent traversals decoded as grid f32[R, V, H, W, C] (row r: one dim set to each of
  values[V]) around the code of `original` f32[H, W, C], with a label per row:
  factor_traversals.png, rows by columns, and factor_traversals_animated.gif, whose frame v
  shows every row's image at values[v] beside the original."""
  png = plot_image_grid("factor_traversals", grid, out_dir, title, row_labels=row_labels,
                        col_labels=[f"{v:+.2f}" for v in values],
                        xlabel="value of the traversed dim (prior standard deviations); other "
                               "dims at the image's posterior mean")
  cells = grid.shape[0] + 1  # the last cell: the original
  cols = math.ceil(math.sqrt(cells * 1.5))  # about 3:2, like the frame
  fig, axes = plt.subplots(math.ceil(cells / cols), cols, layout="constrained", squeeze=False,
                           figsize=FIGSIZES["factor_traversals_animated"], dpi=DPI)
  shown = []
  for ax, images, label in zip(axes.flat, grid, row_labels):
    shown.append(ax.imshow(_as_image(images[0]), cmap="gray", vmin=0, vmax=1,
                           interpolation="nearest"))
    ax.set_title(label, fontsize=8)
  axes.flat[cells - 1].imshow(_as_image(original), cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
  axes.flat[cells - 1].set_title("original", fontsize=8)
  for ax in axes.flat:
    ax.axis("off")
  frames = []
  for v, value in enumerate(values):  # one figure redrawn per frame: only the pixels change
    for artist, images in zip(shown, grid):
      artist.set_data(_as_image(images[v]))
    fig.suptitle(f"{title}\ntraversed dim = {value:+.2f}", fontsize=9)
    fig.canvas.draw()
    frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
    fig.set_layout_engine("none")  # laid out once: each later frame keeps the first's places
  plt.close(fig)
  gif = os.path.join(out_dir, "factor_traversals_animated.gif")
  frames[0].save(gif, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
  return [png, gif]


def _as_image(image: np.ndarray) -> np.ndarray:
  """f32[H, W, C] -> what imshow takes: [H, W] for one channel."""
  return image[..., 0] if image.shape[-1] == 1 else image


def read_sweep_run(workdir: str) -> dict:
  """One run of a sweep: its name, objective.beta and objective.kind ("elbo" when its config
  has no such key) from config.json; rate (KL) and log_lik (E_q log p(x|z)) in nats on the
  test split, from eval.json if the evaluate command wrote one, else metrics.jsonl's last row;
  and eval.json's MIG (None without factor metrics)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds no config.json; is it a jaxvae run's --workdir?")
  with open(path) as f:
    objective = json.load(f)["objective"]
  out = {"run": os.path.basename(os.path.abspath(workdir)), "beta": float(objective["beta"]),
         "kind": objective.get("kind", "elbo"), "mig": None}
  eval_path = os.path.join(workdir, "eval.json")
  if os.path.exists(eval_path):
    with open(eval_path) as f:
      result = json.load(f)
    out.update(rate=result["vae"]["kl_nats"], log_lik=result["vae"]["log_lik_nats"],
               mig=result.get("factors", {}).get("mig"))
  elif os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    last = read_metrics(workdir)[-1]
    out.update(rate=last["test/kl_nats"], log_lik=last["test/log_lik_nats"])
  else:
    raise FileNotFoundError(f"{workdir} holds neither eval.json nor metrics.jsonl; train the run "
                            f"(and run python -m jaxvae.evaluate --workdir {workdir} for MIG)")
  return out


def plot_sweep(workdirs, out_dir: str) -> str:
  """OUT/sweep.png from several runs (`read_sweep_run`): rate (KL) against distortion
  (-E_q log p(x|z)), and MIG against beta, one line per objective kind through its betas."""
  runs = [read_sweep_run(w) for w in workdirs]
  fig, (ax_rd, ax_mig) = _figure("sweep", ncols=2)
  for kind in sorted({r["kind"] for r in runs}):
    group = sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["beta"])
    line, = ax_rd.plot([r["rate"] for r in group], [-r["log_lik"] for r in group], marker="o",
                       label=kind)
    for r in group:
      ax_rd.annotate(f"\u03b2={r['beta']:g}", (r["rate"], -r["log_lik"]), fontsize=8,
                     textcoords="offset points", xytext=(4, 4))
    scored = [r for r in group if r["mig"] is not None]
    if scored:
      ax_mig.plot([r["beta"] for r in scored], [r["mig"] for r in scored], marker="o",
                  color=line.get_color(), label=kind)
  ax_rd.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
  ax_rd.set_xlabel("rate: KL(q(z|x) || p(z)) (nats per image, test)")
  ax_rd.set_ylabel("distortion: -E_q log p(x|z) (nats per image, test)")
  ax_rd.legend(title="objective")
  ax_rd.grid(alpha=0.3)
  betas = sorted({r["beta"] for r in runs if r["mig"] is not None})
  if betas and min(betas) > 0 and max(betas) >= 10 * min(betas):
    ax_mig.set_xscale("log")
  ax_mig.set_xticks(betas, [f"{b:g}" for b in betas], minor=False)
  ax_mig.minorticks_off()
  ax_mig.set_xlabel("beta (objective.beta)")
  ax_mig.set_ylabel("MIG (eval.json factor metrics)")
  ax_mig.grid(alpha=0.3)
  unscored = [r["run"] for r in runs if r["mig"] is None]
  if unscored:  # say why a run is missing rather than drop it silently
    ax_mig.set_title("not shown, no factor metrics in their eval.json: " + ", ".join(unscored),
                     fontsize=8)
  if betas:
    ax_mig.legend(title="objective")
  fig.suptitle(f"sweep of {len(runs)} runs: rate-distortion and disentanglement")
  return _save(fig, out_dir, "sweep")


# A run's training terms per image, as `plot_compare_training` draws them: name, metric key,
# sign, line style.
LOSS_TERMS = (("KL", "train/kl_nats", 1, "-"),
              ("pixel -log p(x|z)", "train/log_lik_nats", -1, "--"),
              ("feature term", "train/llike", 1, "-."),
              ("D's loss", "train/disc_loss", 1, ":"))


def loss_terms(rows: list[dict]) -> dict[str, np.ndarray]:
  """The `LOSS_TERMS` a run logged, per row, by name (a VAE-GAN logs all four; its VAE control
  learns from the KL and the pixel term while its watching discriminator logs the others; a
  GAN logs the discriminator's alone)."""
  terms = {}
  for name, key, sign, _ in LOSS_TERMS:
    values = _series(rows, key)
    if values is not None:
      terms[name] = sign * values
  return terms


def plot_compare_training(runs: dict[str, list[dict]], out_dir: str) -> str:
  """OUT/compare_training.png of runs {name: metrics rows} over optimizer steps: the test
  -ELBO of the pixel likelihood, the test reconstructions' SSIM, each run's training terms
  (`loss_terms`; the paper's Figure 7 sets a VAE's beside a VAE-GAN's) and the
  discriminator's mean output on real, reconstructed and prior-sampled images (runs of
  objective.kind=vae_gan)."""
  fig, (ax_elbo, ax_ssim, ax_terms, ax_d) = _figure("compare_training", ncols=4)
  styles = {term: style for term, _, _, style in LOSS_TERMS}
  for name, rows in runs.items():
    steps = _series(rows, "step")
    line, = ax_elbo.plot(steps, -_series(rows, "test/elbo_nats"), marker=".", label=name)
    ssim = _series(rows, "test/recon_mean_ssim")
    if ssim is not None:
      ax_ssim.plot(steps, ssim, marker=".", color=line.get_color(), label=name)
    for term, values in loss_terms(rows).items():
      ax_terms.plot(steps, values, styles[term], color=line.get_color(), label=f"{name}: {term}")
    for key, style in (("train/d_real", "-"), ("train/d_recon", "--"), ("train/d_sample", ":")):
      d = _series(rows, key)
      if d is not None:
        ax_d.plot(steps, d, style, color=line.get_color(),
                  label=f"{name}: {key.split('_')[-1]}")
  ax_terms.set_yscale("log")  # nats per image beside a discriminator loss below 1
  for ax, ylabel, title in (
      (ax_elbo, "test -ELBO, pixel likelihood (nats per image)", "density (lower is better)"),
      (ax_ssim, "test reconstruction SSIM (posterior mean)", "reconstruction (higher is better)"),
      (ax_terms, "training term per image (mean over each row's steps)",
       "training terms: KL -, pixel --, feature -., D's loss :"),
      (ax_d, "mean D(x) in training batches", "discriminator: real -, recon --, sample :")):
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # (a panel no run logs stays empty)
      ax.legend(fontsize=7)
  fig.suptitle(f"{len(runs)} runs side by side: " + ", ".join(runs))
  return _save(fig, out_dir, "compare_training")


def plot_compare_images(originals: np.ndarray, recons: dict[str, np.ndarray],
                        samples: dict[str, np.ndarray], out_dir: str) -> str:
  """OUT/compare_images.png: test originals, each run's reconstructions of them, then each
  run's decoding of the same prior draws; f32[N, H, W, C] in [0, 1] each."""
  rows = [originals, *recons.values(), *samples.values()]
  labels = (["original"] + [f"{n}\nreconstruction" for n in recons]
            + [f"{n}\nprior sample" for n in samples])
  return plot_image_grid("compare_images", np.stack(rows), out_dir,
                         "the same test images and the same prior draws through each run",
                         row_labels=labels)


def draw_comparison(workdirs, out_dir: str) -> list[str]:
  """`plot_compare_training` and `plot_compare_images` of several runs of one dataset."""
  names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
  originals, recons, samples = figure_data.side_by_side(
      {n: restore.restore_run(w) for n, w in zip(names, workdirs)})
  return [plot_compare_training({n: read_metrics(w) for n, w in zip(names, workdirs)}, out_dir),
          plot_compare_images(originals, recons, samples, out_dir)]


def plot_transfer(results: dict[str, dict], out_dir: str, predictor: str = "forest") -> str:
  """OUT/transfer.png: per run (`evaluate.transfer_of_run` results by name), the mean factor
  accuracy of `predictor` in each domain (trained on the source domain's codes), and MIG."""
  fig, (ax, ax_mig) = _figure("transfer", ncols=2)
  domains = next(iter(results.values()))["domains"]
  width = 0.8 / len(results)
  for i, (name, r) in enumerate(results.items()):
    at = np.arange(len(domains)) + i * width
    ax.bar(at, [100 * r["accuracy"][predictor][d]["mean"] for d in domains], width, label=name)
    ax_mig.bar(at, [r["mig"][d] for d in domains], width, label=name)
  for a, ylabel in ((ax, f"mean factor accuracy, {predictor} (%)"), (ax_mig, "MIG")):
    a.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    a.set_ylabel(ylabel)
    a.legend(fontsize=8)
  ax.set_title(f"predictors trained on {next(iter(results.values()))['source']!r} codes")
  ax_mig.set_title("MIG of each domain's codes")
  fig.suptitle("zero-shot transfer to target domains (no retraining)")
  return _save(fig, out_dir, "transfer")


def plot_domain_traversals(grids: dict, images: dict, dims, out_dir: str, run: str) -> str:
  """OUT/domain_traversals_RUN.png: per domain, one image (first column) and the traversals of
  the same latent dims around its code (`figure_data.domain_traversals`)."""
  fig, axes = plt.subplots(1, len(grids), figsize=FIGSIZES["domain_traversals"],
                           layout="constrained", squeeze=False)
  values = figure_data.DOMAIN_TRAVERSAL_VALUES
  for ax, (domain, grid) in zip(axes[0], grids.items()):
    first = np.broadcast_to(images[domain], (len(grid), 1) + images[domain].shape)
    _show_grid(ax, np.concatenate([first, grid], axis=1), [f"z{d}" for d in dims],
               ["image"] + [f"{v:+.0f}" for v in values])
    ax.set_title(domain)
  fig.suptitle(f"{run}: traversals of its {len(dims)} dims of largest KL around one test image "
               "drawn in each domain")
  return _save(fig, out_dir, f"domain_traversals_{run}")


def draw_transfer(workdirs, out_dir: str) -> list[str]:
  """The transfer table (OUT/transfer.md, .json, .png, from each run's transfer.json, written by
  `python -m jaxvae.evaluate --transfer`), each run's domain traversals, and the runs'
  reconstructions side by side (`plot_compare_images`)."""
  names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
  results = {}
  for name, workdir in zip(names, workdirs):
    with open(os.path.join(workdir, "transfer.json")) as f:
      results[name] = json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "transfer.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, "transfer.md"), "w") as f:
    f.write(evaluate.transfer_markdown(results))
  paths = [os.path.join(out_dir, "transfer.md"), plot_transfer(results, out_dir)]
  runs = {n: restore.restore_run(w) for n, w in zip(names, workdirs)}
  for name, run in runs.items():
    grids, images, dims = figure_data.domain_traversals(run, results[name]["domains"])
    paths.append(plot_domain_traversals(grids, images, dims, out_dir, name))
  originals, recons, samples = figure_data.side_by_side(runs)
  return paths + [plot_compare_images(originals, recons, samples, out_dir)]


def plot_data_preview(ds: data.Dataset, out_dir: str, rows: int = 4, cols: int = 8) -> str:
  """Paper Figure 14: the first training images of each class in turn, labelled (figures/data.png)."""
  shown = figure_data.spread(ds.train.labels, rows * cols)
  fig, axes = plt.subplots(rows, cols, figsize=FIGSIZES["data"], layout="constrained")
  for ax, i in zip(axes.flat, shown):
    image = ds.train.images[i].astype(np.float32) / 255.0
    ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(ds.class_names[ds.train.labels[i]], fontsize=8)
    ax.axis("off")
  for ax in list(axes.flat)[len(shown):]:
    ax.axis("off")
  fig.suptitle(f"{ds.name}: training images and their labels "
               f"({len(ds.train.images)} train, {len(ds.test.images)} test)")
  return _save(fig, out_dir, "data")


@dataclasses.dataclass
class _Canvas:
  """Where one checkpoint's figures go and how their titles name it."""
  out: str    # the figures folder
  run: str
  epoch: int | float

  def title(self, what: str) -> str:
    return _title(self.run, self.epoch, what)


def draw_training_figures(workdir, model, params, ds: data.Dataset, config, key) -> list[str]:
  """Every figure of a run into WORKDIR/figures/: the metrics.jsonl curves, and the decoded
  images and latent statistics of `params` (`jaxvae.figure_data`), all drawn from the fixed
  eval `key`; for data with factor labels also `FACTOR_FIGURES`."""
  rows = read_metrics(workdir)
  run = os.path.basename(os.path.abspath(workdir))
  canvas = _Canvas(os.path.join(workdir, "figures"), run, rows[-1]["epoch"])
  if model.top_down:
    return _top_down_figures(rows, model, params, ds, config, key, canvas)
  scene = figure_data.scene(model, params, ds, config, key)
  paths = [plot_loss(rows, canvas.out, run), plot_ssim(rows, canvas.out, run)]
  if any("test/kl_per_dim_nats" in r for r in rows):  # not in runs logged before it existed
    paths.append(plot_kl_per_dim_training(rows, canvas.out, run))
  paths += _encoding_figures(scene, canvas) + _walk_figures(scene, canvas)
  if ds.train.factors is not None:
    paths += _factor_figures(scene, canvas)
  return paths


def _top_down_figures(rows, model, params, ds, config, key, canvas: _Canvas) -> list[str]:
  """A top-down model's figures (it has no single code to walk): the curves, the KL of each
  latent group over training, test reconstructions and prior samples at several temperatures."""
  out, run = canvas.out, canvas.run
  paths = [plot_loss(rows, out, run), plot_ssim(rows, out, run),
           plot_kl_per_dim_training(rows, out, run, split="group")]
  images = figure_data.tensorboard_images(model, params, ds, config, key)
  pair = images["test_and_reconstruction"]  # [N, H, 2W, C]: original | reconstruction
  width = pair.shape[2] // 2
  grid = np.stack([pair[:, :, :width], pair[:, :, width:]])
  paths.append(plot_image_grid("fig17_reconstructions", grid, out,
                               canvas.title("test images and their reconstructions"),
                               row_labels=["original", "posterior means"]))
  temps = figure_data.SAMPLE_TEMPERATURES
  paths.append(plot_image_grid(
      "temperature_samples", figure_data.temperature_grid(model, params, key), out,
      canvas.title("prior samples (means of p(x|z)); each group's prior scale times t"),
      row_labels=[f"t = {t}" for t in temps]))
  return paths


def _encoding_figures(s: figure_data.Scene, canvas: _Canvas) -> list[str]:
  """Figures 17-20 and the KL per dim: test images encoded and decoded again, the posterior
  means in 2-D, prior samples, and neighbourhoods of test encodings."""
  title, out = canvas.title, canvas.out
  paths = [plot_reconstructions(*figure_data.reconstructions(s), out,
                                title("test images and reconstructions"))]
  paths.append(plot_latent_2d(s.means, s.ds.test.labels, s.ds.class_names, out,
                              title(f"posterior means of {len(s.means)} test images")))
  paths.append(plot_image_grid(
      "fig19_prior_samples", figure_data.prior_grid(s), out,
      title("decoded samples z ~ N(0, I)\n(means of p(x|z), pixels in [0, 1])")))
  grid = figure_data.neighbourhood_grid(s)
  scale = figure_data.NEIGHBOUR_SCALE
  paths.append(plot_image_grid(
      "fig20_neighbourhood", grid, out,
      title(f"neighbourhood of test encodings: decoded z + {scale} * eps"),
      col_labels=["original", "z = mean"] + [f"#{i + 1}" for i in range(grid.shape[1] - 2)]))
  active = int((s.variance > metrics.ACTIVE_UNIT_THRESHOLD).sum())
  paths.append(plot_kl_per_dim(
      s.kl_dim, s.variance, out,
      title(f"KL per latent dim, total {s.kl_dim.sum():.2f} nats; "
            f"{active}/{len(s.kl_dim)} active units")))
  return paths


def _walk_figures(s: figure_data.Scene, canvas: _Canvas) -> list[str]:
  """Walks through the latent space: interpolations between test pairs (preferring pairs of
  different classes), and traversals of the dims with the largest KL."""
  test, names = s.ds.test, s.ds.class_names
  between = figure_data.interpolation_pairs(s)
  steps = figure_data.INTERP_STEPS
  col_labels = ["A"] + [f"{t:.2f}" for t in np.linspace(0, 1, steps)] + ["B"]
  paths = []
  for kind in ("linear", "spherical"):
    paths.append(plot_image_grid(
        f"interpolation_{kind}", figure_data.interpolation_grid(s, kind, between), canvas.out,
        canvas.title(f"{kind} interpolation between posterior means of test images A, B"),
        row_labels=[f"{names[test.labels[a]]} -> {names[test.labels[b]]}" for a, b in between],
        col_labels=col_labels, xlabel="t (A at 0, B at 1); outer columns: the originals"))
  dims = figure_data.largest_kl_dims(s, figure_data.TRAVERSAL_DIMS)
  values = figure_data.TRAVERSAL_VALUES
  paths.append(plot_image_grid(
      "latent_traversals", figure_data.traversal_grid(s, dims, values), canvas.out,
      canvas.title("latent traversals of the dims with the largest KL, around test image "
                   f"{s.shown[0]}"),
      row_labels=[f"z{d}\nKL {s.kl_dim[d]:.2f} nats" for d in dims],
      col_labels=[f"{v:+.1f}" for v in values],
      xlabel="value of the traversed dim (prior standard deviations); other dims at the "
             "posterior mean"))
  return paths


def _factor_figures(s: figure_data.Scene, canvas: _Canvas) -> list[str]:
  """`FACTOR_FIGURES`: traversals of every dim (up to FACTOR_TRAVERSAL_DIMS, by KL) around one
  test image, each row labelled with the factor its dim holds most information about."""
  labels = figure_data.factor_of_each_dim(s)
  dims = figure_data.largest_kl_dims(s, figure_data.FACTOR_TRAVERSAL_DIMS)
  values, centre = figure_data.FACTOR_TRAVERSAL_VALUES, s.shown[0]
  grid = figure_data.traversal_grid(s, dims, values)
  dims_shown = ("every latent dim" if len(dims) == len(s.kl_dim)
                else f"the {len(dims)} of {len(s.kl_dim)} latent dims of largest KL")
  original = np.asarray(data.to_unit_interval(s.ds.test.images[centre], None))
  return plot_factor_traversals(
      grid, [f"z{d}  KL {s.kl_dim[d]:.2f}\n{labels[d]}" for d in dims], values, original,
      canvas.out,
      canvas.title(f"traversals of {dims_shown} around test image {centre}\neach labelled with "
                   "the factor it shares the most information with (binned MI, nats)"))


def main(argv):
  workdir, sweep, out = flags.FLAGS.workdir, flags.FLAGS.sweep, flags.FLAGS.out
  if flags.FLAGS.compare:
    if not out:
      raise app.UsageError("--compare needs --out, the folder to write the figures into")
    for path in draw_comparison(flags.FLAGS.compare, out):
      print(f"wrote {path}")
    return
  if flags.FLAGS.transfer:
    if not out:
      raise app.UsageError("--transfer needs --out, the folder to write the table and figures into")
    for path in draw_transfer(flags.FLAGS.transfer, out):
      print(f"wrote {path}")
    return
  if sweep:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not out:
      raise app.UsageError("--sweep needs --out, the folder to write sweep.png into")
    print(f"wrote {plot_sweep(sweep, out)}")
    return
  if out:
    raise app.UsageError(f"--out goes with --sweep; --workdir draws into {workdir}/figures")
  run = restore.restore_for_command(argv, workdir)
  for path in draw_training_figures(workdir, run.model, run.params, run.dataset, run.config,
                                    run.keys.eval):
    print(f"wrote {path}")


if __name__ == "__main__":  # flags defined only here: train.py, which imports this, has --workdir
  flags.DEFINE_string("workdir", None, "A training run's --workdir (config.json, checkpoints/, "
                      "metrics.jsonl).")
  flags.DEFINE_list("sweep", None, "Run workdirs, comma-separated, to draw as one sweep "
                    "(config.json, and eval.json or metrics.jsonl, each).")
  flags.DEFINE_list("compare", None, "Run workdirs of one dataset, comma-separated, to draw "
                    "side by side (compare_training.png, compare_images.png).")
  flags.DEFINE_list("transfer", None, "Sprites run workdirs, comma-separated, each evaluated "
                    "with `python -m jaxvae.evaluate --transfer`: the transfer table "
                    "(transfer.md, .json, .png), traversals per domain, reconstructions.")
  flags.DEFINE_string("out", None, "With --sweep, --compare or --transfer: the folder for the "
                      "figures.")
  flags.mark_flags_as_mutual_exclusive(["workdir", "sweep", "compare", "transfer"], required=True)
  app.run(restore.exit_on_user_error(main))
