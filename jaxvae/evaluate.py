"""Metrics of a VAE on the whole test split, and the `evaluate` command.

Training calls `Evaluator` every epoch; it stays cheap: the ELBO and its two terms, and the
reconstruction quality (SSIM, PSNR, MSE) of images decoded from the posterior mean and from
the posterior sample the ELBO used. The command adds what costs more:

  python -m jaxvae.evaluate --workdir DIR [--iw_samples K]

restores the latest checkpoint of DIR, prints one table and writes DIR/eval.json with the
importance-weighted bound (IWAE), bits/dim from a likelihood over the 256 pixel levels, the
paper's own SSIM protocol, KL per latent dimension, active units, a PCA baseline of the
same size k beside the VAE (`jaxvae.baselines`) and, for data with factor labels (dSprites),
the disentanglement metrics MIG and DCI of the posterior means (`factor_metrics_of_run`).

Every number is a mean over the real (unpadded) test images, and a function of the run's eval
key only (`jaxvae.batching`). `jaxvae.report.estimators` says which estimator each key is.
"""

import copy
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxvae import baselines, data, disentanglement, distributions, fid, loops, metrics, models
from jaxvae import parallel, report, restore
from jaxvae.batching import Batched, batch_map, model_inputs, stream_keys
from jaxvae.elbo import elbo_terms
from jaxvae.objectives.iwae import iwae_bound


def discrete_log_likelihood(kind: str, x: jax.Array, obs: dict) -> jax.Array:
  """log P(x|z) of 8-bit (or binary) data as a probability, not a density. -> f32[B] nats.

  A Gaussian decoder is binned on the 256 levels (discretized Gaussian); the discrete
  likelihoods are their own.
  """
  if kind == "gaussian":
    return distributions.discretized_gaussian_log_prob(x, obs["mean"], obs["log_scale"])
  return distributions.log_likelihood(kind, x, obs)


# The KL split by latent dim, or for a top-down model by latent group (which groups carry
# information).
KL_SPLIT_KEY = {False: "kl_per_dim_nats", True: "kl_per_group_nats"}


def _eval_batch(params, x_uint8, index, batch_number, bin_key, elbo_key, *, model, binarize,
                full, in_loop):
  """Per-example metrics of one batch: dict of f32[B] (kl_per_dim_nats f32[B, K]). `full` adds
  the evaluate command's extras: the discrete ELBO of a Gaussian decoder, the SSIM of the
  posterior-draw reconstruction, and SSIM with the paper's window; `in_loop`: whether a
  compiled loop runs it (see `ssim`)."""
  original, x = model_inputs(x_uint8, index, bin_key, binarize)
  t = elbo_terms(params, jax.random.fold_in(elbo_key, batch_number), x, model=model)
  log_lik, kl, obs_sample = t["log_lik"], t["kl"], t["obs"]
  if model.top_down:
    obs_mean = model.apply(params, x, method="reconstruct")
  else:
    obs_mean = model.apply(params, t["mean"], method="decode_bottom")
  out = {"elbo_nats": log_lik - kl, "log_lik_nats": log_lik, "kl_nats": kl,
         KL_SPLIT_KEY[model.top_down]: t["kl_per_dim"]}
  if full and model.likelihood == "gaussian":
    out["elbo_discrete_nats"] = discrete_log_likelihood(model.likelihood, x, obs_sample) - kl
  paper_window = full and min(x.shape[1:3]) >= metrics.PAPER_SSIM_WINDOW
  for name, obs in (("mean", obs_mean), ("sample", obs_sample)):
    recon = distributions.likelihood_mean(model.likelihood, obs)
    # Per epoch, one SSIM: it is a third of the evaluation's time.
    out.update(metrics.recon_metrics(original, recon, f"recon_{name}_", full or name == "mean",
                             paper_window, in_loop))
  return out


class Evaluator:
  """Holds the padded test split on device and the compiled metric function.

  `evaluator(params, key)` -> dict of Python floats, means over the real test images:
    elbo_nats, log_lik_nats, kl_nats: the ELBO and its terms under the model's likelihood, one
      posterior draw per image and the analytic KL (two stochastic layers: the KL estimate of
      `jaxvae.elbo.elbo_terms` at that draw);
    recon_mean_{ssim,psnr_db,mse}, recon_sample_{psnr_db,mse}: images decoded from the
      posterior mean, and from that same posterior draw, against the original in [0, 1];
    bits_per_dim: the ELBO in bits per dimension, for discrete likelihoods;
    kl_per_dim_nats: a list of K floats, the analytic KL of each latent dim (they sum to
      kl_nats), so metrics.jsonl follows which dims switch on during training; with two
      layers, those of the top code given the drawn h1; a top-down model's KL of each latent
      group given the draws above it is kl_per_group_nats instead, and its "posterior mean"
      decodes every group's posterior mean in turn.
  With `full=True` (the evaluate command) also recon_sample_ssim, elbo_discrete_nats for a
  Gaussian decoder (the same draw scored by the discretized Gaussian; its bits_per_dim comes
  from it) and recon_*_ssim_paper_window (`paper_ssim`), when images are at least 7x7.
  """

  def __init__(self, model: models.VAE, config, test: data.Split, mesh, full: bool = False):
    self.split = Batched(test.images, config.eval.batch_size, mesh, loops.resolve(config, mesh, model))
    self.num_dims = int(np.prod(test.images.shape[1:]))
    self.likelihood = model.likelihood
    fn = self.split.map(lambda x, idx, i, params, bin_key, elbo_key: _eval_batch(
        params, x, idx, i, bin_key, elbo_key, model=model, binarize=config.data.binarize,
        full=full, in_loop=self.split.loop == "scan"))

    def mean(v, mask):  # f32[NB, B, ...] -> f32[...], over the real images
      real = mask.reshape(mask.shape + (1,) * (v.ndim - 2))
      return jnp.sum(jnp.where(real, v, 0.0), axis=(0, 1)) / mask.sum()

    means = loops.jit(lambda per_example, mask: {k: mean(v, mask) for k, v in per_example.items()})

    def run(images, index, mask, params, key):
      streams = stream_keys(key)
      return means(fn(images, index, params, streams.binarize, streams.elbo), mask)

    # A Python loop over batches cannot be traced into one program; then only its parts compile.
    self._run = run if self.split.loop == "per_step" else loops.jit(run)
    self._programs = (fn, means) if self.split.loop == "per_step" else (self._run,)

  def __call__(self, params, key: jax.Array) -> dict[str, float | list[float]]:
    split = self.split
    out = jax.device_get(self._run(split.images, split.index, split.mask, params, key))
    out = {k: float(v) if v.ndim == 0 else v.tolist() for k, v in out.items()}
    if "elbo_discrete_nats" in out or self.likelihood in distributions.DISCRETE_LIKELIHOODS:
      nats = out.get("elbo_discrete_nats", out["elbo_nats"])
      out["bits_per_dim"] = float(distributions.bits_per_dim(nats, self.num_dims))
    return out

  def cache_size(self) -> int:
    """Compilations of the most compiled program: 1 in a healthy run."""
    return max(program._cache_size() for program in self._programs)


def iwae_on_split(model: models.VAE, params, config, split: data.Split, mesh, key: jax.Array,
                  num_samples: int) -> dict[str, float]:
  """The IWAE bound with `num_samples` draws, scored by `discrete_log_likelihood`, averaged
  over the split: {"iwae": nats, "elbo": the K-draw ELBO of the same log-weights}.

  `config.eval.iw_batch_size` images x `config.eval.iw_chunk` draws are decoded at a time.
  """
  batched = Batched(split.images, config.eval.iw_batch_size, mesh, loops.resolve(config, mesh, model))
  streams = stream_keys(key)

  def one(x_uint8, index, batch_number, params):
    _, x = model_inputs(x_uint8, index, streams.binarize, config.data.binarize)
    return iwae_bound(
        params, jax.random.fold_in(streams.iwae, batch_number), x, model=model,
        num_samples=num_samples, chunk_size=config.eval.iw_chunk,
        log_lik_fn=lambda x, obs: discrete_log_likelihood(model.likelihood, x, obs),
        unroll=batched.loop == "per_step")

  per_example = batched.unpad(batched.map(one)(batched.images, batched.index, params))
  return {k: float(np.mean(v, dtype=np.float64)) for k, v in per_example.items()}


def posterior_stats(model: models.VAE, params, images: np.ndarray, key: jax.Array, binarize: str,
                    batch_size: int, mesh, loop: str, layer: int = -1
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Posterior means f32[N, K] and KL per latent dim f32[N, K] (nats) of uint8[N, H, W, C],
  binarized as `Evaluator` does with the same key; `loop` as `loops.resolve` gives it.

  `layer` indexes the model's stochastic layers (`posteriors`), bottom first; the default -1
  is the code. With two layers, the code's are those of q(h2|h1) at one draw h1 ~ q(h1|x) (as
  Burda et al. count the top layer's active units), and layer 0 gives the means of q(h1|x),
  with no KL (its prior is not N(0, I)): NaN.
  """
  batched = Batched(images, batch_size, mesh, loop)
  program = _posterior_program(model, binarize, batched.loop, batched.sharding, layer)
  streams = stream_keys(key)
  return batched.unpad(program(batched.images, batched.index, params, streams.binarize,
                               streams.elbo))


@functools.lru_cache(maxsize=16)
def _posterior_program(model: models.VAE, binarize: str, loop: str, sharding, layer: int):
  """`posterior_stats`' compiled pass, one per model, split layout and layer: the figures,
  drawn after every few evaluations, and the factor metrics reuse it instead of compiling
  anew."""

  def one(x_uint8, index, batch_number, params, bin_key, draw_key):
    _, x = model_inputs(x_uint8, index, bin_key, binarize)
    layers = model.apply(params, x, jax.random.fold_in(draw_key, batch_number),
                         method="posteriors")
    mean, log_scale = layers[layer]
    if layer % len(layers) != len(layers) - 1:
      return mean, jnp.full_like(mean, jnp.nan)  # a lower layer's prior is not N(0, I)
    return mean, distributions.kl_per_dim(mean, log_scale)

  return batch_map(one, loop, sharding)


def paper_protocol(model: models.VAE, params, image: np.ndarray, key: jax.Array,
                   binarize: str) -> dict[str, float]:
  """`paper_ssim` of ONE training image (uint8[H, W, C]) against its reconstruction decoded
  from the posterior mean and from one posterior sample, as the paper reported per epoch."""
  bin_key, z_key = jax.random.split(stream_keys(key).paper)
  original, x = model_inputs(jnp.asarray(image)[None], jnp.zeros((1,), jnp.int32), bin_key,
                             binarize)
  mean, log_scale = model.apply(params, x, method="encode")
  z = distributions.sample_diag_gaussian(z_key, mean, log_scale)[0]
  out = {}
  for name, latent in (("mean", mean), ("sample", z)):
    recon = distributions.likelihood_mean(model.likelihood,
                                          model.apply(params, latent, method="decode"))
    out[f"paper_protocol_ssim_{name}"] = float(metrics.paper_ssim(original, recon)[0])
  return out


FACTOR_SEED = 0  # fixed, not the run's: every run of a sweep is scored on the same images


def factor_sample_sizes(num_images: int) -> tuple[int, int]:
  """(num_points, num_test) of `disentanglement.factor_metrics` on a split of num_images: the
  protocol's 10,000 and 5,000, cut in the same 2:1 ratio when the split is smaller (a
  subsampled dSprites; MI's upward bias then grows)."""
  num_points, num_test = disentanglement.NUM_POINTS, disentanglement.NUM_TEST
  if num_images >= num_points + num_test:
    return num_points, num_test
  num_points = num_images * num_points // (num_points + num_test)
  return num_points, num_images - num_points


def factor_codes(model: models.VAE, params, config, split: data.Split, key: jax.Array,
                 mesh) -> tuple[np.ndarray, np.ndarray]:
  """Posterior means f32[N, K] and factor labels int32[N, F] of N = num_points + num_test
  images of `split` (`factor_sample_sizes`) drawn without replacement with FACTOR_SEED."""
  n = sum(factor_sample_sizes(len(split.images)))
  rows = np.sort(np.random.default_rng(FACTOR_SEED).choice(len(split.images), n, replace=False))
  means, _ = posterior_stats(model, params, split.images[rows], key, config.data.binarize,
                             config.eval.batch_size, mesh, loops.resolve(config, mesh, model))
  return means, split.factors[rows]


def factor_mutual_info(model: models.VAE, params, config, ds: data.Dataset, key: jax.Array,
                       mesh) -> np.ndarray:
  """`factor_metrics_of_run`'s mutual_info_nats f64[K, F] (binned latent x factor, nats) without
  DCI's forests. On the full protocol (15,000 points, 10 latents, 2 CPU cores) MIG's part took
  0.3 s and factor_metrics 22 s, so the figures, drawn during training, use this."""
  codes, factors = factor_codes(model, params, config, ds.train, key, mesh)
  train, _ = disentanglement.protocol_rows(len(codes), FACTOR_SEED,
                                           *factor_sample_sizes(len(ds.train.images)))
  return disentanglement.mig(codes[train], factors[train]).mutual_info


def factor_metrics_of_run(run, mesh) -> dict:
  """`disentanglement.factor_metrics` (MIG, DCI) of a restored run's posterior means on its
  factor-labelled train split (for dSprites, the whole factor grid), with FACTOR_SEED."""
  ds = run.dataset
  if ds.train.factors is None:
    raise ValueError(f"{ds.name} has no factor labels; factor metrics need a factor-labelled "
                     "source such as data.source=sprites")
  codes, factors = factor_codes(run.model, run.params, run.config, ds.train, run.keys.eval,
                                mesh)
  num_points, num_test = factor_sample_sizes(len(ds.train.images))
  out = disentanglement.factor_metrics(codes, factors, ds.factor_names, seed=FACTOR_SEED,
                                       num_points=num_points, num_test=num_test)
  out["estimators"]["codes"] = (
      f"posterior means of {num_points + num_test} of the {len(ds.train.images)} train-split "
      f"images (for dSprites, the factor grid), drawn without replacement with seed "
      f"{FACTOR_SEED}, the same images for every run")
  return out


def domain_dataset(run, domain: str) -> data.Dataset:
  """The run's dataset drawn in another sprites `domain` (`sprites.restyle`): the same images,
  order and factor labels."""
  if run.config.data.source != "sprites":
    raise ValueError(f"domains are drawn for data.source='sprites' only, not "
                     f"{run.config.data.source!r}")
  if domain == run.config.data.sprites_domain:
    return run.dataset
  data_cfg = copy.deepcopy(run.config.data)
  data_cfg.sprites_domain = domain
  return data.load(data_cfg)


def transfer_of_run(run, domains, mesh) -> dict:
  """Zero-shot transfer of a restored run's codes from its training domain to other sprites
  `domains` (DARLA, Higgins et al. 2017), as a JSON-friendly dict.

  The posterior means of the same images as `factor_metrics_of_run` (its rows, FACTOR_SEED) are
  taken in every domain; factor predictors (`disentanglement.transfer`: DCI's forest and a
  linear one) are trained on the source domain's codes of its num_points rows and score each
  domain's codes of the other num_test rows; MIG is each domain's own (num_points rows).
  """
  source = run.config.data.sprites_domain
  codes = {}
  for domain in (source, *[d for d in domains if d != source]):
    split = domain_dataset(run, domain).train
    codes[domain], factors = factor_codes(run.model, run.params, run.config, split,
                                          run.keys.eval, mesh)
  num_points, num_test = factor_sample_sizes(len(run.dataset.train.images))
  train, test = disentanglement.protocol_rows(len(factors), FACTOR_SEED, num_points, num_test)
  accuracy = disentanglement.transfer(codes[source][train], factors[train],
                                      {d: c[test] for d, c in codes.items()}, factors[test],
                                      seed=FACTOR_SEED)
  names = list(run.dataset.factor_names)
  out = {"source": source, "domains": list(codes), "factor_names": names,
         "num_train": num_points, "num_test": num_test,
         "mig": {d: disentanglement.mig(c[train], factors[train]).score for d, c in codes.items()},
         "accuracy": {p: {d: {"mean": float(a.mean()), "per_factor": dict(zip(names, a.tolist()))}
                          for d, a in by_domain.items()} for p, by_domain in accuracy.items()},
         "chance": dict(zip(names, (1 / size for size in run.dataset.factor_sizes)))}
  out["estimators"] = (
      f"posterior means of {num_points + num_test} train-split images (seed {FACTOR_SEED}) drawn "
      f"in each domain; per factor a predictor trained on the {source!r} codes of {num_points} "
      f"of them scores the codes of the other {num_test} in each domain (forest: DCI's "
      f"RandomForestClassifier; linear: standardized logistic regression); accuracy 'mean' is "
      "over factors; mig: each domain's own MIG on the training rows; chance: 1 / classes")
  return out


def transfer_markdown(results: dict[str, dict]) -> str:
  """A markdown table of `transfer_of_run` results by run name: per run and predictor, the mean
  factor accuracy per domain and its drop from the source's, then MIG per domain."""
  first = next(iter(results.values()))
  domains, source = first["domains"], first["source"]
  lines = ["| run | predictor | " + " | ".join(domains) + " | largest drop (points) |",
           "|---|---|" + "---|" * (len(domains) + 1)]
  for name, r in results.items():
    for predictor, by_domain in r["accuracy"].items():
      acc = [100 * by_domain[d]["mean"] for d in domains]
      drop = max(acc[domains.index(source)] - a for a in acc)
      lines.append(f"| {name} | {predictor} accuracy (%) | "
                   + " | ".join(f"{a:.1f}" for a in acc) + f" | {drop:.1f} |")
    lines.append(f"| {name} | MIG | " + " | ".join(f"{r['mig'][d]:.3f}" for d in domains) + " | |")
  return "\n".join(lines) + "\n"


def check_iw_samples(iw_samples: int) -> None:
  if iw_samples <= 0:
    raise restore.RunError(f"--iw_samples={iw_samples} must be a positive number of importance "
                           "samples, e.g. 1000")


def evaluate_run(run, iw_samples: int | None = None, name: str = "") -> dict:
  """Every metric of a restored run (`jaxvae.restore.restore_run`), called `name`, on its test split.

  Returns the eval.json dict: the run's identity, "vae" and "pca" metrics, KL per dim, the
  posterior-mean variance per dim, "estimators", seconds per stage and, when the data has
  factor labels, "factors" (`factor_metrics_of_run`: MIG, DCI, their protocol).
  """
  config, ds, model = run.config, run.dataset, run.model
  iw_samples = config.eval.iw_samples if iw_samples is None else iw_samples
  check_iw_samples(iw_samples)
  mesh = parallel.make_mesh()
  seconds = {}

  def timed(stage, fn, *args):
    t = time.time()
    out = fn(*args)
    seconds[stage] = round(time.time() - t, 2)
    return out

  if model.top_down:
    return _top_down_result(run, iw_samples, mesh, timed, name, seconds)
  vae, kl, variance = _vae_metrics(run, iw_samples, mesh, timed)
  pca = timed("pca", baselines.pca_baseline, ds.train.images, ds.test.images, model.code_dim,
              config.eval.batch_size)
  result = {
      "run": name,
      "epoch": int(run.progress["epoch"]), "step": int(run.state.step),
      "dataset": ds.name, "num_test_images": len(ds.test.images), "image_shape": ds.image_shape,
      "likelihood": model.likelihood, "latent_dim": model.code_dim,
      "iw_samples": iw_samples, "vae": vae, "pca": pca,
      "kl_per_dim_nats": kl.mean(axis=0).tolist(),
      "posterior_mean_variance": variance.tolist(),
      "estimators": report.estimators(model.likelihood, config.data.binarize, ds.image_shape,
                                      iw_samples, model.stochastic_layers),
      "seconds": seconds,
  }
  if ds.train.factors is not None:
    result["factors"] = timed("factors", factor_metrics_of_run, run, mesh)
  return result


def _top_down_result(run, iw_samples: int, mesh, timed, name: str, seconds: dict) -> dict:
  """evaluate_run's dict for a top-down model: the ELBO, reconstructions and the IWAE bound,
  and the test-mean KL of each latent group. It has no single code, so no PCA of the same
  size, active units, posterior variance or factor metrics."""
  config, ds, model, params = run.config, run.dataset, run.model, run.params
  vae = timed("elbo_and_recon", Evaluator(model, config, ds.test, mesh, full=True), params,
              run.keys.eval)
  kl_groups = vae.pop(KL_SPLIT_KEY[True])
  iw = timed("iwae", iwae_on_split, model, params, config, ds.test, mesh, run.keys.eval,
             iw_samples)
  vae["iwae_nats"], vae["iwae_elbo_nats"] = iw["iwae"], iw["elbo"]
  vae["iwae_bits_per_dim"] = float(distributions.bits_per_dim(iw["iwae"],
                                                              int(np.prod(ds.image_shape))))
  return {
      "run": name, "epoch": int(run.progress["epoch"]), "step": int(run.state.step),
      "dataset": ds.name, "num_test_images": len(ds.test.images), "image_shape": ds.image_shape,
      "likelihood": model.likelihood, "latent_groups": model.num_groups,
      "iw_samples": iw_samples, "vae": vae, "kl_per_group_nats": kl_groups,
      "estimators": report.estimators(model.likelihood, config.data.binarize, ds.image_shape,
                                      iw_samples, model.stochastic_layers, top_down=True),
      "seconds": seconds,
  }


def _vae_metrics(run, iw_samples: int, mesh, timed) -> tuple[dict, np.ndarray, np.ndarray]:
  """evaluate_run's "vae" section, the KL per dim f32[N, K] and the posterior-mean variance
  f32[K]; `timed(stage, fn, *args)` calls fn and records its seconds."""
  config, ds, model, params = run.config, run.dataset, run.model, run.params
  key = run.keys.eval
  sfx = "_discrete" if model.likelihood == "gaussian" else ""
  vae = timed("elbo_and_recon", Evaluator(model, config, ds.test, mesh, full=True), params, key)
  del vae["kl_per_dim_nats"]  # eval.json holds it once, at its top level
  iw = timed("iwae", iwae_on_split, model, params, config, ds.test, mesh, key, iw_samples)
  vae[f"iwae{sfx}_nats"] = iw["iwae"]
  vae[f"iwae_elbo{sfx}_nats"] = iw["elbo"]
  vae["iwae_bits_per_dim"] = float(distributions.bits_per_dim(iw["iwae"],
                                                              int(np.prod(ds.image_shape))))
  stats_args = (model, params, ds.test.images, key, config.data.binarize, config.eval.batch_size,
                mesh, loops.resolve(config, mesh, model))
  means, kl = timed("posterior", posterior_stats, *stats_args)
  vae["active_units"], variance = metrics.active_units(means)
  # Burda et al. count each layer: "active units" is the top code's, as for one layer.
  lower = [metrics.active_units(posterior_stats(*stats_args, layer=i)[0])[0]
           for i in range(model.stochastic_layers - 1)]
  if lower:
    vae["active_units_per_layer"] = lower + [vae["active_units"]]
  if min(ds.image_shape[:2]) >= metrics.PAPER_SSIM_WINDOW:
    vae.update(paper_protocol(model, params, ds.train.images[0], key, config.data.binarize))
  return vae, kl, variance


def main(argv):
  workdir = flags.FLAGS.workdir
  # Bad counts are refused before the run is restored and evaluated, not after.
  if flags.FLAGS.iw_samples is not None:
    check_iw_samples(flags.FLAGS.iw_samples)
  if flags.FLAGS.fid:
    fid.check_num_samples(flags.FLAGS.fid)
  run = restore.restore_for_command(argv, workdir)
  if flags.FLAGS.transfer:
    write_transfer(run, flags.FLAGS.transfer, workdir)
    return
  result = evaluate_run(run, flags.FLAGS.iw_samples, os.path.basename(os.path.abspath(workdir)))
  if flags.FLAGS.fid:
    result["fid"] = fid.fid_of_run(run, flags.FLAGS.fid)
  print(report.report(result))
  if "fid" in result:
    print(fid.format_fid(result["fid"]))
  path = os.path.join(workdir, "eval.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


def write_transfer(run, domains, workdir: str) -> None:
  """`transfer_of_run` to WORKDIR/transfer.json and transfer.md, and the table printed."""
  result = transfer_of_run(run, domains, parallel.make_mesh())
  name = os.path.basename(os.path.abspath(workdir))
  with open(os.path.join(workdir, "transfer.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = transfer_markdown({name: result})
  with open(os.path.join(workdir, "transfer.md"), "w") as f:
    f.write(table)
  print(table + f"wrote {workdir}/transfer.json and transfer.md")


if __name__ == "__main__":  # flags defined only here: train.py, which imports this, has --workdir
  flags.DEFINE_string("workdir", None, "A training run's --workdir (config.json, checkpoints/).")
  flags.DEFINE_integer("iw_samples", None, "K, importance samples per image for the IWAE bound "
                       "(default config.eval.iw_samples).")
  flags.DEFINE_integer("fid", 0, "N > 0: FID and KID of N prior samples and of N test "
                       "reconstructions against the training split (jaxvae/fid.py, docs/fid.md).")
  flags.DEFINE_list("transfer", None, "Sprites domains (jaxvae/sprites.py DOMAINS, e.g. "
                    "dim,grey,noise,stripes): instead of the metrics, score zero-shot transfer "
                    "of factor predictors from the run's domain to these (transfer.json, .md).")
  flags.mark_flags_as_required(["workdir"])
  app.run(restore.exit_on_user_error(main))
