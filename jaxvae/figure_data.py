"""The arrays the figures draw: decoded images and latent statistics of one checkpoint, all
from the run's fixed eval key, so a figure of epoch 10 and one of epoch 20 show the same test
images and the same prior draws. Images are f32[..., H, W, C] in [0, 1]. `jaxvae.figures`
draws them; nothing here draws.
"""

import dataclasses

import jax
import numpy as np

from jaxvae import batching, data, distributions, evaluate, loops, metrics, models, parallel
from jaxvae import sample

NUM_RECONSTRUCTIONS = 10
PRIOR_GRID = 8          # an 8 x 8 grid of prior samples
NEIGHBOURS = (6, 8)     # 6 test images, 8 neighbours each
NEIGHBOUR_SCALE = 0.1   # the paper's z + 0.1 * noise
INTERP_PAIRS, INTERP_STEPS = 4, 10
TRAVERSAL_DIMS = 8
TRAVERSAL_VALUES = np.linspace(-3.0, 3.0, 9)  # in units of the prior's standard deviation
FACTOR_TRAVERSAL_DIMS = 16  # rows of the factor traversals at most: the dims of largest KL
FACTOR_TRAVERSAL_VALUES = np.linspace(-2.5, 2.5, 11)
SAMPLE_TEMPERATURES = (1.0, 0.9, 0.8, 0.6)  # a top-down model's (VD-VAE shows these)
DOMAIN_TRAVERSAL_DIMS, DOMAIN_TRAVERSAL_VALUES = 6, np.linspace(-2.0, 2.0, 5)


@dataclasses.dataclass
class Scene:
  """One checkpoint's model and data, the eval key, and the test split's posterior statistics."""
  model: models.VAE
  params: object
  ds: data.Dataset
  config: object
  key: jax.Array        # the eval key
  means: np.ndarray     # f32[N, K] posterior means of the test split
  kl_dim: np.ndarray    # f32[K] KL per latent dim, test mean (nats)
  variance: np.ndarray  # f32[K] variance of the posterior means over the test split
  shown: np.ndarray     # int32[NUM_RECONSTRUCTIONS] test images that visit every class

  @property
  def streams(self) -> batching.Streams:
    return batching.stream_keys(self.key)

  def decode(self, z) -> np.ndarray:
    return np.asarray(sample.decode_mean(self.model, self.params, z))


def scene(model: models.VAE, params, ds: data.Dataset, config, key: jax.Array) -> Scene:
  """The `Scene` of `params`: one encoder pass over the test split (this process's devices)."""
  mesh = parallel.make_mesh(local=True)
  means, kl = evaluate.posterior_stats(model, params, ds.test.images, key, config.data.binarize,
                                       config.eval.batch_size, mesh,
                                       loops.resolve(config, mesh, model))
  return Scene(model, params, ds, config, key, means, kl.mean(axis=0),
               metrics.active_units(means)[1], spread(ds.test.labels, NUM_RECONSTRUCTIONS))


def reconstructions(s: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Figure 17: the shown test images, decoded from their posterior mean and from a posterior
  draw (the ELBO's stream): three f32[N, H, W, C]."""
  originals, x = batching.model_inputs(s.ds.test.images[s.shown], s.shown, s.streams.binarize,
                                       s.config.data.binarize)
  mean, log_scale = s.model.apply(s.params, x, method="encode")
  z = distributions.sample_diag_gaussian(s.streams.elbo, mean, log_scale)[0]
  return np.asarray(originals), s.decode(mean), s.decode(z)


def prior_grid(s: Scene) -> np.ndarray:
  """Figure 19: decoded prior draws, f32[PRIOR_GRID, PRIOR_GRID, H, W, C]."""
  k_prior = jax.random.split(s.streams.figures, 3)[1]
  prior = np.asarray(sample.prior_samples(s.model, s.params, k_prior, PRIOR_GRID ** 2))
  return prior.reshape((PRIOR_GRID, PRIOR_GRID) + prior.shape[1:])


def neighbourhood_grid(s: Scene) -> np.ndarray:
  """Figure 20: per shown test image (rows), the original, its decoded posterior mean and
  NEIGHBOURS[1] decoded neighbours z + NEIGHBOUR_SCALE * eps: f32[rows, 2 + cols, H, W, C]."""
  k_neigh = jax.random.split(s.streams.figures, 3)[0]
  rows, cols = min(NEIGHBOURS[0], len(s.shown)), NEIGHBOURS[1]
  originals = np.asarray(data.to_unit_interval(s.ds.test.images[s.shown[:rows]], None))
  centres = s.means[s.shown[:rows]]
  neigh = np.asarray(sample.neighbourhood(s.model, s.params, k_neigh, centres, cols,
                                          NEIGHBOUR_SCALE))
  return np.concatenate([originals[:, None], s.decode(centres)[:, None], neigh], axis=1)


def interpolation_pairs(s: Scene) -> np.ndarray:
  """The test pairs int[INTERP_PAIRS, 2] that the interpolations join."""
  return pairs(s.ds.test.labels, INTERP_PAIRS, jax.random.split(s.streams.figures, 3)[2])


def interpolation_grid(s: Scene, kind: str, between: np.ndarray) -> np.ndarray:
  """`kind` ("linear" or "spherical") interpolation between the posterior means of each pair,
  its originals at both ends: f32[pairs, INTERP_STEPS + 2, H, W, C]."""
  fn = {"linear": sample.lerp, "spherical": sample.slerp}[kind]
  path_z = fn(s.means[between[:, 0]], s.means[between[:, 1]], INTERP_STEPS)
  ends = [np.asarray(data.to_unit_interval(s.ds.test.images[between[:, i]], None))[:, None]
          for i in (0, 1)]
  return np.concatenate([ends[0], s.decode(path_z), ends[1]], axis=1)


def largest_kl_dims(s: Scene, num: int) -> np.ndarray:
  """The `num` latent dims of largest KL, largest first."""
  return np.argsort(s.kl_dim)[::-1][:num]


def traversal_grid(s: Scene, dims, values) -> np.ndarray:
  """Each dim of `dims` moved through `values` around the first shown test image's posterior
  mean, the others held: f32[len(dims), len(values), H, W, C]."""
  return s.decode(sample.traversal(s.means[s.shown[0]], [int(d) for d in dims], values))


def factor_of_each_dim(s: Scene) -> list[str]:
  """Per latent dim, the factor it shares the most information with (`factor_labels`)."""
  mi = evaluate.factor_mutual_info(s.model, s.params, s.config, s.ds, s.key,
                                   parallel.make_mesh(local=True))
  return factor_labels(mi, s.variance > metrics.ACTIVE_UNIT_THRESHOLD, s.ds.factor_names)


def factor_labels(mutual_info: np.ndarray, active: np.ndarray, factor_names) -> list[str]:
  """What each latent dim captures best: "factor (MI x.xx nats)" for the factor of largest
  binned MI with it (mutual_info f[K, F] nats, ties to the first factor), "—" for an inactive
  dim (active bool[K])."""
  best = np.argmax(mutual_info, axis=1)
  return [f"{factor_names[f]} (MI {mutual_info[k, f]:.2f} nats)" if active[k] else "\u2014"
          for k, f in enumerate(best)]


def tensorboard_images(model, params, ds: data.Dataset, config, key) -> dict[str, np.ndarray]:
  """What TensorBoard shows at each evaluation, f32[N, H, W, C] in [0, 1] each: test images
  beside their reconstructions from the posterior mean, and prior samples (the eval `key`)."""
  streams = batching.stream_keys(key)
  shown = spread(ds.test.labels, NUM_RECONSTRUCTIONS)
  originals, x = batching.model_inputs(ds.test.images[shown], shown, streams.binarize,
                                       config.data.binarize)
  recon = sample.reconstruct_mean(model, params, x)
  prior = sample.prior_samples(model, params, jax.random.split(streams.figures, 3)[1],
                               NUM_RECONSTRUCTIONS)
  return {"test_and_reconstruction": np.concatenate([originals, recon], axis=2),
          "prior_samples": np.asarray(prior)}


def temperature_grid(model: models.VAE, params, key: jax.Array, num: int = 10) -> np.ndarray:
  """`num` prior samples of a top-down model at each of SAMPLE_TEMPERATURES, the same draws
  scaled (the eval `key`): f32[T, num, H, W, C]."""
  k = jax.random.split(batching.stream_keys(key).figures, 3)[1]
  return np.stack([np.asarray(sample.prior_samples(model, params, k, num, t))
                   for t in SAMPLE_TEMPERATURES])


def spread(labels: np.ndarray, num: int) -> np.ndarray:
  """`num` indices int32[num] that visit every class in turn (the first image of each class,
  then the second, ...), so figures do not show one class of a split stored sorted by class."""
  rank = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    rank[labels == c] = np.arange(np.sum(labels == c))
  order = np.lexsort((labels, rank))  # by rank within its class, then by class
  return order[:num].astype(np.int32)


def pairs(labels: np.ndarray, num: int, key: jax.Array) -> np.ndarray:
  """`num` random pairs of indices int[num, 2], the second of another class where one exists."""
  first_key, second_key = jax.random.split(key)
  first = np.asarray(jax.random.choice(first_key, len(labels), (num,), replace=num > len(labels)))
  score = np.asarray(jax.random.uniform(second_key, (num, len(labels))))
  score = score + (labels[None, :] != labels[first][:, None])  # other classes win the argmax
  return np.stack([first, score.argmax(axis=1)], axis=1)


def side_by_side(runs, num: int = NUM_RECONSTRUCTIONS) -> tuple[np.ndarray, dict, dict]:
  """What `figures.plot_compare_images` shows of several restored runs of one dataset: the
  first run's shown test images (originals f32[num, H, W, C]), and per run name its decoded
  posterior means of them and its decoding of the same `num` prior draws (the first run's eval
  key), f32[num, H, W, C] each. `runs` maps names to `restore.TrainedRun`s."""
  first = next(iter(runs.values()))
  shown = spread(first.dataset.test.labels, num)
  streams = batching.stream_keys(first.keys.eval)
  originals, x = batching.model_inputs(first.dataset.test.images[shown], shown,
                                       streams.binarize, first.config.data.binarize)
  z = jax.random.normal(jax.random.split(streams.figures, 3)[1], (num, first.model.code_dim))
  recons = {n: np.asarray(sample.reconstruct_mean(r.model, r.params, x)) for n, r in runs.items()}
  samples = {n: np.asarray(sample.decode_mean(r.model, r.params, z)) for n, r in runs.items()}
  return np.asarray(originals), recons, samples


def domain_traversals(run, domains) -> tuple[dict, dict, np.ndarray]:
  """What `figures.plot_domain_traversals` shows of a restored sprites run: one test image drawn
  in each of `domains` (`evaluate.domain_dataset`) and, per domain, the run's
  DOMAIN_TRAVERSAL_DIMS latent dims of largest KL (on its own domain's test split) moved through
  DOMAIN_TRAVERSAL_VALUES around that drawing's posterior mean: ({domain: f32[D, V, H, W, C]},
  {domain: the image f32[H, W, C]}, the dims int[D])."""
  s = scene(run.model, run.params, run.dataset, run.config, run.keys.eval)
  dims, centre = largest_kl_dims(s, DOMAIN_TRAVERSAL_DIMS), s.shown[0]
  grids, images = {}, {}
  for domain in domains:
    image = evaluate.domain_dataset(run, domain).test.images[centre]
    _, x = batching.model_inputs(image[None], np.zeros(1, np.int32), s.streams.binarize,
                                 run.config.data.binarize)
    mean = np.asarray(run.model.apply(run.params, x, method="encode")[0])[0]
    grids[domain] = s.decode(sample.traversal(mean, [int(d) for d in dims],
                                              DOMAIN_TRAVERSAL_VALUES))
    images[domain] = np.asarray(x[0])
  return grids, images, dims
