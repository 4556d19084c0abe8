"""The XLA options of jaxvae's programs on CPU (jaxvae/loops.py): convolutions leave YNNPACK,
everything else compiles as XLA's default has it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae import loops

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _compiled_text(jitted, *args) -> str:
  # Without the module's fingerprint and the options echoed in its header.
  text = jitted.lower(*args).compile().as_text()
  return re.sub(r"^HloModule .*$", "", text, flags=re.MULTILINE)


def _conv_loss(w, x):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jax.nn.gelu(y) ** 2)


def _mlp_loss(params, x):
  h = jax.nn.gelu(x @ params[0])
  return jnp.sum((jax.nn.sigmoid(h @ params[1]) - x) ** 2) + jnp.max(h)


def test_a_program_without_convolutions_compiles_to_the_default_code():
  rng = np.random.default_rng(0)
  params = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((784, 256), (256, 784))]
  x = jnp.asarray(rng.uniform(size=(32, 784)), jnp.float32)
  grad = jax.grad(_mlp_loss)
  ynn_only = {"xla_cpu_experimental_ynn_fusion_type":
              loops.compiler_options("cpu")["xla_cpu_experimental_ynn_fusion_type"]}
  default = _compiled_text(jax.jit(grad), params, x)
  assert "ynn_fusion" in default  # YNNPACK's dots and reductions stay
  assert _compiled_text(jax.jit(grad, compiler_options=ynn_only), params, x) == default


def test_convolutions_leave_ynnpack_and_agree_with_the_default():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)) * 0.1, jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 32)), jnp.float32)
  grad = jax.grad(_conv_loss)
  default, ours = jax.jit(grad), loops.jit(grad)
  assert "ynn_fusion" in _compiled_text(default, w, x)  # the check sees YNNPACK where it is
  assert "ynn_fusion" not in _compiled_text(ours, w, x)
  np.testing.assert_allclose(np.asarray(ours(w, x)), np.asarray(default(w, x)), rtol=2e-5,
                             atol=1e-5 * float(jnp.abs(default(w, x)).max()))


def test_jit_builds_its_program_at_the_first_call_and_keeps_jits_interface():
  calls = []

  @loops.jit
  def double(v):
    calls.append(1)  # runs while tracing only
    return 2 * v

  assert double.__name__ == "double" and calls == []
  assert float(double(jnp.float32(3))) == 6.0 and float(double(jnp.float32(4))) == 8.0
  assert len(calls) == 1 and double._cache_size() == 1
  assert "multiply" in double.lower(jnp.float32(1)).as_text()
  assert loops.compiler_options("gpu") == {}


def test_jit_inside_another_program_leaves_the_options_to_the_outer_one():
  inner = loops.jit(lambda v: jnp.sin(v) * 2)
  outer = loops.jit(lambda v: inner(v) + 1)
  assert float(outer(jnp.float32(0.5))) == pytest.approx(2 * np.sin(0.5) + 1, rel=1e-6)
  assert float(jax.jit(lambda v: inner(v))(jnp.float32(0.5))) == pytest.approx(2 * np.sin(0.5),
                                                                               rel=1e-6)
