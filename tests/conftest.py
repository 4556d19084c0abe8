"""Shared test helpers: paths, the real-data location, tiny configs, and reading compiled HLO."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The offline copies of CIFAR-10 and MNIST live beside the checkout, never inside it.
SHARED_DATA = Path(os.environ.get("JAXVAE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_TGZ = SHARED_DATA / "cifar10-jpeg.tar.gz"
MNIST_TGZ = SHARED_DATA / "mnist-png.tar.gz"


def tiny_digits_config(num_epochs: int = 2):
  """configs/digits.py shrunk so a run takes a second or two; figures off (tests/test_figures.py
  turns them on), TensorBoard on."""
  from configs import digits
  config = digits.get_config()
  config.num_epochs = num_epochs
  config.model.hidden = (64,)
  config.model.latent_dim = 4
  config.log.progress = False
  config.log.figures = False
  return config


# XLA:CPU compiles about a third faster without its backend optimizations and its newer fusion
# emitters; the suite's programs are tiny, so compiling is most of its time.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _fast_compile_flags_work(flags: str) -> bool:
  """Whether this jaxlib's XLA knows the flags (an unknown flag aborts the process)."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1)"],
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                         capture_output=True, timeout=120)
  return probe.returncode == 0


def pytest_configure(config):
  """One persistent JAX compilation cache for the whole run: this process, both xdist workers
  (started after this hook, with this environment) and every subprocess a test starts. Most of
  the suite's time is XLA compiling the same few tiny programs again in each new process; a
  cached executable is the same program, so no result changes. Every program is kept, the
  eager ops' small ones too (hundreds a process, 50 ms each). Multi-process CPU runs turn it
  off themselves (jaxvae.parallel). A cache the caller set is used as it is.

  XLA also compiles with FAST_COMPILE_FLAGS unless the caller set XLA_FLAGS (even empty, for
  XLA's defaults): the tests compare runs with each other, except tests/test_fingerprints.py,
  which holds numbers recorded under both."""
  if hasattr(config, "workerinput"):
    return
  if "XLA_FLAGS" not in os.environ and _fast_compile_flags_work(FAST_COMPILE_FLAGS):
    os.environ["XLA_FLAGS"] = FAST_COMPILE_FLAGS
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  config._jaxvae_cache = tempfile.mkdtemp(prefix="jaxvae-tests-jax-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=config._jaxvae_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pytest_unconfigure(config):
  if getattr(config, "_jaxvae_cache", None):
    shutil.rmtree(config._jaxvae_cache, ignore_errors=True)


def needs(path: Path):
  return pytest.mark.skipif(not path.exists(), reason=f"real data copy {path} is absent "
                            "(it lives in ../shared/data beside the checkout)")


def tiny_sprites_config(num_steps: int = 20):
  """dSprites cut to 1,000 grid points, a tiny MLP and `num_steps` steps, evaluated every 10:
  a run with factor labels in seconds."""
  from jaxvae.config import base_config
  config = base_config()
  config.data.source = "sprites"
  config.data.sprites_subsample = 1000
  config.model.likelihood = "bernoulli"
  config.model.hidden = (32,)
  config.model.latent_dim = 5
  config.num_steps = num_steps
  config.eval.every_steps = 10
  config.eval.batch_size = 1000
  config.log.progress = False
  config.log.tensorboard = False  # the digits runs cover it
  return config


def tiny_conv_config(num_epochs: int = 2):
  """`tiny_digits_config` with a small conv encoder and decoder."""
  config = tiny_digits_config(num_epochs)
  config.model.arch = "conv"
  config.model.conv_channels = (4, 8)
  config.model.hidden = (16,)
  return config


# Attributes that name the computations an HLO instruction runs: loop bodies and conditions,
# fusions, calls, reductions' appliers, conditional branches, custom calls' own.
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|"
                    r"branch_computations|called_computations)=(\{[^}]*\}|%[\w.\-]+)")
_CONVOLUTION = re.compile(r"\bconvolution\(|custom_call_target=\"[^\"]*conv", re.IGNORECASE)


def convolutions_in_loops(hlo: str) -> list[str]:
  """The convolution instructions of compiled HLO text (`Compiled.as_text()`, one module or
  several one after another) that run inside a while loop: in a loop's body or condition, or in
  any computation those call, however deep (fusions, calls, branches, nested loops)."""
  found = []
  for module in re.split(r"^(?=HloModule )", hlo, flags=re.MULTILINE):
    computations, lines = {}, None
    for line in module.splitlines():
      head = re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
      if head:
        lines = computations.setdefault(head.group(1), [])
      elif line.startswith("}"):
        lines = None
      elif lines is not None:
        lines.append(line.strip())
    todo = [name for body in computations.values() for line in body if " while(" in line
            for name in re.findall(r"\b(?:body|condition)=%([\w.\-]+)", line)]
    inside = set()
    while todo:
      name = todo.pop()
      if name not in inside:
        inside.add(name)
        todo += [called for line in computations[name] for group in _CALLS.findall(line)
                 for called in re.findall(r"%([\w.\-]+)", group)]
    found += [line for name in sorted(inside) for line in computations[name]
              if _CONVOLUTION.search(line)]
  return found
