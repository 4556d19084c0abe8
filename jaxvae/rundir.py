"""A run's directory: WORKDIR, its config.json, metrics.jsonl and other files.

WORKDIR holds what a run writes (`RUN_FILES`); process 0 writes them, once. `prepare_workdir`
checks a workdir before any compute; `jaxvae.restore` rebuilds a trained run from one.
"""

import io
import json
import os
import shutil
import socket
import tempfile
import time

import ml_collections
import numpy as np

from jaxvae import config as config_lib
from jaxvae import parallel


def append_jsonl(path: str, row: dict) -> None:
  if not parallel.is_primary():  # a run's files are written once, by process 0
    return
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


class RunError(RuntimeError):
  """A run that cannot start or go on; the message says why and what to do."""


# What a run writes in its workdir; --overwrite deletes exactly these.
RUN_FILES = ("config.json", "config_changes.jsonl", "metrics.jsonl", "model.txt", "tensorboard",
             "checkpoints", "bad_checkpoints", "figures")


def prepare_workdir(workdir: str, config_json: dict, overwrite: bool) -> dict:
  """Checks WORKDIR before any compute; returns the allowed config changes of a resumed run.

  Refuses a workdir that cannot be written, or one holding a run whose frozen config keys
  differ or cannot be read, unless `overwrite`, which deletes that run's files first.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):  # permissions alone miss read-only mounts
      pass
  except OSError as e:
    raise RunError(f"--workdir={workdir} cannot be written ({e.strerror}); choose a directory "
                   "you can write to") from None
  present = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
  if present and overwrite:
    for name in present if parallel.is_primary() else ():
      path = os.path.join(workdir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    print(f"--overwrite: deleted {', '.join(present)} of the previous run in {workdir}",
          flush=True)
    return {}
  if not present:
    return {}
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f"{workdir} holds {', '.join(present)} but no readable config.json ({e}), so "
                   "this config cannot be checked against its run; choose another --workdir, or "
                   "pass --overwrite to delete that run") from None
  frozen, allowed = config_lib.resume_changes(saved, config_json)
  if frozen:
    listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in frozen.items())
    raise RunError(
        f"{workdir} holds a run of another config ({listed}). A resumed run may change only "
        f"{', '.join(config_lib.RESUMABLE_KEYS)}. Rerun with the run's own values to resume it, "
        "choose another --workdir, or pass --overwrite to delete that run and start over")
  return allowed


def write_text(workdir: str, name: str, text: str) -> None:
  """Writes WORKDIR/name atomically (process 0): a kill mid-write leaves the old file whole."""
  if not parallel.is_primary():
    return
  path = os.path.join(workdir, name)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def record_config(workdir: str, config_json: dict, changes: dict, step: int, epoch: int) -> None:
  """Writes config.json and logs the allowed changes a resumed run made to it (at `step`)."""
  if changes:
    print("config changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}"
                                                   for k, (a, b) in changes.items()), flush=True)
    append_jsonl(os.path.join(workdir, "config_changes.jsonl"),
                 {"step": step, "epoch": epoch,
                  "changes": {k: list(v) for k, v in changes.items()}})
  write_text(workdir, "config.json", json.dumps(config_json, indent=2))


class EventWriter:
  """TensorBoard event files in `logdir`, as tf.summary writes them (scalars as float tensors,
  images as [width, height, PNG...] string tensors, each with its plugin's metadata), written
  with the tensorboard package alone: importing TensorFlow for its writer (as flax's does) cost
  every run 6 s before its first step."""

  def __init__(self, logdir: str):
    # tensorboard's own EventFileWriter would import TensorFlow (for its file layer), so the
    # records go to a plain file, in the file name and framing TensorBoard reads.
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
    self._event = event_pb2.Event
    self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

  def scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboard.plugins.scalar import summary_v2
    self._add(summary_v2.scalar_pb(tag, float(value)), step)

  def image(self, tag: str, images: np.ndarray, step: int) -> None:
    """images: f32[N, H, W, C] in [0, 1] (C 1 or 3), stored as 8-bit PNGs."""
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.image import metadata
    from tensorboard.util import tensor_util
    pixels = np.rint(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)
    pngs = []
    for image in pixels:
      buffer = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
      pngs.append(buffer.getvalue())
    height, width = pixels.shape[1:3]
    tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), *pngs])
    value = summary_pb2.Summary.Value(
        tag=tag, tensor=tensor,
        metadata=metadata.create_summary_metadata(display_name=None, description=None))
    self._add(summary_pb2.Summary(value=[value]), step)

  def _add(self, summary, step: int) -> None:
    self._write(self._event(wall_time=time.time(), step=step, summary=summary))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


class MetricsLog:
  """A run's metrics rows: WORKDIR/metrics.jsonl, the source of truth, and with `tensorboard`
  the same scalars (and images) as TensorBoard events in WORKDIR/tensorboard/. Process 0 writes;
  elsewhere every method does nothing."""

  def __init__(self, workdir: str, tensorboard: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = tensorboard and parallel.is_primary()
    self._writer = None
    if self.tensorboard:
      self._writer = EventWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict) -> None:
    """Appends `row` (with "step") to metrics.jsonl, then its numbers to TensorBoard."""
    append_jsonl(self.path, row)
    if self._writer is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._writer.scalar(key, value, row["step"])
      self._writer.flush()

  def images(self, step: int, images: dict) -> None:
    """images: {name: f32[N, H, W, C] in [0, 1]}, one TensorBoard image grid each."""
    if self._writer is not None:
      for name, grid in images.items():
        self._writer.image(name, grid, step)
      self._writer.flush()

  def truncate(self, last_step: int) -> int:
    """Drops rows past the restored step (written before a kill cut their checkpoint short);
    returns how many, as they will be written again."""
    if not parallel.is_primary() or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    rows = [line for line in lines if json.loads(line)["step"] <= last_step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(rows)
    os.replace(self.path + ".tmp", self.path)
    return len(lines) - len(rows)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
