"""Every config trains to the numbers it gave before the objective seam (recorded at 4f1e8a4)."""

import importlib.util
import json

import jax
import pytest

from conftest import REPO
from jaxvae import experiment
from jaxvae import state as state_lib

_spec = importlib.util.spec_from_file_location("record_fingerprints",
                                               REPO / "tests" / "data" / "record_fingerprints.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)
RECORDED = json.loads((REPO / "tests" / "data" / "fingerprints.json").read_text())


def _init_and_step(config, shape, pixel_mean):
  exp = experiment.build(config, shape, record.DATASET, pixel_mean)
  return jax.jit(exp.init_state)(state_lib.Keys.from_seed(config.seed).init), exp.train_step()


@pytest.mark.parametrize("name,config,shape", list(record.variants()),
                         ids=[name for name, _, _ in record.variants()])
def test_config_trains_to_its_recorded_parameters(name, config, shape):
  state, loss = record.run(config, shape, _init_and_step)
  got, want = record.fingerprint(state.params["vae"], loss), RECORDED[name]
  # Bitwise on the machine that recorded them; a float32 rounding's slack elsewhere.
  assert got == pytest.approx(want, rel=1e-6, abs=1e-6), name
