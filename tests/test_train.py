"""Training end to end: compiled once, learning on real digits, train.py and its config flags."""

import io
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import cifar10
from conftest import (CIFAR10_TGZ, REPO, convolutions_in_loops, needs, tiny_conv_config,
                      tiny_digits_config)
from jaxvae import config as config_lib
from jaxvae import data, evaluate, experiment, loops, models, parallel
from jaxvae import state as state_lib
from jaxvae import train as train_lib


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  config = tiny_digits_config(num_epochs=4)
  config.log.chunks_per_epoch = 3  # 46 steps -> 3 chunks of 16, the last one padded
  config.log.figures = True
  return workdir, train_lib.train_and_evaluate(config, str(workdir))


def test_each_step_function_compiles_once_per_run(digits_run):
  _, result = digits_run
  assert result.compiled == {"train_chunk": 1, "evaluate": 1}


def test_loss_falls_on_real_digits_and_steps_are_counted(digits_run):
  _, result = digits_run
  rows = result.history
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
  assert [r["step"] for r in rows] == [46, 92, 138, 184]  # 1500 // 32 steps, padding not counted
  assert int(result.state.step) == 184
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 2.0
  assert rows[-1]["test/elbo_nats"] > rows[0]["test/elbo_nats"] + 2.0
  for r in rows:
    assert r["test/elbo_nats"] == pytest.approx(r["test/log_lik_nats"] - r["test/kl_nats"], rel=1e-5)
    # Bernoulli on 64 binary pixels: bits/dim is -ELBO / (64 ln 2).
    assert r["test/bits_per_dim"] == pytest.approx(-r["test/elbo_nats"] / (64 * math.log(2)))
    assert 0 < r["test/recon_mean_ssim"] <= 1 and r["train/kl_nats"] > 0


def test_epoch_batches_cover_each_image_once_and_depend_on_the_epoch():
  key = jax.random.key(0)
  idx, valid = train_lib.epoch_batches(key, 3, num_examples=103, batch_size=10, start=0,
                                       chunk_steps=4)
  assert idx.shape == (3, 4, 10) and valid.shape == (3, 4)
  assert int(valid.sum()) == 10
  used = np.asarray(idx)[np.asarray(valid)].ravel()
  assert len(set(used.tolist())) == 100  # 10 full batches, no repeats; 3 images dropped
  other, _ = train_lib.epoch_batches(key, 4, 103, 10, 0, 4)
  assert not np.array_equal(np.asarray(other), np.asarray(idx))
  tail, tail_valid = train_lib.epoch_batches(key, 3, 103, 10, start=7, chunk_steps=4)
  np.testing.assert_array_equal(np.asarray(tail)[np.asarray(tail_valid)],
                                np.asarray(idx)[np.asarray(valid)][7:])


@pytest.fixture(scope="module")
def conv_chunks():
  """A tiny conv model's train chunk of 6 steps on 8x8 images, compiled in both loop modes.

  Returns (chunks {loop: compiled chunk}, fresh() -> a new initial state (chunks donate
  theirs), batches(first) -> uint8[6, B, 8, 8, 1] of steps first.. of one epoch, train key).
  """
  config, mesh, shape = tiny_conv_config(), parallel.make_mesh(), (8, 8, 1)
  b = config.batch_size
  exp = experiment.build(config, shape, dataset_size=8 * b)
  keys = state_lib.Keys.from_seed(0)
  fresh = lambda: exp.init_state(keys.init)
  images = np.random.default_rng(0).integers(0, 256, (8 * b,) + shape, np.uint8)
  batches = lambda first: parallel.gather_batches(
      images, np.arange(first * b, (first + 6) * b).reshape(6, b), mesh)
  step = exp.train_step()
  args = (fresh(), batches(0), np.ones(6, bool), keys.train, parallel.signal_array(0, mesh))
  chunks = {loop: train_lib.make_train_chunk(step, mesh, loop).lower(*args).compile()
            for loop in ("per_step", "scan")}
  return chunks, fresh, batches, keys.train


def test_no_convolution_of_the_cpu_train_chunk_runs_inside_a_compiled_loop(conv_chunks):
  # XLA:CPU runs a convolution inside a while loop ~20x slower (jax-ml/jax#12868).
  config, mesh = tiny_conv_config(), parallel.make_mesh()
  model = models.make_model(config.model, (8, 8, 1))
  assert model.has_convolutions
  assert mesh.devices.flat[0].platform == "cpu" and loops.resolve(config, mesh, model) == "per_step"
  chunks = conv_chunks[0]
  hlo = chunks["per_step"].as_text()
  assert "convolution(" in hlo
  assert convolutions_in_loops(hlo) == []
  assert convolutions_in_loops(chunks["scan"].as_text())  # the check sees the defect where it is


def test_per_step_and_scan_chunks_agree_and_per_step_does_not_depend_on_the_chunking(
    conv_chunks):
  chunks, fresh, batches, train_key = conv_chunks
  no_signal = parallel.signal_array(0, parallel.make_mesh())
  valid = np.arange(6) < 5  # a padded chunk: the sixth step must not run
  scan_state, scan_sums = chunks["scan"](fresh(), batches(0), valid, train_key, no_signal)
  whole, sums = chunks["per_step"](fresh(), batches(0), valid, train_key, no_signal)
  # As a resumed run cuts its epoch: 2 steps, then the other 3 in a chunk of their own.
  part, _ = chunks["per_step"](fresh(), batches(0), np.arange(6) < 2, train_key, no_signal)
  part, _ = chunks["per_step"](part, batches(2), np.arange(6) < 3, train_key, no_signal)
  assert int(whole.step) == int(part.step) == int(scan_state.step) == 5
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert int(sums["steps"]) == int(scan_sums["steps"]) == 5
  assert sums.keys() == scan_sums.keys()
  for k in set(sums) - set(train_lib.CHUNK_COUNTS):
    assert float(sums[k]) == pytest.approx(float(scan_sums[k]), rel=1e-5), k
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(scan_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _train_py(*args, timeout=300):
  return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_train_py_end_to_end_writes_metrics_config_and_figures(tmp_path):
  workdir = tmp_path / "run"
  p = _train_py("--config", "configs/digits.py", "--workdir", str(workdir),
                "--config.num_epochs=2", "--config.model.hidden=(32,)",
                "--config.model.latent_dim=3", "--config.log.progress=False")
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2]
  for key in ("step", "train/loss", "train/elbo_nats", "test/elbo_nats", "test/recon_mean_ssim",
              "test/bits_per_dim", "train/seconds", "train/images_per_s"):
    assert all(np.isfinite(r[key]) for r in rows), key
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["latent_dim"] == 3 and saved["model"]["hidden"] == [32]
  for name in ("fig15_loss.png", "fig16_ssim.png", "fig17_reconstructions.png"):
    png = workdir / "figures" / name
    assert png.stat().st_size > 5000, name
  assert "epoch 2 step 92" in p.stdout


@pytest.mark.parametrize("override,message", [
    ("--config.model.nope=1", "nope"),
    ("--config.batch_size=0", "config.batch_size=0 must be a positive int"),
    ("--config.batch_size=abc", "batch_size"),
])
def test_bad_overrides_fail_at_start_naming_the_key(tmp_path, override, message):
  p = _train_py("--config", "configs/digits.py", "--workdir", str(tmp_path / "w"), override,
                timeout=120)
  assert p.returncode != 0
  assert message in p.stderr
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_validate_names_bad_combinations():
  c = tiny_digits_config()
  c.data.source = "folder"
  with pytest.raises(config_lib.ConfigError, match="needs config.data.path"):
    config_lib.validate(c)
  c = tiny_digits_config()
  c.model.hidden = (64, -1)
  with pytest.raises(config_lib.ConfigError, match="model.hidden"):
    config_lib.validate(c)
  c = tiny_digits_config()
  c.objective.beta = -1.0
  with pytest.raises(config_lib.ConfigError, match="objective.beta"):
    config_lib.validate(c)
  c = tiny_digits_config()
  c.model.likelihood = "poisson"
  with pytest.raises(config_lib.ConfigError, match="config.model.likelihood='poisson' is not allowed"):
    config_lib.validate(c)
  c = tiny_digits_config()
  c.loop_mode = "unroll"
  with pytest.raises(config_lib.ConfigError, match="config.loop_mode='unroll' is not allowed"):
    config_lib.validate(c)


@pytest.mark.slow
@needs(CIFAR10_TGZ)
def test_paper_config_lowers_test_elbo_on_real_cifar10_in_100_steps():
  config = cifar10.get_config()
  config.data.source, config.data.path = "folder", str(CIFAR10_TGZ)
  ds = data.load(config.data)
  mesh = parallel.make_mesh()
  exp = experiment.build(config, ds.image_shape, len(ds.train.images))
  model = exp.model
  keys = state_lib.Keys.from_seed(0)
  state = exp.init_state(keys.init)
  assert models.count_params(state.params) == 3_543_552
  config.eval.batch_size = 1000
  evaluator = evaluate.Evaluator(model, config, data.Split(ds.test.images[:2000], ds.test.labels[:2000]),
                                 mesh)
  before = evaluator(state.params["vae"], keys.eval)
  chunk = train_lib.make_train_chunk(exp.train_step(), mesh, "scan")
  idx, valid = jax.device_get(
      train_lib.epoch_batches(keys.shuffle, 0, len(ds.train.images), 32, 0, 100))
  batches = parallel.gather_batches(ds.train.images, idx[0], mesh)
  state, sums = chunk(state, batches, valid[0], keys.train, parallel.signal_array(0, mesh))
  after = evaluator(state.params["vae"], keys.eval)
  assert int(state.step) == 100
  assert after["elbo_nats"] > before["elbo_nats"] + 100  # nats per image (seen: +184)
  assert after["recon_mean_ssim"] > before["recon_mean_ssim"]


def test_run_writes_model_summary_data_preview_and_tensorboard_events(digits_run):
  from PIL import Image
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  workdir, result = digits_run
  summary = (workdir / "model.txt").read_text()
  params = models.count_params(result.state.params)
  assert f"Total Parameters: {params:,}" in summary and "encoder/Dense_0" in summary
  assert (workdir / "figures" / "data.png").exists()
  events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"),
                                              size_guidance={"tensors": 0, "images": 0})
  events.Reload()
  for key in ("train/loss", "test/elbo_nats", "test/recon_mean_ssim"):
    scalars = events.Tensors(key)
    assert [s.step for s in scalars] == [r["step"] for r in result.history]
    values = [float(tensor_util.make_ndarray(s.tensor_proto)) for s in scalars]
    assert values == pytest.approx([r[key] for r in result.history], rel=1e-6)
    assert events.SummaryMetadata(key).plugin_data.plugin_name == "scalars"
  assert {"test_and_reconstruction", "prior_samples"} <= set(events.Tags()["tensors"])
  # Images as tf.summary.image stores them: width, height, then one PNG per image.
  (last,) = events.Tensors("prior_samples")[-1:]
  width, height, *pngs = tensor_util.make_ndarray(last.tensor_proto)
  assert events.SummaryMetadata("prior_samples").plugin_data.plugin_name == "images"
  assert last.step == result.history[-1]["step"] and len(pngs) > 1
  assert Image.open(io.BytesIO(pngs[0])).size == (int(width), int(height))


def test_paper_model_summary_counts_table_1():
  config = cifar10.get_config()
  summary = models.summary(models.make_model(config.model, (32, 32, 3)), (32, 32, 3))
  assert "Total Parameters: 3,543,552" in summary
