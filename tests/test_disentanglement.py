"""Disentanglement metrics on planted codes, against values worked out by hand."""

import json
import math

import numpy as np
import pytest

from jaxvae import disentanglement

NAMES = ["shape", "scale", "orientation", "posX", "posY"]
SIZES = (3, 6, 40, 32, 32)  # dSprites' factor sizes


def grid(*sizes: int) -> np.ndarray:
  """Every combination of the factor values once: int32[prod(sizes), len(sizes)]."""
  axes = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
  return np.stack(axes, axis=-1).reshape(-1, len(sizes)).astype(np.int32)


def sample_factors(n: int, seed: int) -> np.ndarray:
  """n dSprites labels drawn uniformly and independently: int32[n, 5]."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.integers(0, s, n) for s in SIZES], axis=1).astype(np.int32)


def standardize(factors: np.ndarray) -> np.ndarray:
  return (factors - factors.mean(0)) / factors.std(0)


def rotation(k: int, seed: int) -> np.ndarray:
  return np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))[0]


# ----------------------------------------------------------------------------- MIG by hand


def test_discretize_is_disentanglement_libs_histogram_discretizer():
  codes = np.random.default_rng(0).normal(size=(500, 3)) * [1.0, 10.0, 1e-3]
  # disentanglement_lib: np.digitize against np.histogram's edges less the last, bins 1..20.
  expected = np.stack([np.digitize(c, np.histogram(c, 20)[1][:-1]) - 1 for c in codes.T], axis=1)
  binned = disentanglement.discretize(codes)
  np.testing.assert_array_equal(binned, expected)
  assert binned.min() == 0 and binned.max() == 19


def test_factors_as_codes_score_what_20_bins_allow():
  factors = grid(3, 6, 40, 32)  # complete: distinct factors are exactly independent
  out = disentanglement.mig(factors.astype(np.float32), factors)
  # shape (3 values) and scale (6) get a bin each: the latent keeps all of the factor.
  # 40 orientations into 20 bins of width 39/20 = 1.95: two per bin, MI = log 20 of log 40.
  # 32 positions into 20 bins of width 31/20 = 1.55: each bin holds 1 or 2 positions, so 12
  # bins hold two and 8 hold one; MI = H(bin) = 12 * 2/32 * log 16 + 8 * 1/32 * log 32
  # = (0.75 * 4 + 0.25 * 5) log 2 = 4.25 log 2, of H(posX) = 5 log 2.
  expected = [1.0, 1.0, math.log(20) / math.log(40), 4.25 / 5]
  np.testing.assert_allclose(out.gaps, expected, rtol=0, atol=1e-12)
  assert out.score == pytest.approx(np.mean(expected), abs=1e-12)
  np.testing.assert_array_equal(out.order[0], [0, 1, 2, 3])
  np.testing.assert_allclose(out.entropy, np.log([3, 6, 40, 32]), atol=1e-12)
  np.testing.assert_allclose(out.mutual_info - np.diag(np.diag(out.mutual_info)), 0, atol=1e-12)


def test_one_latent_holding_two_factors():
  factors = grid(3, 6, 40)  # shape, scale, orientation
  shape, scale, orientation = factors.T
  out = disentanglement.mig(np.stack([shape * 40 + orientation, scale], axis=1), factors)
  # 120 values into 20 bins of width 119/20 = 5.95: bin b holds values 6b..6b+5. Shape 0 is
  # 0..39, so bin 6 (36..41) holds 4 values of shape 0 and 2 of shape 1, bin 13 (78..83) 2 of
  # shape 1 and 4 of shape 2; every other bin one shape. Each of these two bins has
  # probability 6/120, so H(shape | bin) = 0.1 * h(1/3), h(1/3) = log 3 - 2/3 log 2.
  h_third = math.log(3) - 2 / 3 * math.log(2)
  shape_gap = (math.log(3) - 0.1 * h_third) / math.log(3)
  # Bins are uniform (log 20) and, given an orientation, the 3 shapes land in 3 distinct bins
  # (40 apart), so H(bin | orientation) = log 3 and MI = log(20 / 3).
  orientation_gap = math.log(20 / 3) / math.log(40)
  np.testing.assert_allclose(out.gaps, [shape_gap, 1.0, orientation_gap], rtol=0, atol=1e-12)
  np.testing.assert_array_equal(out.order[0], [0, 1, 0])


def test_two_latents_holding_one_factor_score_no_gap():
  factors = grid(3, 6)
  shape, scale = factors.T
  # shape * 6 + scale has 18 values, each in its own bin: it holds all of shape and scale, as
  # do the first two latents, so each factor's two best latents tie.
  out = disentanglement.mig(np.stack([shape, scale, shape * 6 + scale], axis=1), factors)
  np.testing.assert_allclose(out.gaps, 0.0, atol=1e-12)
  np.testing.assert_allclose(out.mutual_info[2], np.log([3, 6]), atol=1e-12)


def test_a_random_rotation_scores_low():
  factors = sample_factors(4000, seed=0)
  z = standardize(factors)
  identity = disentanglement.factor_metrics(z, factors, NAMES, seed=0, num_points=3000,
                                            num_test=1000)
  rotated = disentanglement.factor_metrics(z @ rotation(5, seed=1), factors, NAMES, seed=0,
                                           num_points=3000, num_test=1000)
  # A random 5x5 rotation may leave a factor mostly in one latent: the seed is fixed, and the
  # bounds are far from the identity's scores, not near zero.
  assert identity["mig"] > 0.85 and rotated["mig"] < 0.2
  assert identity["dci_disentanglement"] > 0.99 and rotated["dci_disentanglement"] < 0.4
  assert identity["dci_completeness"] > 0.99 and rotated["dci_completeness"] < 0.4


def test_a_constant_latent_changes_nothing():
  factors = sample_factors(4000, seed=2)
  noise = np.random.default_rng(3).normal(size=(len(factors), 7))
  codes = np.concatenate([standardize(factors), np.zeros((len(factors), 2))], axis=1) + 0.3 * noise
  with_constant = np.concatenate([codes, np.full((len(codes), 1), 7.0)], axis=1)
  kwargs = dict(seed=0, num_points=3000, num_test=1000)
  before = disentanglement.factor_metrics(codes, factors, NAMES, **kwargs)
  after = disentanglement.factor_metrics(with_constant, factors, NAMES, **kwargs)
  assert np.isfinite(np.array(after["mutual_info_nats"])).all()
  np.testing.assert_array_equal(np.array(after["mutual_info_nats"])[-1], 0.0)
  assert after["mig"] == before["mig"]
  for name in NAMES:
    for key in ("latent", "mi_nats", "entropy_nats", "normalized_gap", "second_latent",
                "second_mi_nats"):
      assert after["per_factor"][name][key] == before["per_factor"][name][key], (name, key)
  # The forests never split on it; one more feature shifts their random draws slightly.
  np.testing.assert_array_equal(np.array(after["dci_importance"])[-1], 0.0)
  assert after["dci_disentanglement"] == pytest.approx(before["dci_disentanglement"], abs=1e-3)
  assert after["dci_informativeness_test"] == pytest.approx(before["dci_informativeness_test"],
                                                            abs=0.01)
  # Completeness is normalized by log K: one more latent scales 1 - completeness by
  # log 7 / log 8 when the importances are the same.
  assert 1 - after["dci_completeness"] == pytest.approx(
      (1 - before["dci_completeness"]) * math.log(7) / math.log(8), abs=1e-3)


# ----------------------------------------------------------------------------- DCI


def test_dci_of_a_permuted_identity_is_one():
  factors = sample_factors(4000, seed=4)
  perm = [3, 0, 4, 1, 2]
  codes = standardize(factors)[:, perm] * [2.0, 0.5, 1.0, 3.0, 1.0]
  out = disentanglement.dci(codes[:3000], factors[:3000], codes[3000:], factors[3000:], seed=0)
  np.testing.assert_array_equal(np.argmax(out.importance, axis=0), np.argsort(perm))
  assert out.disentanglement > 0.99 and out.completeness > 0.99
  assert out.informativeness_test == 1.0


def test_dci_specificity_by_hand():
  # Latent 0 splits its importance evenly over 2 factors (1 - log 2 / log 2 = 0), latent 1
  # holds one factor (1), latent 2 none (weight 0); weights 1/2 and 1/2.
  importance = np.array([[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]])
  assert disentanglement._specificity(importance) == pytest.approx(0.5, abs=1e-12)
  # Factor 0 sits in latent 0 (1, weight 1/4); factor 1 is 1/3 : 2/3 over latents 0 and 1
  # of K = 3 (weight 3/4).
  h = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)) / math.log(3)
  assert disentanglement._specificity(importance.T) == pytest.approx(
      0.25 * 1.0 + 0.75 * (1 - h), abs=1e-12)
  assert disentanglement._specificity(np.zeros((3, 2))) == 0.0


# ----------------------------------------------------------------------------- the dict


def test_factor_metrics_is_json_and_a_function_of_the_seed():
  factors = sample_factors(3000, seed=5)
  codes = np.concatenate([standardize(factors), np.random.default_rng(6).normal(size=(3000, 3))],
                         axis=1).astype(np.float32)
  kwargs = dict(num_points=2000, num_test=500)
  out = disentanglement.factor_metrics(codes, factors, NAMES, seed=0, **kwargs)
  assert json.loads(json.dumps(out)) == out
  assert out == disentanglement.factor_metrics(codes, factors, NAMES, seed=0, **kwargs)
  other = disentanglement.factor_metrics(codes, factors, NAMES, seed=1, **kwargs)
  assert other["mutual_info_nats"] != out["mutual_info_nats"]
  assert list(out["per_factor"]) == NAMES
  assert out["mig"] == pytest.approx(np.mean(list(out["mig_per_factor"].values())))
  assert [f["latent"] for f in out["per_factor"].values()] == [0, 1, 2, 3, 4]
  assert np.array(out["mutual_info_nats"]).shape == (8, 5)
  assert "disentanglement_lib protocol" in out["estimators"]["mig"]
  assert "RandomForestClassifier" in out["estimators"]["dci_*"]
  table = disentanglement.format_table(out)
  assert table.startswith(f"MIG {out['mig']:.4f}")
  assert all(name in table for name in NAMES)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("codes, factors, message", [
    (np.zeros((10, 3)), np.zeros((9, 2), np.int32), "same images"),
    (np.zeros((10, 3)), np.zeros((10, 2), np.float32), "integer class indices"),
    (np.zeros(10), np.zeros((10, 2), np.int32), r"\[N, 1\]"),
    (np.full((10, 3), np.nan), np.arange(20).reshape(10, 2), "NaN or inf"),
    (np.zeros((10, 1)), np.arange(20).reshape(10, 2), "at least two latents"),
    (np.zeros((10, 3)), np.stack([np.arange(10), np.ones(10, int)], 1), "drop constant"),
])
def test_bad_input_says_what_to_do(codes, factors, message):
  with pytest.raises(ValueError, match=message):
    disentanglement.mig(codes, factors)


def test_too_few_points_or_names():
  factors = sample_factors(100, seed=7)
  codes = standardize(factors)
  with pytest.raises(ValueError, match="encode more images, or pass smaller"):
    disentanglement.factor_metrics(codes, factors, NAMES, seed=0)
  with pytest.raises(ValueError, match="name each of the 5"):
    disentanglement.factor_metrics(codes, factors, NAMES[:4], seed=0, num_points=50, num_test=50)
