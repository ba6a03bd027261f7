"""Orbax checkpoints of the whole train state and the data iterator's position.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
while saving leaves the previous checkpoint usable (training removes the half-written one when it
starts again). Restoring goes against an abstract state, so the restored arrays get the shapes,
dtypes and shardings the current run expects.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from medim_jax import errors

TMP_MARKER = ".orbax-checkpoint-tmp"  # in the name of a checkpoint folder still being written


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
               remove_half_written: bool = False):
    """Keeps the newest ``max_to_keep`` checkpoints, and every multiple of ``keep_period`` (> 0).

    remove_half_written: for the run that owns the directory (training), never for a reader that
    may run beside it (sampling, evaluation), which would delete a save in progress.
    """
    self.directory = os.path.abspath(directory)
    if remove_half_written:
      _remove_half_written(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period or None,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True on every host once the JAX distributed service has seen a preemption notice."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, data_iter=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = ocp.args.JsonSave(data_iter.get_state())
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, abstract_state, data_iter=None, step: int | None = None):
    """Restore ``step`` (default: the latest) into the structure of ``abstract_state``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self._check_shapes(step, abstract_state)
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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
