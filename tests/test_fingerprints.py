"""Every config trains to the numbers it gave before the objective seam (recorded at 4f1e8a4).

The numbers are XLA's under its default flags, and the suite compiles with others
(tests/conftest.py), so they are computed in one subprocess with the flags pytest was started
with: `python tests/test_fingerprints.py` prints them as JSON.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import CALLER_XLA_FLAGS, REPO
from jaxvae import experiment
from jaxvae import state as state_lib

_spec = importlib.util.spec_from_file_location("record_fingerprints",
                                               REPO / "tests" / "data" / "record_fingerprints.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)
RECORDED = json.loads((REPO / "tests" / "data" / "fingerprints.json").read_text())
NAMES = [name for name, _, _ in record.variants()]


def _init_and_step(config, shape, pixel_mean):
  exp = experiment.build(config, shape, record.DATASET, pixel_mean)
  return jax.jit(exp.init_state)(state_lib.Keys.from_seed(config.seed).init), exp.train_step()


def compute_all() -> dict:
  """{variant: its fingerprint after the recorded steps}, in this process."""
  out = {}
  for name, config, shape in record.variants():
    state, loss = record.run(config, shape, _init_and_step)
    out[name] = record.fingerprint(state.params["vae"], loss)
  return out


@pytest.fixture(scope="module")
def fingerprints():
  env = dict(os.environ, XLA_FLAGS=os.environ.get(CALLER_XLA_FLAGS, ""),
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


@pytest.mark.parametrize("name", NAMES)
def test_config_trains_to_its_recorded_parameters(name, fingerprints):
  # Bitwise on the machine that recorded them; a float32 rounding's slack elsewhere.
  assert fingerprints[name] == pytest.approx(RECORDED[name], rel=1e-6, abs=1e-6), name


if __name__ == "__main__":
  print(json.dumps(compute_all()))
