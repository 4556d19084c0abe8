"""Data parallelism with `jax.jit` and named shardings; the same path on one device, on several,
and across processes.

The mesh has one axis, `data`, over every device of every process. The batch is split over it;
parameters and optimizer state are replicated, so XLA inserts one all-reduce of the gradients
per step. Each process gathers only the batch rows its own devices hold (`gather_batches`).

Several processes (one per GPU host, or per GPU) join with `initialize` before any other JAX
call; every process then runs the same program on its share of each batch.
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto_detect: bool = False) -> bool:
  """Joins a multi-process run through `jax.distributed`; call it before any other JAX call.

  Unset arguments are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  With none of the three given anywhere this is a single-process run and nothing happens, unless
  `auto_detect`, which lets JAX read them from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).
  Returns whether the process joined a distributed run.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if not auto_detect:
    if all(v is None for v in given.values()):
      return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
          f"a multi-process run needs all of --coordinator_address, --num_processes and "
          f"--process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
          f"{', '.join(missing)} not set. Under SLURM or Open MPI pass --distributed instead "
          "and JAX reads them from the cluster")
  # Only CPU devices use this setting: without it they have no cross-process collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def is_primary() -> bool:
  """Whether this process writes files (metrics, config, figures); orbax picks its own."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here; nothing to wait for in a single-process run."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def make_mesh(local: bool = False) -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, or with `local` this process's own (for
  work one process does alone, such as drawing figures)."""
  devices = jax.local_devices() if local else jax.devices()
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def local_copy(tree):
  """This process's own copy of replicated global arrays: numpy arrays, and typed PRNG keys on
  the default local device, for computations one process runs alone."""
  def get(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: jax.sharding.Mesh):
  """Puts every array of `tree` (typed PRNG keys included) on every device of the mesh.

  The arrays go from host copies: across processes, device_put of a device array makes an
  array whose shards cannot be read back (jax 0.10.2), and it refuses typed keys, which
  therefore go as their key data.
  """
  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), replicated(mesh))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), replicated(mesh))
  return jax.tree.map(put, tree)


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def steps_batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """For a stack of batches [steps, batch, ...]: shards the batch axis over `data`."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def check_batch_divides(batch_size: int, mesh: jax.sharding.Mesh, key: str = "batch_size") -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"config.{key}={batch_size} does not divide over {n} devices; choose a "
                     f"multiple of {n} (the global batch is split evenly)")


def signal_array(signum: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """int32[D], one entry per device of the mesh: this process's `signum` on its own devices.

  A compiled step reduces it (max) so that a signal seen by any process reaches all of them
  in the same chunk's results.
  """
  return jax.make_array_from_callback(
      (mesh.size,), batch_sharded(mesh),
      lambda index: np.full(len(range(mesh.size)[index[0]]), signum, np.int32))


def gather_batches(images: np.ndarray, batch_idx: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """images[batch_idx] as a global array, each process reading only its own devices' rows.

  images: uint8[N, H, W, C] on the host (the same on every process); batch_idx: int[S, B].
  Returns uint8[S, B, H, W, C] sharded over B (`steps_batch_sharded`).
  """
  shape = batch_idx.shape + images.shape[1:]

  def rows(index):  # index: the slices of the global array one local device holds
    return images[batch_idx[index[:2]]][(slice(None),) * 2 + index[2:]]

  return jax.make_array_from_callback(shape, steps_batch_sharded(mesh), rows)
