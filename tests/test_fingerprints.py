"""Every config trains to the numbers it gave before the objective seam.

tests/data/fingerprints.json holds them under XLA's default flags, recorded at 4f1e8a4 (before
the seam); fingerprints_fast_compile.json under the suite's FAST_COMPILE_FLAGS, recorded at
14b721e, whose default-flag numbers equal 4f1e8a4's. The suite checks the second; the first with
    XLA_FLAGS= python -m pytest -n 0 tests/test_fingerprints.py
"""

import importlib.util
import json
import os

import jax
import pytest

from conftest import FAST_COMPILE_FLAGS, REPO
from jaxvae import experiment
from jaxvae import state as state_lib

_spec = importlib.util.spec_from_file_location("record_fingerprints",
                                               REPO / "tests" / "data" / "record_fingerprints.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)
RECORDS = {"": "fingerprints.json", FAST_COMPILE_FLAGS: "fingerprints_fast_compile.json"}
NAMES = [name for name, _, _ in record.variants()]


def init_and_step(config, shape, pixel_mean):
  exp = experiment.build(config, shape, record.DATASET, pixel_mean)
  return jax.jit(exp.init_state)(state_lib.Keys.from_seed(config.seed).init), exp.train_step()


@pytest.fixture(scope="module")
def recorded():
  flags = os.environ.get("XLA_FLAGS", "")
  if flags not in RECORDS:
    pytest.skip(f"fingerprints are recorded under XLA_FLAGS={list(RECORDS)}, not {flags!r}")
  return json.loads((REPO / "tests" / "data" / RECORDS[flags]).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_config_trains_to_its_recorded_parameters(name, recorded):
  config, shape = next((c, s) for n, c, s in record.variants() if n == name)
  state, loss = record.run(config, shape, init_and_step)
  # Bitwise on the machine that recorded them; a float32 rounding's slack elsewhere.
  assert record.fingerprint(state.params["vae"], loss) == pytest.approx(
      recorded[name], rel=1e-6, abs=1e-6), name
