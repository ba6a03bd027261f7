"""Training and validation metrics of a run: log lines, metrics.jsonl and TensorBoard events."""

from __future__ import annotations

import json
import os

import jax

from medim_jax import integrity


class MetricWriter:
  """Log lines, a metrics.jsonl for plots, and TensorBoard event files, all under workdir.

  On several hosts only the first writes (the metrics are global arrays, the same on every host).
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _drop_rows_after(path, resume_step)
    self.jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self.tensorboard = None

  def write(self, step: int, prefix: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
    self.jsonl.flush()
    if self.tensorboard is not None:
      for name, value in metrics.items():
        self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)
      self.tensorboard.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.jsonl.close()
    if self.tensorboard is not None:
      self.tensorboard.close()


def _drop_rows_after(path: str, step: int) -> None:
  """A resumed run redoes the steps after its checkpoint: their old rows would be duplicates."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  kept = [line for line, row in integrity.read_jsonl(path) if row.get("step", 0) <= step]
  if len(kept) != len(lines):
    integrity.write_text_atomically(path, "".join(kept))
