"""Orbax checkpoints of the whole train state and the data iterator's position.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
while saving leaves the previous checkpoint usable (training removes the half-written one when it
starts again). Restoring goes against an abstract state, so the restored arrays get the shapes,
dtypes and shardings the current run expects.

Integrity: once a save has finished, the trainer seals it: ``STEP/medim_sha256.json`` records the
size and sha256 of every file in it. Restoring checks the seal first (and treats a failed restore
the same way), so a checkpoint whose bytes changed on disk is named, never half-read. Policy
``on_corrupt``: ``fallback`` moves it aside to ``corrupt-STEP`` (never deleted) and restores the
newest intact one; ``error`` stops with one line naming the intact ones. Retention is done here,
not by orbax, and counts only sealed checkpoints, so a save never pushes out the last one known good.

A save that fails (disk full, a file-size limit) raises ``errors.SaveFailed`` naming the step, the
cause and the intact checkpoints; its half-written folder is removed when training starts again.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from medim_jax import errors
from medim_jax.integrity import file_sha256, write_text_atomically

TMP_MARKER = ".orbax-checkpoint-tmp"  # in the name of a checkpoint folder still being written
SEAL = "medim_sha256.json"            # in a finished checkpoint: {relative path: [size, sha256]}
CORRUPT_PREFIX = "corrupt-"           # where a corrupt checkpoint is moved aside
ON_CORRUPT = ("fallback", "error")


def _files(folder: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(base, name), folder)
                for base, _, names in os.walk(folder) for name in names if name != SEAL)


def seal(folder: str) -> None:
  """Write ``folder/SEAL``: size and sha256 of every file in it (temporary name, then renamed)."""
  record = {name: [os.path.getsize(os.path.join(folder, name)), file_sha256(os.path.join(folder, name))]
            for name in _files(folder)}
  write_text_atomically(os.path.join(folder, SEAL), json.dumps(record, indent=0))


def is_sealed(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, SEAL))


def seal_problem(folder: str) -> str | None:
  """None when every file matches the seal (or there is no seal yet); else the first problem."""
  if not is_sealed(folder):
    return None
  try:
    with open(os.path.join(folder, SEAL)) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    return f"{SEAL} unreadable ({type(e).__name__})"
  for name, (size, digest) in sorted(record.items()):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      return f"{name} is missing"
    if os.path.getsize(path) != size:
      return f"{name} is {os.path.getsize(path)} bytes, sealed at {size}"
    if file_sha256(path) != digest:
      return f"{name} has changed since it was written (sha256 differs)"
  extra = sorted(set(_files(folder)) - set(record))
  return f"{extra[0]} was not in the checkpoint when it was written" if extra else None


def _path_name(path) -> str:
  """'params/blocks/0/attn/q' for both a live state and orbax's stored metadata tree."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


def _remove_half_written(directory: str) -> None:
  """Delete the temporary folders of saves a crash interrupted (orbax's own cleanup runs in a
  background thread that a quick exit can cut short)."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if TMP_MARKER in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int, keep_period: int = 0,
               remove_half_written: bool = False, on_corrupt: str = "fallback"):
    """Keeps the newest ``max_to_keep`` checkpoints and every multiple of ``keep_period`` (> 0); an
    older one is removed only after the newer ones are sealed.

    remove_half_written: for the run that owns the directory (training): it also seals, applies
    retention and moves corrupt checkpoints aside. Never for a reader that may run beside it
    (sampling, evaluation): a reader only checks, and stops on a corrupt checkpoint.
    """
    if on_corrupt not in ON_CORRUPT:
      raise errors.InputError(f"on_corrupt_checkpoint must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    self.directory = os.path.abspath(directory)
    self.owner, self.on_corrupt = remove_half_written, on_corrupt
    self.max_to_keep, self.keep_period = max_to_keep, keep_period
    self._unsealed = set()  # steps this instance saved: sealed once their save has finished
    self._saved = False     # an instance that saved applies retention, owner or not
    self._save_failed = False  # reported once; orbax re-raises a failed save on every wait
    if remove_half_written:
      _remove_half_written(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True on every host once the JAX distributed service has seen a preemption notice."""
    return self.manager.reached_preemption(step)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state, data_iter=None) -> None:
    self._seal_finished()  # the previous save (asynchronous) is sealed before the next starts
    self._saved = True
    self._unsealed.add(step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
    try:
      self.manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 (the synchronous part: folders, metadata)
      raise self._save_failure(e) from e

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restore ``step`` (default: the latest intact one) into the structure of ``abstract_state``."""
    if step is not None:
      return self._restore_checked(abstract_state, data_iter, step, fallback=False)
    while True:
      latest = self.latest_step()
      if latest is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      restored = self._restore_checked(abstract_state, data_iter, latest, fallback=True)
      if restored is not None:
        return restored

  def _restore_checked(self, abstract_state, data_iter, step: int, fallback: bool):
    """The restored state; None after moving a corrupt ``step`` aside (the caller tries the next)."""
    problem = seal_problem(self.step_dir(step))
    if problem is None:
      try:
        self._check_shapes(step, abstract_state)  # a model mismatch is the user's, not corruption
        restored = self._restore(abstract_state, data_iter, step)
        if self.owner and not is_sealed(self.step_dir(step)) and jax.process_index() == 0:
          seal(self.step_dir(step))  # saved before a crash could seal it; it read back whole
        return restored
      except errors.InputError:
        raise
      except Exception as e:  # noqa: BLE001 (TensorStore, orbax, json: any failure to read it)
        if is_sealed(self.step_dir(step)):
          raise  # its bytes are the ones written: not corruption, so not moved aside
        problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    self._corrupt(step, problem, fallback)
    return None

  def _corrupt(self, step: int, problem: str, fallback: bool) -> None:
    others = [s for s in self.all_steps() if s != step and seal_problem(self.step_dir(s)) is None]
    where = f"checkpoint {self.step_dir(step)} is corrupt: {problem}"
    if not (fallback and self.owner and self.on_corrupt == "fallback"):
      raise errors.CorruptFileError(
          f"{where}. Intact checkpoints: {others or 'none'}"
          + (" (restore one with its step, or move this one aside)" if others else ""))
    aside = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}")
    suffix = 1
    while os.path.exists(aside):
      aside, suffix = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}.{suffix}"), suffix + 1
    if jax.process_index() == 0:
      os.rename(self.step_dir(step), aside)
    _sync(f"corrupt-{step}")
    self.manager.reload()
    print(f"warning: {where}; moved to {aside} (kept, not deleted); "
          + (f"restoring checkpoint {others[-1]}" if others else "no intact checkpoint left"),
          flush=True)

  def _restore(self, abstract_state, data_iter, step: int):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and restored.get("data_iter") is not None:
      data_iter.set_state(restored["data_iter"])
    return restored["state"]

  def _check_shapes(self, step: int, abstract_state) -> None:
    """A clear error, naming the first mismatch, for a checkpoint of a different model shape."""
    metadata = self.manager.item_metadata(step)
    stored = getattr(metadata, "state", None) if metadata is not None else None
    if stored is None:
      return
    stored_shapes = {_path_name(path): tuple(leaf.shape)
                     for path, leaf in jax.tree_util.tree_leaves_with_path(stored)
                     if hasattr(leaf, "shape")}
    wanted = {_path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract_state)}
    for missing, there, here in ((sorted(wanted - set(stored_shapes)), "lacks", "needs"),
                                 (sorted(set(stored_shapes) - wanted), "holds", "has no")):
      if missing:
        raise errors.InputError(
            f"checkpoint {self.directory}/{step} {there} {missing[0]} (and {len(missing) - 1} more), "
            f"which this run {here} (EMA on in one and off in the other, or another model): use "
            "the config the checkpoint was trained with, or a fresh --workdir.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
      key = _path_name(path)
      if key in stored_shapes and stored_shapes[key] != tuple(np.shape(leaf)):
        raise errors.InputError(
            f"checkpoint {self.directory}/{step} does not match this model: {key} is "
            f"{stored_shapes[key]} there but {tuple(np.shape(leaf))} here. Use the config the "
            "checkpoint was trained with, or a fresh --workdir.")

  def _seal_finished(self) -> None:
    """Seal the checkpoints this instance saved, once written, then apply retention. Only what it
    wrote itself: sealing a checkpoint found on disk would bless whatever its bytes are now."""
    if self._save_failed:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (TensorStore's write errors arrive from orbax's threads)
      raise self._save_failure(e) from e
    if not self._saved:
      return
    steps = self.all_steps()
    if jax.process_index() == 0:
      for step in sorted(self._unsealed & set(steps)):
        seal(self.step_dir(step))
    self._unsealed.clear()
    if jax.process_index() == 0:
      keep = set(steps[-self.max_to_keep:]) if self.max_to_keep else set(steps)
      keep |= {s for s in steps if self.keep_period and s % self.keep_period == 0}
      for step in sorted(set(steps) - keep):
        shutil.rmtree(self.step_dir(step))
    _sync("sealed")
    self.manager.reload()

  def _save_failure(self, cause: Exception) -> errors.SaveFailed:
    self._save_failed = True
    failed = sorted(self._unsealed)
    self._unsealed.clear()
    intact = [s for s in self.all_steps() if s not in failed and is_sealed(self.step_dir(s))]
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if len(reason) > 160:  # TensorStore puts the cause (e.g. "File too large") at the end
      reason = "..." + reason[-160:]
    resume = (f"run the same command again to resume from checkpoint {intact[-1]}" if intact
              else "run the same command again to start over")
    where = self.step_dir(failed[-1]) if failed else self.directory
    return errors.SaveFailed(
        f"saving checkpoint {where} failed "
        f"({type(cause).__name__}: {reason}); nothing else was changed. Intact checkpoints: "
        f"{intact or 'none'}. Free disk space (or lift the file-size limit), then {resume}.")

  def wait(self) -> None:
    self._seal_finished()

  def close(self) -> None:
    try:
      self._seal_finished()
    finally:
      if not self._save_failed:
        self.manager.close()  # after a failed save orbax's close would raise that failure again


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"medim_checkpoint_{name}")
