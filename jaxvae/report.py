"""What the evaluate command prints and writes: the estimators of eval.json's keys and the
table of one or several runs."""

import numpy as np

from jaxvae import disentanglement, metrics


def estimators(likelihood: str, binarize: str, image_shape, iw_samples: int,
               layers: int = 1, top_down: bool = False) -> dict[str, str]:
  """What each key of eval.json's "vae" and "pca" sections estimates, and how, for a model of
  `layers` stochastic layers, or a top-down hierarchy of latent groups (`jaxvae.topdown`)."""
  model_lik = {
      "gaussian": "Gaussian density on [0,1] pixels (continuous, not a probability of 8-bit data)",
      "bernoulli": f"Bernoulli on binarized pixels (binarize={binarize})",
      "discretized_logistic": "discretized logistic over the 256 pixel levels",
      "mixture_logistic": "mixture of discretized logistics over the 256 pixel levels, colour "
                          "channels coupled (PixelCNN++)"}[likelihood]
  discrete = ("the Gaussian decoder binned on the 256 pixel levels (discretized Gaussian)"
              if likelihood == "gaussian" else model_lik)
  sfx = "_discrete" if likelihood == "gaussian" else ""
  size, sigma = metrics.ssim_filter(*image_shape[:2])
  out = {
      "elbo_nats": f"ELBO, one posterior draw per image, analytic KL; {model_lik}",
      "log_lik_nats": "E_q[log p(x|z)] from the ELBO's draw",
      "kl_nats": "KL(q(z|x) || N(0, I)), analytic",
      "bits_per_dim": f"-ELBO / (D ln 2), D = {int(np.prod(image_shape))}; {discrete}",
      f"iwae{sfx}_nats": f"IWAE bound: logsumexp of K={iw_samples} log-weights - log K; {discrete}",
      f"iwae_elbo{sfx}_nats": f"mean of the same K={iw_samples} log-weights (ELBO, Monte Carlo KL)",
      "iwae_bits_per_dim": f"the IWAE bound per dimension; {discrete}",
      "recon_mean_*": "reconstruction decoded from the posterior mean",
      "recon_sample_*": "reconstruction decoded from one posterior draw (the ELBO's)",
      "*_ssim": f"dm-pix SSIM, max_val 1, {size}x{size} Gaussian window (sigma {sigma:.2f}), "
                "against the original in [0, 1], mean over the test split",
      "*_ssim_paper_window": "the paper's SSIM settings (scikit-image then: 7x7 uniform window, "
                             "data_range 2), mean over the test split",
      "paper_protocol_ssim*": "paper protocol: the paper's SSIM settings on ONE training image "
                              "(index 0), as the paper reported it",
      "*_psnr_db": "PSNR in dB, peak 1, mean over images",
      "*_mse": "mean squared error per pixel and channel, [0, 1] units",
      "active_units": f"dims j with Cov_x(E_q[z_j|x]) > {metrics.ACTIVE_UNIT_THRESHOLD} over the test "
                      "split",
      "active_units_per_layer": "two stochastic layers: the active units of h1 (means of "
                                "q(h1|x)) and of the top code (means of q(h2|h1) at one draw "
                                "of h1), as Burda et al. count them",
      "kl_per_dim_nats": "KL per latent dim, analytic, mean over the test split (two layers: "
                         "the top code's given the ELBO's draw of h1)",
      "pca": "PCA with k = latent_dim components fit on the training split (k capped at D)",
  }
  if likelihood == "gaussian":
    out["elbo_discrete_nats"] = f"ELBO with the same draw and KL; {discrete}"
  if layers == 2:
    out["elbo_nats"] = f"ELBO, one draw of h1 ~ q(h1|x) and h2 ~ q(h2|h1) per image; {model_lik}"
    out["kl_nats"] = ("KL(q(h1, h2|x) || p(h1, h2)) estimated at that draw: log q(h1|x) - "
                      "log p(h1|h2) + KL(q(h2|h1) || N(0, I)), the last analytic")
    out[f"iwae_elbo{sfx}_nats"] = (f"mean of the same K={iw_samples} log-weights (ELBO, Monte "
                                   "Carlo KL); each weight draws h1, then h2 given h1")
    out["active_units"] = (f"code dims j with Cov_x(E_q[h2_j|h1]) > {metrics.ACTIVE_UNIT_THRESHOLD} "
                           "over the test split, h1 drawn once per image")
  else:
    del out["active_units_per_layer"]
  if top_down:
    _top_down_estimators(out, model_lik, iw_samples)
  return out


def _top_down_estimators(out: dict, model_lik: str, iw_samples: int) -> None:
  """`estimators` of a top-down model, in place: its KL is a sum over groups, and it has no
  single code (no PCA of the same size, no active units)."""
  for key in ("active_units", "active_units_per_layer", "kl_per_dim_nats", "pca"):
    out.pop(key, None)
  out["elbo_nats"] = f"ELBO, one draw through every latent group per image; {model_lik}"
  out["kl_nats"] = ("sum over groups l of KL(q(z_l|x, z_<l) || p(z_l|z_<l)), each analytic "
                    "given that draw of the groups above")
  out["kl_per_group_nats"] = "each group's KL in that sum, mean over the test split"
  out["iwae_elbo_nats"] = (f"mean of the same K={iw_samples} log-weights log p(x, z) - "
                           "log q(z|x), each a draw through every group")
  out["recon_mean_*"] = "reconstruction decoded along every group's posterior mean in turn"


def _cell(v) -> str:
  """A table cell: strings as they are, None (not computed) as n/a, numbers to 4 decimals."""
  if isinstance(v, str):
    return v
  if v is None:
    return "n/a"
  return f"{v:.2f}" if abs(v) >= 100 else f"{v:.4f}"


def format_table(result: dict) -> str:
  """The results table: VAE (posterior mean), VAE (posterior draw) and PCA side by side."""
  if "kl_per_group_nats" in result:
    return format_top_down_table(result)
  vae, pca, k = result["vae"], result["pca"], result["iw_samples"]
  sfx = "_discrete" if result["likelihood"] == "gaussian" else ""
  lik = "discretized Gaussian" if sfx else result["likelihood"]
  layers = vae.get("active_units_per_layer")  # two stochastic layers only
  kl_how = "analytic" if layers is None else "same draw; analytic for the top layer only"
  rows = [  # label, VAE, VAE z~q, PCA ("" where it does not apply), estimator
      ("ELBO (nats/image)", vae["elbo_nats"], "", "",
       f"1 draw/image, {'analytic' if layers is None else 'estimated'} KL, "
       f"{result['likelihood']} likelihood"),
      ("  E_q log p(x|z) (nats/image)", vae["log_lik_nats"], "", "", "same draw"),
      ("  KL (nats/image)", vae["kl_nats"], "", "", kl_how),
  ]
  if sfx:
    rows.append(("ELBO, discrete (nats/image)", vae["elbo_discrete_nats"], "", "",
                 "same draw, Gaussian binned on 256 levels"))
  rows += [
      ("ELBO (bits/dim)", vae.get("bits_per_dim"), "", "", lik),
      (f"IWAE K={k} (nats/image)", vae[f"iwae{sfx}_nats"], "", "", f"{lik}, >= ELBO"),
      (f"IWAE K={k} (bits/dim)", vae["iwae_bits_per_dim"], "", "", lik),
      ("ELBO of the IWAE draws (nats/image)", vae[f"iwae_elbo{sfx}_nats"], "", "",
       f"mean of the {k} log-weights"),
      ("SSIM", vae["recon_mean_ssim"], vae["recon_sample_ssim"], pca["recon_ssim"],
       "dm-pix, Gaussian window, test split"),
      ("SSIM, paper window", vae.get("recon_mean_ssim_paper_window"),
       vae.get("recon_sample_ssim_paper_window"), pca.get("recon_ssim_paper_window"),
       "7x7 uniform, data_range 2, test split"),
      ("SSIM, paper protocol", vae.get("paper_protocol_ssim_mean"),
       vae.get("paper_protocol_ssim_sample"), pca.get("paper_protocol_ssim"),
       "paper window, ONE training image"),
      ("PSNR (dB)", vae["recon_mean_psnr_db"], vae["recon_sample_psnr_db"], pca["recon_psnr_db"],
       "peak 1, test split"),
      ("MSE (per pixel)", vae["recon_mean_mse"], vae["recon_sample_mse"], pca["recon_mse"],
       "[0, 1] units, test split"),
      ("active units", f"{vae['active_units']}/{result['latent_dim']}", "", "",
       f"Cov_x E_q[z] > {metrics.ACTIVE_UNIT_THRESHOLD}"),
  ]
  if layers is not None:
    rows.append(("active units per layer", " + ".join(map(str, layers)), "", "",
                 "h1, then the code h2 (its means at one draw of h1)"))
  cells = [("metric", "VAE", "VAE z~q", f"PCA k={pca['k']}", "estimator")]
  cells += [(label, *map(_cell, values), note) for label, *values, note in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(5)]
  lines = [f"{result['run']}: {result['dataset']} test split ({result['num_test_images']} images), "
           f"epoch {result['epoch']}, step {result['step']}, {result['likelihood']} likelihood, "
           f"k={result['latent_dim']}",
           "VAE: likelihood bounds, and reconstructions decoded from the posterior mean; "
           "VAE z~q: decoded from one posterior draw"]
  for i, row in enumerate(cells):
    lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                         zip(row[1:4], widths[1:4])] + [row[4]]))
    if i == 0:
      lines.append("-" * (sum(widths) + 8))
  kl = np.asarray(result["kl_per_dim_nats"])
  lines.append("KL per latent dim (nats), largest first: "
               + ", ".join(f"z{j} {kl[j]:.3g}" for j in np.argsort(kl)[::-1][:8]))
  return "\n".join(lines)


def format_top_down_table(result: dict) -> str:
  """The results table of a top-down model (`jaxvae.topdown`): its bounds, reconstructions
  and the KL of each latent group."""
  vae, k = result["vae"], result["iw_samples"]
  rows = [("ELBO (nats/image)", vae["elbo_nats"]), ("  E_q log p(x|z)", vae["log_lik_nats"]),
          ("  KL, all groups", vae["kl_nats"]), ("ELBO (bits/dim)", vae.get("bits_per_dim")),
          (f"IWAE K={k} (nats/image)", vae["iwae_nats"]),
          (f"IWAE K={k} (bits/dim)", vae["iwae_bits_per_dim"]),
          ("SSIM, posterior means", vae["recon_mean_ssim"]),
          ("SSIM, posterior draw", vae["recon_sample_ssim"]),
          ("PSNR (dB), posterior means", vae["recon_mean_psnr_db"])]
  width = max(len(label) for label, _ in rows)
  lines = [f"{result['run']}: {result['dataset']} test split ({result['num_test_images']} images), "
           f"epoch {result['epoch']}, step {result['step']}, {result['likelihood']} likelihood, "
           f"{result['latent_groups']} latent groups (top-down)"]
  lines += [f"{label.ljust(width)}  {_cell(v)}" for label, v in rows]
  kl = result["kl_per_group_nats"]
  lines.append("KL per latent group, top first (nats): " + ", ".join(f"{v:.3g}" for v in kl))
  return "\n".join(lines)


def report(result: dict) -> str:
  """What the evaluate command prints: `format_table`, then the factor metrics' table when
  eval.json has them (`disentanglement.format_table`), then the seconds per stage."""
  parts = [format_table(result)]
  if "factors" in result:
    parts += [f"factor metrics: {result['factors']['estimators']['codes']}",
              disentanglement.format_table(result["factors"])]
  parts.append("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
  return "\n".join(parts)
