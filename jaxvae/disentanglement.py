"""Disentanglement metrics: how a representation's latents line up with labelled factors.

A dataset rendered from known factors of variation (dSprites: shape, scale, orientation, posX,
posY) lets us ask whether a representation is disentangled: whether each factor is held by one
latent, and each latent holds one factor. The metrics here read two arrays, the codes
f32[N, K] (encoder means, one row per image) and the factor labels int32[N, F] (integer class
indices), and know nothing of models, so they are testable with planted codes.

  MIG (Chen et al. 2018), as disentanglement_lib computes it (Locatello et al. 2019): each
  latent is cut into 20 equal-width bins over its own range, the mutual information between
  every binned latent and every factor is measured in nats, and each factor scores the gap
  between its two most informative latents divided by its entropy. MIG is the mean over
  factors. Two latents sharing one factor are penalised; one latent holding two factors is
  not, beyond what its 20 bins lose of each.

  DCI (Eastwood & Williams 2018): a classifier per factor predicts it from all the codes; its
  feature importances form a matrix R[K, F]. Disentanglement weights each latent's
  1 - entropy of its importance over factors (base F) by its share of the total importance;
  completeness is the same per factor over latents (base K); informativeness is the
  classifiers' accuracy. The classifier is a random forest, not disentanglement_lib's gradient
  boosting; see `dci`.

MIG implementations in the wild disagree by orders of magnitude (binning, estimator,
normalization, sample size), so `factor_metrics` names its protocol in `estimators`.
"""

from typing import NamedTuple, Sequence

import numpy as np

NUM_BINS = 20         # disentanglement_lib's histogram discretizer for MIG
NUM_POINTS = 10_000   # disentanglement_lib's MIG num_train, and DCI's num_train
NUM_TEST = 5_000      # disentanglement_lib's DCI num_test
# DCI's forest: every split searches all latents (as gradient boosting's trees do), and leaves
# of at least 20 points keep deep trees from spreading importance over noise latents.
DCI_TREES = 30
DCI_MIN_LEAF = 20


def _check(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """codes as f64[N, K] and factors as int64[N, F], or an error saying what is wrong."""
  codes, factors = np.asarray(codes), np.asarray(factors)
  if codes.ndim != 2 or factors.ndim != 2:
    raise ValueError(f"codes must be [N, K] and factors [N, F]; got shapes {codes.shape} and "
                     f"{factors.shape} (reshape a single latent or factor to [N, 1])")
  if len(codes) != len(factors):
    raise ValueError(f"codes has {len(codes)} rows but factors has {len(factors)}; pass the codes "
                     "and the factor labels of the same images, in the same order")
  if not np.issubdtype(factors.dtype, np.integer):
    raise ValueError(f"factors must be integer class indices (int32[N, F]), got {factors.dtype}; "
                     "pass the label indices, not the factor values (astype(np.int32) if they "
                     "are whole numbers)")
  if not np.issubdtype(codes.dtype, np.number) or np.issubdtype(codes.dtype, np.complexfloating):
    raise ValueError(f"codes must be real numbers (f32[N, K]), got {codes.dtype}")
  bad = np.flatnonzero(~np.all(np.isfinite(codes), axis=0))
  if bad.size:
    raise ValueError(f"codes hold NaN or inf in latents {bad.tolist()}; score the encoder means "
                     "of a model whose training did not diverge")
  if codes.shape[1] < 2:
    raise ValueError(f"MIG needs at least two latents (the gap between the best and the second "
                     f"best), and DCI completeness a base-K entropy; got K={codes.shape[1]}")
  constant = np.flatnonzero(np.all(factors == factors[:1], axis=0))
  if constant.size:
    raise ValueError(f"factors {constant.tolist()} take a single value over these {len(factors)} "
                     "points: their entropy is 0 and MIG divides by it; drop constant factors")
  return codes.astype(np.float64), factors.astype(np.int64)


# ----------------------------------------------------------------------------- MIG


class MIG(NamedTuple):
  """MIG and what it is made of (K latents, F factors)."""
  score: float                # mean of `gaps`
  gaps: np.ndarray            # f64[F]: (top MI - second MI) / entropy per factor
  mutual_info: np.ndarray     # f64[K, F]: MI in nats between binned latent k and factor f
  entropy: np.ndarray         # f64[F]: each factor's empirical entropy, nats
  order: np.ndarray           # int[2, F]: the most and second most informative latent


def discretize(codes: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
  """Equal-width histogram bins per latent over its own range: f[N, K] -> int[N, K] in
  [0, num_bins).

  disentanglement_lib's `_histogram_discretize`: np.histogram's edges, then np.digitize, so
  each bin is half-open but the last, which holds the maximum. A constant latent (zero range)
  falls in one bin, as np.histogram widens its range to [c - 0.5, c + 0.5].
  """
  codes = np.asarray(codes, np.float64)
  return np.stack([np.digitize(c, np.histogram_bin_edges(c, num_bins)[1:-1]) for c in codes.T],
                  axis=1)


def mutual_information(binned: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Discrete mutual information in nats (sklearn's mutual_info_score, plug-in estimate):
  int[N, K] x int[N, F] -> f64[K, F]."""
  from sklearn import metrics  # here: a second to import, and only factor datasets need it
  return np.array([[metrics.mutual_info_score(f, b) for f in factors.T] for b in binned.T])


def entropy(factors: np.ndarray) -> np.ndarray:
  """Empirical entropy of each factor in nats: int[N, F] -> f64[F]."""
  out = []
  for f in np.asarray(factors).T:
    p = np.unique(f, return_counts=True)[1] / len(f)
    out.append(-np.sum(p * np.log(p)))
  return np.array(out)


def mig(codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS) -> MIG:
  """The mutual information gap of codes f[N, K] (encoder means) against factors int[N, F],
  on all N points: disentanglement_lib's `compute_mig` after its sampling."""
  codes, factors = _check(codes, factors)
  mi = mutual_information(discretize(codes, num_bins), factors)
  h = entropy(factors)
  order = np.argsort(-mi, axis=0, kind="stable")[:2]  # ties go to the lower latent index
  top, second = np.take_along_axis(mi, order, axis=0)
  gaps = (top - second) / h
  return MIG(float(np.mean(gaps)), gaps, mi, h, order)


# ----------------------------------------------------------------------------- DCI


class DCI(NamedTuple):
  """DCI scores and the importance matrix they come from (K latents, F factors)."""
  disentanglement: float
  completeness: float
  informativeness_train: float  # mean over factors of the training accuracy
  informativeness_test: float   # mean over factors of the test accuracy
  importance: np.ndarray        # f64[K, F]: each factor's forest's feature importances (sum 1)
  accuracy_test: np.ndarray     # f64[F]


def _specificity(importance: np.ndarray) -> float:
  """Sum over rows of (1 - entropy of the row's distribution over columns, base #columns),
  weighted by the row's share of the total. Rows with no importance weigh nothing; an
  all-zero matrix scores 0 (disentanglement_lib: every row's 1 - entropy is 0 then)."""
  totals = importance.sum(axis=1)
  if totals.sum() == 0:
    return 0.0
  p = importance / np.where(totals > 0, totals, 1.0)[:, None]
  h = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)  # 0 log 0 = 0
  n = importance.shape[1]
  per_row = 1.0 - (h / np.log(n) if n > 1 else h)
  return float(np.sum(per_row * totals / totals.sum()))


def _forest(seed: int):
  """DCI's classifier, unfitted: see `dci`."""
  from sklearn import ensemble  # here: a second to import, and only factor datasets need it
  return ensemble.RandomForestClassifier(n_estimators=DCI_TREES, max_features=None,
                                         min_samples_leaf=DCI_MIN_LEAF, random_state=seed)


def _linear():
  """The linear factor predictor, unfitted: multinomial logistic regression (L2, C = 1) on
  codes standardized with the training codes' mean and deviation."""
  from sklearn import linear_model, pipeline, preprocessing
  return pipeline.make_pipeline(preprocessing.StandardScaler(),
                                linear_model.LogisticRegression(max_iter=1000))


PREDICTORS = {"forest": _forest, "linear": lambda seed: _linear()}


def transfer(train_codes: np.ndarray, train_factors: np.ndarray,
             test_codes: dict[str, np.ndarray], test_factors: np.ndarray, *, seed: int
             ) -> dict[str, dict[str, np.ndarray]]:
  """Factor predictors trained on one domain's codes, scored on other domains' codes of the
  same images, without retraining (DARLA's zero-shot transfer, Higgins et al. 2017).

  train_codes f[N, K] with train_factors int[N, F]: one classifier per factor and predictor in
  `PREDICTORS` (DCI's forest, seeded with `seed`, and `_linear`). test_codes: {domain: f[M, K]},
  codes of the M images test_factors int[M, F] label, drawn in each domain. Returns {predictor:
  {domain: accuracy f64[F] per factor}}.
  """
  train_codes, train_factors = _check(train_codes, train_factors)
  tests = {d: _check(c, test_factors)[0] for d, c in test_codes.items()}
  test_factors = np.asarray(test_factors)
  out = {}
  for name, make in PREDICTORS.items():
    fitted = [make(seed).fit(train_codes, y) for y in train_factors.T]
    out[name] = {d: np.array([np.mean(f.predict(c) == y) for f, y in zip(fitted, test_factors.T)])
                 for d, c in tests.items()}
  return out


def dci(train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray,
        test_factors: np.ndarray, *, seed: int) -> DCI:
  """DCI (Eastwood & Williams 2018) of codes f[N, K] against factors int[N, F], trained on the
  train split, accuracy also on the test split.

  Per factor, sklearn RandomForestClassifier(n_estimators=30, max_features=None,
  min_samples_leaf=20, random_state=seed); the importance of latent k for factor f is the
  forest's impurity-based feature_importances_ (each column sums to 1, as gradient boosting's
  does). Deviation from disentanglement_lib, which uses GradientBoostingClassifier() with its
  defaults (100 stages of depth-3 trees, one tree per class per stage): on 10,000 points of
  the five dSprites factors and 10 latents, 2 CPU cores, 5 of its stages took 6 s for
  orientation (40 classes) alone, so about 2 minutes for it and 6 for all five factors;
  `factor_metrics`, forests included, took 7 s. sklearn's HistGradientBoostingClassifier
  gives no feature importances. Eastwood & Williams' own paper used random forests (and
  lasso). Both kinds of trees give some importance to latents that only help fit noise, so
  scores compare within one estimator only. Entropies use 0 log 0 = 0 where
  disentanglement_lib adds 1e-11.
  """
  train_codes, train_factors = _check(train_codes, train_factors)
  test_codes, test_factors = _check(test_codes, test_factors)
  if train_codes.shape[1] != test_codes.shape[1] or train_factors.shape[1] != test_factors.shape[1]:
    raise ValueError(f"train has {train_codes.shape[1]} latents and {train_factors.shape[1]} "
                     f"factors but test has {test_codes.shape[1]} and {test_factors.shape[1]}; "
                     "split one set of codes and labels")
  importance, acc_train, acc_test = [], [], []
  for y_train, y_test in zip(train_factors.T, test_factors.T):
    forest = _forest(seed).fit(train_codes, y_train)
    importance.append(forest.feature_importances_)
    acc_train.append(np.mean(forest.predict(train_codes) == y_train))
    acc_test.append(np.mean(forest.predict(test_codes) == y_test))
  importance = np.array(importance).T
  return DCI(disentanglement=_specificity(importance), completeness=_specificity(importance.T),
             informativeness_train=float(np.mean(acc_train)),
             informativeness_test=float(np.mean(acc_test)),
             importance=importance, accuracy_test=np.array(acc_test))


# ----------------------------------------------------------------------------- all of it


def estimators(num_points: int, num_test: int, num_bins: int = NUM_BINS) -> dict[str, str]:
  """What each key of `factor_metrics` estimates, and how."""
  return {
      "mig": f"MIG, disentanglement_lib protocol: {num_points} points drawn without replacement, "
             f"each latent cut into {num_bins} equal-width bins over its own range (np.histogram "
             "edges, np.digitize), MI in nats by sklearn mutual_info_score against each factor's "
             "labels, (top MI - second MI) over latents / the factor's empirical entropy, mean "
             "over factors",
      "per_factor.latent": "the latent with the largest binned MI with the factor (ties: lowest "
                           "index); second_latent the runner-up",
      "per_factor.mi_nats": "its binned MI with the factor, nats (plug-in, biased up by about "
                            "(bins - 1)(values - 1) / 2N for independent variables)",
      "per_factor.entropy_nats": "the factor's empirical entropy on the same points, nats",
      "per_factor.normalized_gap": "(mi_nats - second_mi_nats) / entropy_nats, MIG's term",
      "dci_*": f"DCI (Eastwood & Williams 2018): one sklearn RandomForestClassifier per factor "
               f"(n_estimators={DCI_TREES}, max_features=None, min_samples_leaf={DCI_MIN_LEAF}) "
               f"trained on the same {num_points} points, impurity importances; NOT "
               "disentanglement_lib's GradientBoostingClassifier (too slow for 40 classes)",
      "dci_disentanglement": "sum over latents of (1 - entropy of its importance over factors, "
                             "base F) x its share of the total importance",
      "dci_completeness": "sum over factors of (1 - entropy of its importance over latents, "
                          "base K) x its share; depends on K: unused latents raise it",
      "dci_informativeness_test": f"mean over factors of the forest's accuracy on {num_test} "
                                  "other points",
      "dci_informativeness_train": "the same on the training points",
  }


def protocol_rows(num_rows: int, seed: int, num_points: int = NUM_POINTS,
                  num_test: int = NUM_TEST) -> tuple[np.ndarray, np.ndarray]:
  """The rows of num_rows codes that `factor_metrics` scores with `seed`, distinct: (MIG's and
  the DCI forests' int[num_points], DCI's test rows int[num_test]). Public so that a caller
  wanting MIG's mutual information alone (`mig` on the first) gets factor_metrics' numbers."""
  rows_seed = np.random.SeedSequence(seed).spawn(2)[0]  # [1] seeds the forests
  rows = np.random.default_rng(rows_seed).permutation(num_rows)[:num_points + num_test]
  return rows[:num_points], rows[num_points:]


def factor_metrics(codes: np.ndarray, factors: np.ndarray, factor_names: Sequence[str], *,
                   seed: int, num_points: int = NUM_POINTS, num_test: int = NUM_TEST,
                   num_bins: int = NUM_BINS) -> dict:
  """MIG and DCI of codes f32[N, K] (encoder means) against factors int32[N, F], as a
  JSON-friendly dict.

  Draws num_points + num_test distinct rows with `seed`: MIG and the DCI forests use the first
  num_points, DCI's test accuracy the other num_test. Latents are indices into codes' columns.
  """
  codes, factors = _check(codes, factors)
  names = [str(n) for n in factor_names]
  if len(names) != factors.shape[1] or len(set(names)) != len(names):
    raise ValueError(f"factor_names must name each of the {factors.shape[1]} factor columns once, "
                     f"got {names}")
  if num_points < 2 or num_test < 1:
    raise ValueError(f"num_points={num_points} and num_test={num_test}: need at least 2 points "
                     "for MIG and 1 for DCI's test accuracy")
  if num_points + num_test > len(codes):
    raise ValueError(f"num_points + num_test = {num_points} + {num_test} distinct points "
                     f"requested but codes has only {len(codes)}; encode more images, or pass "
                     "smaller num_points/num_test (the protocol's defaults are "
                     f"{NUM_POINTS} and {NUM_TEST}; MI's upward bias grows as N shrinks)")
  train, test = protocol_rows(len(codes), seed, num_points, num_test)
  forest_seed = np.random.SeedSequence(seed).spawn(2)[1]
  gap = mig(codes[train], factors[train], num_bins)
  scores = dci(codes[train], factors[train], codes[test], factors[test],
               seed=int(forest_seed.generate_state(1)[0]))
  (top, second), mi = gap.order, gap.mutual_info
  per_factor = {
      name: {"latent": int(top[j]), "mi_nats": float(mi[top[j], j]),
             "entropy_nats": float(gap.entropy[j]), "normalized_gap": float(gap.gaps[j]),
             "second_latent": int(second[j]), "second_mi_nats": float(mi[second[j], j]),
             "dci_test_accuracy": float(scores.accuracy_test[j])}
      for j, name in enumerate(names)}
  return {
      "mig": gap.score,
      "mig_per_factor": {name: float(g) for name, g in zip(names, gap.gaps)},
      "dci_disentanglement": scores.disentanglement,
      "dci_completeness": scores.completeness,
      "dci_informativeness_test": scores.informativeness_test,
      "dci_informativeness_train": scores.informativeness_train,
      "per_factor": per_factor,
      "mutual_info_nats": mi.tolist(),            # [K][F]
      "dci_importance": scores.importance.tolist(),  # [K][F]
      "num_points": num_points, "num_test": num_test, "num_bins": num_bins, "seed": seed,
      "num_latents": codes.shape[1],
      "estimators": estimators(num_points, num_test, num_bins),
  }


def format_table(result: dict) -> str:
  """`factor_metrics`' result as text: the scores, then one row per factor."""
  lines = [f"MIG {result['mig']:.4f} (disentanglement_lib protocol: {result['num_bins']} bins, "
           f"{result['num_points']} points, seed {result['seed']})",
           f"DCI disentanglement {result['dci_disentanglement']:.4f}, completeness "
           f"{result['dci_completeness']:.4f}, informativeness (test accuracy) "
           f"{result['dci_informativeness_test']:.4f} (random forests, not gradient boosting)"]
  header = ("factor", "latent", "MI nats", "H nats", "gap", "2nd latent", "2nd MI", "DCI acc")
  cells = [header] + [
      (name, f"z{f['latent']}", f"{f['mi_nats']:.4f}", f"{f['entropy_nats']:.4f}",
       f"{f['normalized_gap']:.4f}", f"z{f['second_latent']}", f"{f['second_mi_nats']:.4f}",
       f"{f['dci_test_accuracy']:.4f}")
      for name, f in result["per_factor"].items()]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  for i, row in enumerate(cells):
    lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                         zip(row[1:], widths[1:])]))
    if i == 0:
      lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
  return "\n".join(lines)
