"""The joint token space: where text ids, MASK and image codes live, and which positions hold what.

Ids follow the original MeDiM layout ``text | MASK | image``: text ids first (including the text
tokenizer's own specials), one MASK id, then the image codebook. Positions follow the diffusion
state layout ``[text segment | image segment]``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

TEXT = 0
IMAGE = 1
MODALITY_NAMES = ("text", "image")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Id ranges of the joint vocabulary and the modality of every sequence position."""

  text_vocab_size: int
  image_vocab_size: int
  text_length: int
  image_length: int

  def __post_init__(self):
    for name in ("text_vocab_size", "image_vocab_size", "text_length", "image_length"):
      if getattr(self, name) <= 0:
        raise ValueError(f"TokenLayout.{name} must be positive, got {getattr(self, name)}")

  # Ids.
  @property
  def mask_id(self) -> int:
    return self.text_vocab_size

  @property
  def image_offset(self) -> int:
    return self.text_vocab_size + 1

  @property
  def vocab_size(self) -> int:
    return self.text_vocab_size + 1 + self.image_vocab_size

  def image_ids(self, codes):
    """Image codebook indices -> joint ids."""
    return codes + self.image_offset

  def image_codes(self, ids):
    """Joint ids of the image segment -> codebook indices (MASK or text ids clip to valid codes)."""
    xp = jnp if isinstance(ids, jnp.ndarray) else np
    return xp.clip(ids - self.image_offset, 0, self.image_vocab_size - 1)

  # Positions.
  @property
  def seq_length(self) -> int:
    return self.text_length + self.image_length

  @property
  def text_slice(self) -> slice:
    return slice(0, self.text_length)

  @property
  def image_slice(self) -> slice:
    return slice(self.text_length, self.seq_length)

  def modality(self) -> np.ndarray:
    """(seq_length,) int32: TEXT or IMAGE for each position."""
    return np.concatenate([
        np.full(self.text_length, TEXT, np.int32),
        np.full(self.image_length, IMAGE, np.int32),
    ])

  def allowed_id_range(self) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the half-open id range [lo, hi) it may hold: text ids or image ids, never MASK."""
    modality = self.modality()
    lo = np.where(modality == TEXT, 0, self.image_offset).astype(np.int32)
    hi = np.where(modality == TEXT, self.text_vocab_size, self.vocab_size).astype(np.int32)
    return lo, hi

  def segments(self) -> tuple[tuple[slice, int, int], ...]:
    """(positions, lo, hi) per modality: the positions of a segment hold only ids in [lo, hi)."""
    return ((self.text_slice, 0, self.text_vocab_size),
            (self.image_slice, self.image_offset, self.vocab_size))

  def join(self, text_ids, image_codes):
    """(B, text_length) text ids + (B, image_length) codes -> (B, seq_length) joint ids."""
    text_ids = np.asarray(text_ids, np.int32)
    image_codes = np.asarray(image_codes, np.int32)
    if text_ids.shape[-1] != self.text_length or image_codes.shape[-1] != self.image_length:
      raise ValueError(
          f"expected text of length {self.text_length} and image of {self.image_length} tokens, got "
          f"{text_ids.shape[-1]} and {image_codes.shape[-1]}")
    if text_ids.min(initial=0) < 0 or text_ids.max(initial=0) >= self.text_vocab_size:
      raise ValueError(f"text ids must lie in [0, {self.text_vocab_size}), got range "
                       f"[{text_ids.min()}, {text_ids.max()}]")
    if image_codes.min(initial=0) < 0 or image_codes.max(initial=0) >= self.image_vocab_size:
      raise ValueError(f"image codes must lie in [0, {self.image_vocab_size}), got range "
                       f"[{image_codes.min()}, {image_codes.max()}]")
    return np.concatenate([text_ids, self.image_ids(image_codes)], axis=-1)

  def split(self, ids):
    """(B, seq_length) joint ids -> (text ids, image codes)."""
    return ids[..., self.text_slice], self.image_codes(ids[..., self.image_slice])
