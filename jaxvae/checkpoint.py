"""Orbax checkpoints of the whole run state in WORKDIR/checkpoints/.

A checkpoint is keyed by the global step and holds two items: `arrays`, a pytree with the
train state and the run's typed PRNG keys (stored as their key data), and `progress` (epoch,
position in it, the epoch's partial train sums), with the resolved config as the manager's
metadata. Everything else a resumed run needs (data order, per-step keys) is a function of
those keys, the epoch and the step.

Restoring goes through a template, so every array's shape and dtype is checked against the
current config before any is read. A step directory that cannot be read (a truncated file, a
save cut short) is moved to WORKDIR/bad_checkpoints/ and reported, never deleted or reused.
"""

import atexit
import contextlib
import errno
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxvae import parallel

BEST_METRIC = "test/elbo_nats"
_UNFINISHED = ".orbax-checkpoint-tmp"  # orbax writes here first and renames when complete


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says which and what to do."""


# What a full disk (or a full quota) says, in an OSError or in TensorStore's RESOURCE_EXHAUSTED.
_NO_SPACE = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


class _NoSpaceLog(logging.Filter):
  """Keeps a full disk's reports off the terminal: orbax's writer threads log each failure
  with its traceback (a few hundred lines for one save), asyncio one of their futures that
  nobody read, and TensorStore's late callbacks find their event loop closed, while the run
  stops with one message (`_save_failed`). They are held until that message names a file for
  them (`write_to`), and appended to it after; any still held at exit, never named, go to
  stderr after all."""

  def __init__(self):
    super().__init__()
    self.held: list[str] = []
    self.path = None
    self.reported = False
    self.previous_unraisablehook = sys.unraisablehook

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return True
    try:
      text = record.getMessage()
      if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    except Exception:  # a malformed record: logging reports it, a filter must not raise
      return True
    if not any(s in text for s in _NO_SPACE):
      return True
    self.keep(f"{record.levelname} {record.pathname}:{record.lineno}] {text}\n")
    return False

  def unraisablehook(self, unraisable) -> None:
    """sys.unraisablehook, which TensorStore's threads report through: once a save has failed,
    orbax has closed its event loop and their late callbacks into it fail too. Held like the
    records (so printed at exit if no failed save claims them); anything else goes through."""
    value = unraisable.exc_value
    if (threading.current_thread() is not threading.main_thread()
        and isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      self.keep("".join(traceback.format_exception(unraisable.exc_type, value,
                                                   unraisable.exc_traceback)))
    else:
      self.previous_unraisablehook(unraisable)

  def keep(self, entry: str) -> None:
    if self.path is None or not _append(self.path, [entry]):
      self.held.append(entry)

  def write_to(self, workdir: str) -> str | None:
    """Writes the held reports to WORKDIR/checkpoint_errors.log, or to the temporary directory
    if the full disk refuses them too; returns the file, or None with nothing held (or no room
    anywhere: then they are dropped, the message having said what they say)."""
    self.reported = True
    if not self.held:
      return self.path
    name = ("checkpoint_errors.log" if jax.process_count() == 1
            else f"checkpoint_errors.process{jax.process_index()}.log")
    for path in (os.path.join(workdir, name),
                 os.path.join(tempfile.gettempdir(), f"jaxvae.{os.getpid()}.{name}")):
      if _append(path, self.held):
        self.path, self.held = path, []
        return path
    return None

  def flush_unreported(self) -> None:
    if not self.reported:
      sys.stderr.writelines(self.held)
    self.held = []

  def start(self) -> None:
    """A new manager, a new run: earlier reports are done with."""
    self.flush_unreported()
    self.path, self.reported = None, False


def _append(path: str, entries: list[str]) -> bool:
  """Appends to `path`; False (leaving no empty file) if the disk refuses."""
  try:
    with open(path, "a") as f:
      f.writelines(entries)
    return True
  except OSError:
    with contextlib.suppress(OSError):
      if os.path.getsize(path) == 0:
        os.remove(path)
    return False


_no_space_log = _NoSpaceLog()


def _hold_no_space_reports() -> None:
  """Installs `_no_space_log` (once) on the loggers of orbax (absl's) and asyncio, and as
  sys.unraisablehook."""
  _no_space_log.start()
  if _no_space_log in logging.getLogger("absl").filters:
    return
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_no_space_log)
  _no_space_log.previous_unraisablehook = sys.unraisablehook
  sys.unraisablehook = _no_space_log.unraisablehook
  atexit.register(_no_space_log.flush_unreported)


def make_manager(workdir: str, keep: int, config_json: dict | None = None) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints and the best by test ELBO.

  `best_fn` is set as well as the policy only because orbax writes a checkpoint's metrics to
  disk just when it is; without them a resumed run's BestN could not see earlier checkpoints.
  """
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(keep),
      cm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC], best_mode="max",
      create=True, enable_async_checkpointing=True)
  registry = ocp.handlers.create_default_handler_registry(
      arrays=ocp.StandardCheckpointHandler(), progress=ocp.JsonCheckpointHandler())
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  _hold_no_space_reports()
  try:
    return ocp.CheckpointManager(directory, options=options, metadata=config_json,
                                 handler_registry=registry)
  except OSError as e:  # orbax lists the directory (and reads its metadata) at once
    raise _unreadable(directory, e) from None


def _unreadable(path: str, e: OSError) -> CheckpointError:
  return CheckpointError(
      f"{path} cannot be read or changed ({_root_cause(e)}); give this user read and write "
      f"access to it (e.g. chmod -R u+rwX {path}) and rerun the same command to resume")


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def save(manager: ocp.CheckpointManager, step: int, tree, progress: dict,
         metrics: dict | None = None) -> None:
  """Starts an async save of `tree` (arrays, typed keys allowed) and `progress` at `step`.

  `metrics` (with BEST_METRIC) rank the checkpoint for keeping the best; a mid-epoch save has
  none. `manager.wait_until_finished()` completes the save.
  """
  arrays = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
  # One array item: orbax 0.12.8 fails ("cannot schedule new futures") on two in a Composite.
  items = {"arrays": ocp.args.StandardSave(arrays), "progress": ocp.args.JsonSave(progress)}
  # A save without metrics (a mid-period stop) ranks as the worst (-inf ELBO): on a save with
  # none at all orbax warns "Requested `tracked_metric`; did not provide metrics".
  metrics = {k: float(v) for k, v in (metrics or {BEST_METRIC: -float("inf")}).items()}
  check_saves(manager)
  try:
    started = manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
  except Exception as e:  # orbax writes some items (the metrics) before returning
    raise _save_failed(manager, e) from None
  if not started:
    raise CheckpointError(f"orbax declined to save step {step} in {manager.directory}, whose "
                          f"latest step is {manager.latest_step()}; a checkpoint would be lost")


def _root_cause(e: BaseException) -> str:
  """The innermost OSError of an exception chain ("No space left on device: path"), or `e`."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return f"{seen.strerror}: {seen.filename}" if seen.filename else seen.strerror
    no_space = [s for s in _NO_SPACE if s in str(seen)]  # TensorStore's error, not an OSError
    if no_space:
      return no_space[0]
    seen = seen.__cause__ or seen.__context__
  return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _save_failed(manager: ocp.CheckpointManager, e: BaseException) -> CheckpointError:
  manager.reload()  # the steps on disk, the failed one not among them
  good = manager.all_steps()
  last = f"step {max(good)}" if good else "none yet"
  details = _no_space_log.write_to(os.path.dirname(str(manager.directory)))
  details = f"; orbax's own reports: {details}" if details else ""
  return CheckpointError(
      f"saving a checkpoint in {manager.directory} failed ({_root_cause(e)}{details}); the run "
      f"stopped. The last good checkpoint is {last}: free space (or fix the cause above) and "
      "rerun the same command to resume from it")


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointError if a background save has failed (a full disk, say), so the run
  stops at once rather than training on without checkpoints."""
  try:
    manager.check_for_errors()
  except Exception as e:  # orbax re-raises whatever the writer raised
    raise _save_failed(manager, e) from None


def close(manager: ocp.CheckpointManager, raise_errors: bool = True) -> None:
  """Finishes the saves in flight and closes the manager; a failed save raises CheckpointError
  unless `raise_errors` is False (another error is already on its way)."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:
    if raise_errors:
      raise _save_failed(manager, e) from None
  finally:
    manager.close()


def _leaf_name(path) -> str:
  """A key path as orbax names the array: 'state.params.encoder.Dense_0.kernel'."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _describe(shape, dtype) -> str:
  return f"{np.dtype(dtype).name}[{','.join(str(d) for d in shape)}]"


def _storage_template(template, sharding):
  """ShapeDtypeStructs of what is on disk: typed keys become their uint32 key data."""
  def leaf(x):
    if _is_key(x):
      x = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None))
  return jax.tree.map(leaf, template)


def _fits(manager: ocp.CheckpointManager, step: int, storage_template) -> bool:
  try:
    check_fits(manager, step, storage_template)
  except CheckpointError:
    return False
  return True


def check_fits(manager: ocp.CheckpointManager, step: int, storage_template) -> None:
  """Raises CheckpointError naming every array whose name, shape or dtype differs."""
  saved = {m.name: (tuple(m.shape), m.dtype)
           for m in jax.tree.leaves(manager.item_metadata(step)["arrays"])}
  wanted = {_leaf_name(p): (tuple(x.shape), x.dtype)
            for p, x in jax.tree_util.tree_flatten_with_path(storage_template)[0]}
  problems = [f"{name} is {_describe(*saved[name])} in the checkpoint but {_describe(*want)} "
              "for this config" for name, want in wanted.items()
              if name in saved and (saved[name][0] != want[0]
                                    or np.dtype(saved[name][1]) != np.dtype(want[1]))]
  problems += [f"{name} is missing from the checkpoint" for name in wanted if name not in saved]
  problems += [f"{name} is in the checkpoint but not in this config's state"
               for name in saved if name not in wanted]
  if problems:
    shown = "; ".join(problems[:6])
    if len(problems) > 6:
      shown += f"; and {len(problems) - 6} more"
    raise CheckpointError(
        f"checkpoint {manager.directory}/{step} does not fit this config's train state: "
        f"{shown}. It was written by another model or optimizer config (or an older jaxvae); "
        "resume it with the config it was trained with (its config.json), or train this "
        "config in a new --workdir")


class Legacy(NamedTuple):
  """An older layout of the same state: a checkpoint that fits `template` is restored into it
  and passed through `convert`, with `note` said once."""
  template: Any
  convert: Callable
  note: str


def restore(manager: ocp.CheckpointManager, step: int, template, sharding=None,
            legacy: Legacy | None = None):
  """Restores (tree, progress) at `step` into the structure, shapes and dtypes of `template`.

  template: a pytree like the saved one; its leaves may be ShapeDtypeStructs (from
  `jax.eval_shape`), except typed PRNG keys, which must be concrete arrays so their
  implementation is known. `sharding` places every array (default: the template's own).
  A checkpoint that fits `legacy.template` instead is read that way and converted. Raises
  CheckpointError when neither fits.
  """
  storage = _storage_template(template, sharding)
  try:
    check_fits(manager, step, storage)
  except CheckpointError:
    if legacy is None or not _fits(manager, step, _storage_template(legacy.template, sharding)):
      raise
    tree, progress = restore(manager, step, legacy.template, sharding)
    print(f"checkpoint {manager.directory}/{step} {legacy.note}", flush=True)
    return legacy.convert(tree), progress
  items = {"arrays": ocp.args.StandardRestore(storage), "progress": ocp.args.JsonRestore()}
  out = manager.restore(step, args=ocp.args.Composite(**items))
  tree = jax.tree.map(
      lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      template, out["arrays"])
  return tree, dict(out["progress"])


def _move_aside(manager: ocp.CheckpointManager, name: str, why: str) -> None:
  """Moves checkpoints/NAME to bad_checkpoints/NAME(-time) and says so; process 0 alone does,
  as the directory is shared (callers then wait at a barrier)."""
  if not parallel.is_primary():
    return
  src = os.path.join(str(manager.directory), name)
  bad_dir = os.path.join(os.path.dirname(str(manager.directory)), "bad_checkpoints")
  dst = os.path.join(bad_dir, name)
  if os.path.exists(dst):
    dst += time.strftime("-%Y%m%d-%H%M%S")
  try:
    os.makedirs(bad_dir, exist_ok=True)
    os.rename(src, dst)  # a directory needs write access of its own to move (its "..")
  except OSError as e:
    raise CheckpointError(
        f"checkpoint {src} {why.split('; ')[0]}, and it cannot be moved aside to {bad_dir} "
        f"({_root_cause(e)}); give this user access to it (e.g. chmod -R u+rwX {src}) to "
        "resume from it, or move it away yourself to resume from the one before, then rerun "
        "the same command") from None
  print(f"checkpoint {src} {why}; moved it to {dst}", flush=True)


def restore_latest(manager: ocp.CheckpointManager, template, sharding=None,
                   legacy: Legacy | None = None):
  """Restores the newest checkpoint that reads back whole: (step, tree, progress), or None.

  Saves that never finished and newer checkpoints that fail to read are moved aside with a
  message, so the run goes on from the previous good one and later saves cannot collide
  with them. A checkpoint that reads but does not fit `template` raises CheckpointError.
  """
  try:
    names = sorted(os.listdir(manager.directory))
  except OSError as e:
    raise _unreadable(str(manager.directory), e) from None
  for name in names:
    if _UNFINISHED in name:
      _move_aside(manager, name, "is a save that never finished (the run stopped while "
                  "writing it)")
  parallel.barrier("unfinished checkpoints set aside")
  manager.reload()
  unreadable = []
  for step in reversed(manager.all_steps()):
    try:
      os.listdir(os.path.join(str(manager.directory), str(step)))  # orbax hides EACCES
      tree, progress = restore(manager, step, template, sharding, legacy)
    except CheckpointError:
      raise
    except Exception as e:  # orbax and tensorstore raise many types for damaged files
      unreadable.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
      continue
    for bad, error in unreadable:
      _move_aside(manager, str(bad), f"cannot be read ({error}); resuming from step {step}")
    parallel.barrier("unreadable checkpoints set aside")
    manager.reload()
    return step, tree, progress
  if unreadable:
    listed = "; ".join(f"step {s}: {e}" for s, e in unreadable)
    raise CheckpointError(f"no checkpoint in {manager.directory} can be read ({listed}). Move "
                          "the directory away to start over, or restore it from a backup")
  return None



def read_group(workdir: str, group: str):
  """The parameters of one group (as numpy arrays, nested dicts) in WORKDIR's latest checkpoint,
  read without a template: for a run that uses another run's trained network (objectives/darla.py).
  Raises CheckpointError when there is none."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  registry = ocp.handlers.create_default_handler_registry(arrays=ocp.StandardCheckpointHandler())
  try:
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                    options=options, handler_registry=registry)
  except OSError as e:
    raise _unreadable(os.path.join(workdir, "checkpoints"), e) from None
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"{workdir}/checkpoints holds no checkpoint; train that run first")
    out = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))
  finally:
    manager.close()
  params = out["arrays"]["state"]["params"]
  if group not in params:
    raise CheckpointError(f"{workdir}/checkpoints/{step} holds the groups {sorted(params)}, not "
                          f"{group!r}")
  return jax.tree.map(np.asarray, params[group])
