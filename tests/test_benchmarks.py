"""The benchmark scripts run and report what they say they report (their figures are for people
to read; no speed is asserted here)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

SMALL = ["--config=configs/digits.py", "--config.model.hidden=(32,)", "--config.model.latent_dim=4"]


def _json_line(*args) -> dict:
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_throughput_reports_its_figures():
  # beta_tcvae: its step needs the dataset size, which the benchmark must pass on.
  out = _json_line("benchmarks/throughput.py", *SMALL, "--epochs=1", "--steps=5", "--timing_s=0.01",
                   "--eval_repeats=1", "--config.objective.kind=beta_tcvae",
                   "--config.objective.beta=1")
  assert out["config"]["timed_steps_per_epoch"] == 5 and out["config"]["steps_per_epoch"] == 46
  # Forward, then two products per layer backward but none for the gradient of the data.
  forward = 2 * 32 * (64 * 32 + 32 * 4 * 2 + 4 * 32 + 32 * 64)
  assert out["step_gflop"] * 1e9 == pytest.approx(3 * forward - 2 * 32 * 64 * 32)
  for key in ("compile_s", "train_s_per_epoch", "eval_s", "matmul_rate_gflop_per_s",
              "optimizer_ms", "peak_rss_gib"):
    assert out[key] > 0, key
  assert out["config"]["loop_mode"] == "scan"
  # The derived figures are what the docstring says they are (timings themselves are noise).
  products_ms = out["step_gflop"] / out["matmul_rate_gflop_per_s"] * 1e3
  assert out["floor_ms_per_step"] == pytest.approx(products_ms + out["optimizer_ms"])
  assert out["fraction_of_matmul_rate"] == pytest.approx(
      out["achieved_gflop_per_s"] / out["matmul_rate_gflop_per_s"])
  assert out["step_over_floor"] == pytest.approx(out["train_ms_per_step"] / out["floor_ms_per_step"])


def test_profile_step_sums_the_gradient_programs_ops_by_kind():
  out = _json_line("benchmarks/profile_step.py", *SMALL, "--image_shape=8,8,1", "--calls=2",
                   "--top=8")
  assert out["step_ms"] > 0 and out["profiled_op_ms"] > 0
  assert sum(out["by_kind"].values()) == pytest.approx(out["profiled_op_ms"])
  assert len(out["top"]) == 8
  times = [ms for _, ms, _, _ in out["top"]]
  assert times == sorted(times, reverse=True)
  # Every listed op is an instruction of the compiled program, with its shape; the layers'
  # products are among them and name the layer they came from.
  assert all(re.match(r"\(?[a-z]\w*\[", shape) for _, _, shape, _ in out["top"])
  sources = " ".join(source for *_, source in out["top"])
  assert "encoder/Dense_0" in sources or "decoder/Dense_" in sources


@pytest.mark.slow
def test_compare_times_each_variant_with_its_own_config():
  out = _json_line("benchmarks/compare.py", *SMALL, "--image_shape=8,8,1", "--rounds=1",
                   "--timing_s=0.01",
                   "--steps=3", "--variants=; model.hidden=(64,) model.compute_dtype=bfloat16 "
                   "objective.kind=beta_tcvae objective.beta=1; "
                   "model.arch=conv model.conv_channels=(4,8); "
                   "model.arch=conv model.conv_channels=(4,8) xla=default")
  base, other, conv, conv_default = out["variants"]
  assert [r["xla_options"] for r in out["variants"]] == ["jaxvae"] * 3 + ["default"]
  assert conv_default["variant"] == "model.arch=conv model.conv_channels=(4,8) xla=default"
  assert base["variant"] == "(config)" and base["speedup"] == 1.0
  assert other["variant"] == ("model.hidden=(64,) model.compute_dtype=bfloat16 "
                              "objective.kind=beta_tcvae objective.beta=1")
  assert other["step_gflop"] == pytest.approx(2 * base["step_gflop"], rel=0.05)
  assert [r["loop_mode"] for r in (base, other, conv)] == ["scan", "scan", "per_step"]
  assert all(r["ms_per_step"] > 0 and r["matmul_rate_gflop_per_s"] > 0 and r["compile_s"] > 0
             for r in (base, other, conv))


def test_stages_trains_and_evaluates_each_stage_once_and_skips_finished_ones(tmp_path,
                                                                             monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
  import stages
  commands = []

  def run(command):  # train.py and evaluate, as stages.py calls them, without the compute
    commands.append(command[1:])
    if command[1:3] == ["-m", "jaxvae.evaluate"]:
      epochs = int(next(c for c in commands[-2] if c.startswith("--config.num_epochs="))
                   .split("=")[1])
      (tmp_path / "eval.json").write_text(json.dumps({"epoch": epochs}))
    return 1.5

  train_args = ["--config", "configs/digits.py"]
  stages.run_stages(str(tmp_path), [1, 4], train_args, 50, timed=run)
  assert commands == [
      ["train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path),
       "--config.num_epochs=1"],
      ["-m", "jaxvae.evaluate", "--workdir", str(tmp_path), "--iw_samples=50"],
      ["train.py", "--config", "configs/digits.py", "--workdir", str(tmp_path),
       "--config.num_epochs=4"],
      ["-m", "jaxvae.evaluate", "--workdir", str(tmp_path), "--iw_samples=50"]]
  assert [json.loads((tmp_path / f"eval_epoch_{e}.json").read_text())["epoch"] for e in (1, 4)] \
      == [1, 4]
  assert [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()] == [
      {"epochs": 1, "train_s": 1.5, "eval_s": 1.5}, {"epochs": 4, "train_s": 1.5, "eval_s": 1.5}]
  (tmp_path / "eval_epoch_4.json").unlink()  # stopped during stage 4: a rerun does only it
  commands.clear()
  stages.run_stages(str(tmp_path), [1, 4], train_args, 50, timed=run)
  assert [c[-1] for c in commands] == ["--config.num_epochs=4", "--iw_samples=50"]


@pytest.mark.slow
def test_minimal_times_the_same_model_beside_jaxvae():
  # Random images (no --data_path): 400 make 20 steps a pass at batch 20.
  out = _json_line("benchmarks/minimal.py", "--setup=iwae", "--num_train=400", "--steps=5",
                   "--rounds=1", "--iwae_images=40", "--iwae_samples=500")
  assert (out["steps_per_pass"], out["timed_steps"], out["batch_size"]) == (20, 5, 20)
  for name in ("minimal", "jaxvae"):
    assert out[f"{name}_ms_per_step"] > 0 and out[f"{name}_compile_s"] > 0, name
    assert out[f"{name}_s_per_pass"] == pytest.approx(out[f"{name}_ms_per_step"] * 20 / 1e3)
  assert out["jaxvae_over_minimal"] == pytest.approx(
      out["jaxvae_ms_per_step"] / out["minimal_ms_per_step"])
  # The minimal bound draws as jaxvae draws: the same number up to float rounding.
  assert out["iwae_minimal_nats"] < 0
  assert out["iwae_jaxvae_nats"] == pytest.approx(out["iwae_minimal_nats"], rel=1e-5)
  assert out["iwae_jaxvae_over_minimal"] == pytest.approx(
      out["iwae_jaxvae_ms_per_image"] / out["iwae_minimal_ms_per_image"])


@pytest.mark.slow
def test_minimal_times_the_flax_example_too():
  out = _json_line("benchmarks/minimal.py", "--setup=flax", "--num_train=1280", "--steps=3",
                   "--rounds=1")
  assert (out["steps_per_pass"], out["timed_steps"], out["batch_size"]) == (10, 3, 128)
  assert out["flax_example_ms_per_step"] > 0
  assert out["jaxvae_over_flax_example"] == pytest.approx(
      out["jaxvae_ms_per_step"] / out["flax_example_ms_per_step"])


def test_the_floor_counts_only_products_that_reach_an_output():
  """A pullback's gradient of an input nobody reads (as in the VAE-GAN's three pullbacks) holds
  products XLA removes; the floor must not time them."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, str(REPO / "benchmarks"))
  import rates

  x, a, b = jnp.ones((8, 4)), jnp.ones((4, 3)), jnp.ones((3, 2))
  net = lambda a, b: jnp.tanh(x @ a) @ b

  def grad_of_a(a, b, inner=net):
    y, pullback = jax.vjp(inner, a, b)
    return pullback(jnp.ones_like(y))[0]  # d/da only: the gradient of b is dead

  # Live: x @ a (tanh's derivative reads it), the cotangent through b, and x^T times it; dead:
  # the product by b in the forward pass and the gradient of b.
  flops = [2 * 8 * 4 * 3, 2 * 8 * 2 * 3, 2 * 4 * 8 * 3]
  for inner in (net, jax.jit(net)):  # inline, and inside a call
    products = rates.step_matmuls(lambda a, b: grad_of_a(a, b, inner), a, b)
    assert sorted(f for f, _ in products) == sorted(flops)
  both = rates.step_matmuls(lambda a, b: jax.grad(lambda a, b: net(a, b).sum(), (0, 1))(a, b),
                            a, b)
  assert len(both) == 4  # x @ a, the cotangent through b, and both gradients
