"""Figures of a run, one function each, written as PNG with matplotlib, and the `figures` command.

  python -m jaxvae.figures --workdir DIR

redraws every figure of DIR's latest checkpoint and metrics.jsonl into DIR/figures/; training
calls `draw_training_figures` at the end and every `config.figures_every` epochs. The paper's
Figures 15-20 keep its numbers in their file names; the rest are what a VAE user looks at next.
Each figure has a fixed size (`FIGSIZES` inches at `DPI`), so its pixel size is known.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from jaxvae import data, distributions, evaluate, loops, models, parallel, sample  # noqa: E402
from jaxvae import run as run_lib  # noqa: E402

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
}
NUM_RECONSTRUCTIONS = 10
PRIOR_GRID = 8          # an 8 x 8 grid of prior samples
NEIGHBOURS = (6, 8)     # 6 test images, 8 neighbours each
NEIGHBOUR_SCALE = 0.1   # the paper's z + 0.1 * noise
INTERP_PAIRS, INTERP_STEPS = 4, 10
TRAVERSAL_DIMS = 8
TRAVERSAL_VALUES = np.linspace(-3.0, 3.0, 9)  # in units of the prior's standard deviation


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
  ax.plot(epochs, -_series(rows, "train/elbo_nats"), marker=".", label="train -ELBO")
  ax.plot(epochs, -_series(rows, "test/elbo_nats"), marker=".", label="test -ELBO")
  loss = _series(rows, "train/loss")
  if np.any(loss != -_series(rows, "train/elbo_nats")):
    ax.plot(epochs, loss, "--", label="train loss (beta-weighted KL)")
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("negative ELBO (nats per image)")
  ax.set_title("loss (lower is better)")
  ax.legend()
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
    pca = evaluate.fit_pca(means, 2)
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
  active = variance[order] > evaluate.ACTIVE_UNIT_THRESHOLD
  fig, ax = _figure("kl_per_dim")
  positions = np.arange(len(kl))
  for sel, color, label in (
      (active, "tab:blue", f"active ({active.sum()}): Cov_x E_q[z_j] > "
                           f"{evaluate.ACTIVE_UNIT_THRESHOLD}"),
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


def draw_training_figures(workdir, model, params, ds: data.Dataset, config, key) -> list[str]:
  """Every figure of a run into WORKDIR/figures/: the metrics.jsonl curves, and the decoded
  images and latent statistics of `params`, all drawn from the fixed eval `key`."""
  rows = read_metrics(workdir)
  run = os.path.basename(os.path.abspath(workdir))
  epoch = rows[-1]["epoch"]
  out = os.path.join(workdir, "figures")
  streams = evaluate.stream_keys(key)
  k_neigh, k_prior, k_pairs = jax.random.split(streams.figures, 3)
  decode = lambda z: np.asarray(sample.decode_mean(model, params, z))
  test = ds.test
  mesh = parallel.make_mesh(local=True)
  means, kl = evaluate.posterior_stats(model, params, test.images, key, config.data.binarize,
                                       config.eval.batch_size, mesh, loops.resolve(config, mesh))
  kl_dim = kl.mean(axis=0)
  _, variance = evaluate.active_units(means)
  paths = [plot_loss(rows, out, run), plot_ssim(rows, out, run)]

  # 17: test images of every class, decoded from their posterior mean and from a posterior draw.
  shown = _spread(test.labels, NUM_RECONSTRUCTIONS)
  originals, x = evaluate.model_inputs(test.images[shown], shown, streams.binarize,
                                       config.data.binarize)
  mean, log_scale = model.apply(params, x, method=models.VAE.encode)
  z = distributions.sample_diag_gaussian(streams.elbo, mean, log_scale)[0]
  paths.append(plot_reconstructions(np.asarray(originals), decode(mean), decode(z), out,
                                    _title(run, epoch, "test images and reconstructions")))

  paths.append(plot_latent_2d(means, test.labels, ds.class_names, out,
                              _title(run, epoch, f"posterior means of {len(means)} test images")))

  prior = np.asarray(sample.prior_samples(model, params, k_prior, PRIOR_GRID ** 2))
  paths.append(plot_image_grid(
      "fig19_prior_samples", prior.reshape((PRIOR_GRID, PRIOR_GRID) + prior.shape[1:]), out,
      _title(run, epoch, "decoded samples z ~ N(0, I)\n(means of p(x|z), pixels in [0, 1])")))

  rows_n, cols_n = min(NEIGHBOURS[0], len(shown)), NEIGHBOURS[1]
  centres = means[shown[:rows_n]]
  neigh = np.asarray(sample.neighbourhood(model, params, k_neigh, centres, cols_n,
                                          NEIGHBOUR_SCALE))
  grid = np.concatenate([np.asarray(originals[:rows_n])[:, None], decode(centres)[:, None],
                         neigh], axis=1)
  paths.append(plot_image_grid(
      "fig20_neighbourhood", grid, out,
      _title(run, epoch, f"neighbourhood of test encodings: decoded z + {NEIGHBOUR_SCALE} * eps"),
      col_labels=["original", "z = mean"] + [f"#{i + 1}" for i in range(cols_n)]))

  # Interpolations between posterior means of test pairs, preferring pairs of different classes.
  pairs = _pairs(test.labels, INTERP_PAIRS, k_pairs)
  col_labels = ["A"] + [f"{t:.2f}" for t in np.linspace(0, 1, INTERP_STEPS)] + ["B"]
  for kind, fn in (("linear", sample.lerp), ("spherical", sample.slerp)):
    path_z = fn(means[pairs[:, 0]], means[pairs[:, 1]], INTERP_STEPS)
    ends = [np.asarray(data.to_unit_interval(test.images[pairs[:, i]], None))[:, None]
            for i in (0, 1)]
    grid = np.concatenate([ends[0], decode(path_z), ends[1]], axis=1)
    paths.append(plot_image_grid(
        f"interpolation_{kind}", grid, out,
        _title(run, epoch, f"{kind} interpolation between posterior means of test images A, B"),
        row_labels=[f"{ds.class_names[test.labels[a]]} -> {ds.class_names[test.labels[b]]}"
                    for a, b in pairs],
        col_labels=col_labels, xlabel="t (A at 0, B at 1); outer columns: the originals"))

  dims = np.argsort(kl_dim)[::-1][:TRAVERSAL_DIMS]
  trav = decode(sample.traversal(means[shown[0]], [int(d) for d in dims], TRAVERSAL_VALUES))
  paths.append(plot_image_grid(
      "latent_traversals", trav, out,
      _title(run, epoch, f"latent traversals of the dims with the largest KL, around test "
                         f"image {shown[0]}"),
      row_labels=[f"z{d}\nKL {kl_dim[d]:.2f} nats" for d in dims],
      col_labels=[f"{v:+.1f}" for v in TRAVERSAL_VALUES],
      xlabel="value of the traversed dim (prior standard deviations); other dims at the "
             "posterior mean"))

  paths.append(plot_kl_per_dim(
      kl_dim, variance, out,
      _title(run, epoch, f"KL per latent dim, total {kl_dim.sum():.2f} nats; "
                         f"{int((variance > evaluate.ACTIVE_UNIT_THRESHOLD).sum())}/{len(kl_dim)} "
                         "active units")))
  return paths


def _spread(labels: np.ndarray, num: int) -> np.ndarray:
  """`num` indices int32[num] that visit every class in turn (the first image of each class,
  then the second, ...), so figures do not show one class of a split stored sorted by class."""
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    rank[labels == c] = np.arange(np.sum(labels == c))
  order = np.lexsort((labels, rank))  # by rank within its class, then by class
  return order[:num].astype(np.int32)


def _pairs(labels: np.ndarray, num: int, key: jax.Array) -> np.ndarray:
  """`num` random pairs of indices int[num, 2], the second of another class where one exists."""
  first_key, second_key = jax.random.split(key)
  first = np.asarray(jax.random.choice(first_key, len(labels), (num,), replace=num > len(labels)))
  score = np.asarray(jax.random.uniform(second_key, (num, len(labels))))
  score = score + (labels[None, :] != labels[first][:, None])  # other classes win the argmax
  return np.stack([first, score.argmax(axis=1)], axis=1)


def main(argv):
  workdir = flags.FLAGS.workdir
  run = run_lib.restore_run_for_command(argv, workdir)
  for path in draw_training_figures(workdir, run.model, run.state.params, run.dataset, run.config,
                                    run.keys.eval):
    print(f"wrote {path}")


if __name__ == "__main__":  # flags defined only here: train.py, which imports this, has --workdir
  flags.DEFINE_string("workdir", None, "A training run's --workdir (config.json, checkpoints/, "
                      "metrics.jsonl).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
