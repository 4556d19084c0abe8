"""Data parallelism with `jax.jit` and named shardings; the same path on one device.

The batch is split over the mesh axis `data`; parameters, optimizer state and the
device-resident dataset are replicated.
"""

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divides(batch_size: int, mesh: jax.sharding.Mesh, key: str = "batch_size") -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"config.{key}={batch_size} does not divide over {n} devices; choose a "
                     f"multiple of {n} (the global batch is split evenly)")
