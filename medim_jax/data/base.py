"""What the training loop and the sampler read: tokenized paired splits and a resumable batch iterator.

A batch is a dict of numpy arrays:
  tokens        (B, L) int32   joint ids, ``[report segment | image segment]``
  valid         (B, L) bool    real positions (False: never masked, no loss, not attended to)
  prompt_length (B,)   int32   leading report tokens that form the prompt (joint-task conditioning)
  example_id    (B,)   int32   stable id of the example (sampling keys derive from it)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from medim_jax import errors
from medim_jax.tokenizers.vocab import TokenLayout

BATCH_KEYS = ("tokens", "valid", "prompt_length", "example_id")


@dataclasses.dataclass
class PairedSplit:
  tokens: np.ndarray
  valid: np.ndarray
  prompt_length: np.ndarray
  example_id: np.ndarray
  reports: list[str]
  images: np.ndarray                    # (N, H, W, 3) uint8, for display
  attributes: list[dict] | None = None  # ground-truth findings, where the data knows them
  dataset: list[str] | None = None      # which dataset each row came from, where there are several

  def __len__(self) -> int:
    return len(self.tokens)

  def batch(self, rows) -> dict[str, np.ndarray]:
    return {key: getattr(self, key)[rows] for key in BATCH_KEYS}

  def subset(self, rows) -> "PairedSplit":
    rows = np.asarray(rows, np.int64)
    pick = lambda values: None if values is None else [values[i] for i in rows]
    return PairedSplit(tokens=self.tokens[rows], valid=self.valid[rows],
                       prompt_length=self.prompt_length[rows], example_id=self.example_id[rows],
                       reports=pick(self.reports), images=self.images[rows],
                       attributes=pick(self.attributes), dataset=pick(self.dataset))


class RandomBatchIterator:
  """Batches of rows drawn with replacement; batch k depends only on (seed, k), so the state is k."""

  def __init__(self, split: PairedSplit, batch_size: int, seed: int):
    if len(split) == 0:
      raise ValueError("cannot iterate over an empty split")
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    return self.split.batch(rng.integers(0, len(self.split), self.batch_size))

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
      raise errors.InputError(f"data iterator state {state} was saved with a different seed or "
                              f"batch size (now seed={self.seed}, batch_size={self.batch_size})")
    self.step = int(state["step"])


@dataclasses.dataclass
class PairedDataset:
  layout: TokenLayout
  text_tokenizer: Any
  image_tokenizer: Any
  train: PairedSplit
  eval: PairedSplit

  def train_iterator(self, batch_size: int, seed: int) -> RandomBatchIterator:
    return RandomBatchIterator(self.train, batch_size, seed)

  def eval_batches(self, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    return fixed_batches(self.eval, batch_size, num_batches)


def fixed_batches(split: PairedSplit, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
  """Fixed evaluation batches: the first rows of the split, in order (wrapping if short)."""
  rows = np.arange(batch_size * num_batches) % len(split)
  return [split.batch(r) for r in rows.reshape(num_batches, batch_size)]
