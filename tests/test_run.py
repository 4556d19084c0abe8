"""The run on disk and the shape of the house: no import circle, runs measured in steps."""

import ast
from pathlib import Path

import jax
import numpy as np

from conftest import REPO, tiny_digits_config
from jaxvae import rundir
from jaxvae import train as train_lib


def _imports(path: Path) -> set[str]:
  """The jaxvae modules a file imports, at its top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == "jaxvae":
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxvae."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxvae.")}
  return found


def _modules() -> dict[str, list[Path]]:
  """jaxvae's modules by name, each with its files: a subpackage (objectives/) is one module
  made of all its files, since importing any of them imports the package first."""
  root = REPO / "jaxvae"
  modules = {p.stem: [p] for p in root.glob("*.py") if p.stem != "__init__"}
  modules.update({d.name: sorted(d.glob("*.py")) for d in root.iterdir()
                  if (d / "__init__.py").exists()})
  return modules


def test_the_package_has_no_import_circle():
  modules = _modules()
  graph = {m: set().union(*map(_imports, files)) & (modules.keys() - {m})
           for m, files in modules.items()}
  done, path = set(), []

  def visit(m):  # depth-first; a module met again on the current path closes a circle
    assert m not in path, f"import circle: {' -> '.join(path[path.index(m):] + [m])}"
    if m not in done:
      path.append(m)
      for n in sorted(graph[m]):
        visit(n)
      path.pop()
      done.add(m)

  for m in sorted(graph):
    visit(m)
  assert "objectives" in graph
  assert {"experiment", "state"} <= graph["train"]
  assert "train" not in graph["evaluate"] | graph["restore"] | graph["rundir"]


def test_no_function_is_longer_than_60_lines():
  files = [*(REPO / "jaxvae").rglob("*.py"), *(REPO / "benchmarks").glob("*.py"), REPO / "train.py"]
  long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)"
          for path in files for node in ast.walk(ast.parse(path.read_text()))
          if isinstance(node, ast.FunctionDef)
          and (n := node.end_lineno - node.lineno + 1) > 60]
  assert not long, long


def _steps_config(num_steps):
  config = tiny_digits_config()
  config.num_steps, config.eval.every_steps = num_steps, 30  # 46 steps per epoch
  config.log.tensorboard = False
  return config


def test_a_run_measured_in_steps_evaluates_on_its_cadence_and_extends_exactly(tmp_path):
  whole = train_lib.train_and_evaluate(_steps_config(100), str(tmp_path / "whole"))
  assert [r["step"] for r in whole.history] == [30, 60, 90, 100]
  assert not (tmp_path / "whole" / "figures").exists()  # log.figures=False draws nothing
  assert [r["epoch"] for r in whole.history] == [round(s / 46, 4) for s in (30, 60, 90, 100)]
  first = train_lib.train_and_evaluate(_steps_config(50), str(tmp_path / "split"))
  assert [r["step"] for r in first.history] == [30, 50] and int(first.state.step) == 50
  # The same workdir with a larger num_steps goes on from step 50 (mid-epoch, mid-period).
  rest = train_lib.train_and_evaluate(_steps_config(100), str(tmp_path / "split"))
  assert [r["step"] for r in rest.history] == [60, 90, 100]
  for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(rest.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Test metrics depend on the parameters alone, so they match where both runs evaluated.
  by_step = {r["step"]: r for r in whole.history}
  for r in first.history[:1] + rest.history:
    assert r["test/elbo_nats"] == by_step[r["step"]]["test/elbo_nats"]
  rows = rundir.MetricsLog(str(tmp_path / "split"), tensorboard=False)
  assert rows.truncate(60) == 2  # the rows past a restored step go, to be written again


def test_negative_step_counts_are_refused_naming_the_key():
  import pytest
  from jaxvae import config as config_lib
  for key in ("num_steps", "eval.every_steps"):
    config = tiny_digits_config()
    config.update_from_flattened_dict({key: -1})
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}=-1 must be >= 0"):
      config_lib.validate(config)
