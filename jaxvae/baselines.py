"""Baselines to read a VAE's figures against: PCA with the same k, scored as the VAE is."""

import dataclasses

import jax
import numpy as np
import scipy.linalg

from jaxvae import loops, metrics


@dataclasses.dataclass(frozen=True)
class PCA:
  """A linear map to k dims: z = (x - mean) @ components.T, x' = mean + z @ components."""
  mean: np.ndarray        # f32[D]
  components: np.ndarray  # f32[k, D], orthonormal rows by decreasing variance
  variance: np.ndarray    # f32[k], the data's variance along each component
  total_variance: float   # the trace of the data's covariance

  @property
  def explained_fraction(self) -> float:
    return float(self.variance.sum() / self.total_variance)

  def project(self, x: np.ndarray) -> np.ndarray:
    """f32[N, D] -> f32[N, k]."""
    return (np.asarray(x, np.float32) - self.mean) @ self.components.T

  def reconstruct(self, x: np.ndarray) -> np.ndarray:
    """f32[N, D] -> f32[N, D], the projection onto the k-dim principal subspace."""
    return self.mean + self.project(x) @ self.components


def fit_pca(rows: np.ndarray, k: int, scale: float = 1.0, chunk: int = 4096) -> PCA:
  """PCA of `rows * scale` (rows [N, D] of any dtype; uint8 images stay uint8 in memory), from
  the covariance accumulated in float64 a chunk at a time. k is capped at D."""
  n, d = rows.shape
  k = min(k, d)
  mean = np.zeros(d)
  for i in range(0, n, chunk):
    mean += rows[i:i + chunk].sum(axis=0, dtype=np.float64) * scale
  mean /= n
  cov = np.zeros((d, d))
  for i in range(0, n, chunk):
    centred = (rows[i:i + chunk] * np.float32(scale) - mean.astype(np.float32))
    cov += (centred.T @ centred).astype(np.float64)
  cov /= n
  variance, vectors = scipy.linalg.eigh(cov, subset_by_index=(d - k, d - 1))
  order = np.argsort(variance)[::-1]
  return PCA(mean.astype(np.float32), vectors[:, order].T.astype(np.float32),
             variance[order].astype(np.float32), float(np.trace(cov)))


_recon_metrics = loops.jit(metrics.recon_metrics, static_argnames=("prefix", "with_ssim", "paper_window"))


# Enough rows to estimate a covariance of 4,096 pixels (64x64) closely; all of CIFAR-10's and
# MNIST's training images, 60,000 of dSprites' 737,280 (all of them took minutes on 2 cores).
PCA_FIT_IMAGES = 60_000


def pca_baseline(train: np.ndarray, test: np.ndarray, k: int, batch_size: int) -> dict:
  """PCA with k components fit on the training images (at most PCA_FIT_IMAGES of them, drawn
  without replacement with seed 0), scored on the test images as the VAE is:
  recon_{ssim,psnr_db,mse,ssim_paper_window} means, and paper_protocol_ssim of training image
  0. train, test: uint8[N, H, W, C]."""
  fit = train
  if len(train) > PCA_FIT_IMAGES:  # random, not strided: dSprites' grid is ordered by factor
    fit = train[np.sort(np.random.default_rng(0).choice(len(train), PCA_FIT_IMAGES, replace=False))]
  pca = fit_pca(fit.reshape(len(fit), -1), k, scale=1 / 255)
  shape = test.shape[1:]
  paper_window = min(shape[:2]) >= metrics.PAPER_SSIM_WINDOW

  def reconstruct(images):
    flat = images.reshape(len(images), -1).astype(np.float32) / 255
    return flat.reshape(images.shape), np.clip(pca.reconstruct(flat), 0, 1).reshape(images.shape)

  sums = {}
  for i in range(0, len(test), batch_size):
    per_image = _recon_metrics(*reconstruct(test[i:i + batch_size]), prefix="recon_",
                               paper_window=paper_window)
    for key, v in per_image.items():
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(v), dtype=np.float64))
  out = {"k": int(pca.components.shape[0]), "explained_variance_fraction": pca.explained_fraction,
         **{key: v / len(test) for key, v in sums.items()}}
  if paper_window:
    out["paper_protocol_ssim"] = float(metrics.paper_ssim(*reconstruct(train[:1]))[0])
  return out
