"""Data parallelism with `jax.jit` and named shardings; the same path on one device, on several,
and across processes.

The mesh has one axis, `data`, over every device of every process. The batch is split over it;
parameters and optimizer state are replicated, so XLA inserts one all-reduce of the gradients
per step. Each process gathers only the batch rows its own devices hold (`gather_batches`).

Several processes (one per GPU host, or per GPU) join with `initialize` before any other JAX
call; every process then runs the same program on its share of each batch. A process that
stops answering (killed, its host lost) ends the others with one message and EXIT_PEER_LOST
(`watch_peers`, `peer_failure`, `exit_peer_lost`) rather than XLA's abort. Losing process 0,
whose coordination service the others need, aborts them natively before Python hears of it:
train.py's parent process (jaxvae/supervisor.py) turns that into the same message.
"""

import atexit
import os
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
HEARTBEAT_TIMEOUT_S = 100  # jax.distributed's default
EXIT_PEER_LOST = 75  # EX_TEMPFAIL (sysexits.h): rerunning the same commands resumes the run
# What gloo says when the other end of a collective is gone (its process killed, host lost).
_GLOO_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Read error",
                   "Write error", "Broken pipe", "Socket closed")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _settings(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> dict:
  """The three settings of a multi-process run, each from its argument or else its variable."""
  return {"coordinator_address": coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
          "num_processes": num_processes if num_processes is not None
          else _env_int(ENV_NUM_PROCESSES),
          "process_id": process_id if process_id is not None else _env_int(ENV_PROCESS_ID)}


def requested(coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, auto_detect: bool = False) -> bool:
  """Whether `initialize` with these arguments joins a multi-process run (or, with only some of
  the settings given, refuses); needs no JAX call."""
  return auto_detect or any(
      v is not None for v in _settings(coordinator_address, num_processes, process_id).values())


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto_detect: bool = False,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
  """Joins a multi-process run through `jax.distributed`; call it before any other JAX call.

  Unset arguments are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  With none of the three given anywhere this is a single-process run and nothing happens, unless
  `auto_detect`, which lets JAX read them from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).
  A process that sends no heartbeat for `heartbeat_timeout_s` seconds counts as lost (see
  `watch_peers`). Returns whether the process joined a distributed run.
  """
  given = _settings(coordinator_address, num_processes, process_id)
  coordinator_address, num_processes, process_id = given.values()
  if not auto_detect:
    if not requested(**given):
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
  # Recoverable: a lost process is reported by get_live_nodes (see `watch_peers`) instead of
  # aborting every other process from XLA's heartbeat thread with a native stack trace (its
  # callback cannot be replaced from Python: jaxlib cannot pass it the status).
  jax.config.update("jax_enable_recoverability", True)
  jax.config.update("jax_enable_preemption_service", False)  # unused; logs when a peer dies
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  _watch.heartbeat_timeout_s = heartbeat_timeout_s
  atexit.register(finish)
  _no_persistent_cache_on_cpu()
  return True


def _no_persistent_cache_on_cpu() -> None:
  """Turns the persistent compilation cache off in a multi-process CPU run, saying so once.

  Only process 0 writes cache entries, and the other processes' keys differ from its own, so a
  second run has process 0 load its executables from the cache while the others compile
  theirs afresh; on XLA:CPU the loaded and the compiled programs then disagree on their
  collectives and gloo aborts both processes at the first step ("op.preamble.length <=
  op.nbytes ... Received data size doesn't match expected size"). The CPU cache is unreliable
  upstream in any case (jax-ml/jax#38445: XLA:CPU rejects its own cached executables on reload).
  """
  cache_dir = jax.config.jax_compilation_cache_dir
  if not cache_dir or not jax.config.jax_enable_compilation_cache:
    return
  if jax.process_count() == 1 or jax.default_backend() != "cpu":
    return
  jax.config.update("jax_enable_compilation_cache", False)
  if is_primary():
    print(f"persistent compilation cache {cache_dir} not used: with several CPU processes a "
          "cached program and a freshly compiled one disagree on their collectives and gloo "
          "aborts the run (see jax-ml/jax#38445); every process compiles afresh", flush=True)


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


class _Watch:
  """The state of `watch_peers`: one message, once, from whichever thread sees a loss first."""

  def __init__(self):
    self.heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S
    self.describe = lambda who: f"{who} stopped answering"
    self.stopped = threading.Event()
    self.lock = threading.Lock()
    self.finished = False


_watch = _Watch()


def _client():
  from jax._src import distributed  # the client is not public; get_live_nodes needs it
  return distributed.global_state.client


def _lost_processes() -> str | None:
  """Which processes the coordinator no longer hears from ("process 1"), "process 0 (the
  coordinator)" when it cannot be reached, or None while all answer."""
  ids = list(range(jax.process_count()))
  try:
    live = _client().get_live_nodes(ids)
  except Exception:  # the coordinator's gRPC errors have no common type
    return "process 0 (the coordinator)"
  lost = [i for i in ids if i not in live]
  if not lost:
    return None
  return ("processes " if len(lost) > 1 else "process ") + ", ".join(map(str, lost))


def exit_peer_lost(who: str) -> None:
  """Prints the run's one message about the lost process(es) on stderr and ends this process
  at once with EXIT_PEER_LOST: an orderly exit would wait for the lost process (collectives,
  orbax barriers, JAX's shutdown barrier) until XLA aborts."""
  with _watch.lock:  # the second caller never returns: the first one ends the process
    try:
      message = _watch.describe(who)
    except Exception as e:  # the message must not stop the exit
      message = f"{who} stopped answering ({type(e).__name__} describing the run: {e})"
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)


def watch_peers(describe, interval_s: float = 1.0) -> None:
  """Starts a thread that ends this process with `exit_peer_lost` once the coordinator stops
  hearing from a process (after the heartbeat timeout) or cannot be reached itself: a process
  waiting outside a collective (in a checkpoint barrier, say) would otherwise hang.
  `describe(who)` makes the message (who: "process 1"). Nothing to watch in a single-process run."""
  if jax.process_count() == 1:
    return
  _watch.describe = describe

  def watch():
    while not _watch.stopped.wait(interval_s):
      who = _lost_processes()
      if who and not _watch.stopped.is_set():
        exit_peer_lost(who)

  threading.Thread(target=watch, name="watch_peers", daemon=True).start()


def stop_watching() -> None:
  """Stops `watch_peers` before an orderly exit, in which process 0 and its coordinator may
  leave first."""
  _watch.stopped.set()


def finish() -> None:
  """Leaves a multi-process run in order: every process but 0 disconnects first, and process 0,
  whose coordinator they need until then, waits for that (at most the heartbeat timeout). Left
  to JAX's exit, the coordinator (recoverable, see `initialize`) may go first, and XLA aborts a
  process still disconnecting. `initialize` registers this to run at exit, so every program
  leaves in order; calling it earlier is harmless (it runs once)."""
  if jax.process_count() == 1 or _watch.finished:
    return
  _watch.finished = True
  stop_watching()
  timeout_ms = 1000 * _watch.heartbeat_timeout_s
  try:  # bounded, unlike a collective: a process that failed alone must not hang the others
    _client().wait_at_barrier("jaxvae.parallel.finish", timeout_ms)
  except Exception:  # a peer already gone or failed: leave as JAX would
    pass
  if is_primary():
    ids = list(range(jax.process_count()))
    deadline = time.monotonic() + _watch.heartbeat_timeout_s
    while time.monotonic() < deadline:
      try:
        if set(_client().get_live_nodes(ids)) <= {0}:
          break
      except Exception:  # nothing more to wait for
        break
      time.sleep(0.05)
  jax.distributed.shutdown()


def peer_failure(e: BaseException) -> bool:
  """Whether `e` (or an exception it came from) is a collective that failed because another
  process of a multi-process run is gone."""
  if jax.process_count() == 1:
    return False
  while e is not None:
    text = str(e)
    if "Gloo" in text and any(s in text for s in _GLOO_PEER_GONE):
      return True
    e = e.__cause__ or e.__context__
  return False


def lost_peer(e: BaseException) -> str | None:
  """For a `peer_failure`, which process is gone: waits up to the heartbeat timeout (plus a
  little) for the coordinator to name it. None if `e` is not a peer failure."""
  if not peer_failure(e):
    return None
  deadline = time.monotonic() + _watch.heartbeat_timeout_s + 2
  while time.monotonic() < deadline:
    who = _lost_processes()
    if who:
      return who
    time.sleep(0.25)
  return "another process"
