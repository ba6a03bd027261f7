"""Image tokenizers behind one interface: ``encode(images) -> codes`` and ``decode(codes) -> images``.

Images are uint8 arrays (B, H, W, 3); codes are int32 (B, tokens_per_image) in raster order.
"""

from __future__ import annotations

import numpy as np


class PaletteGridTokenizer:
  """A fixed quantiser: each ``cell x cell`` patch becomes the index of its nearest palette colour.

  Exact on images drawn from the palette on the cell grid (the smoke data); a stand-in for the
  learned VQ tokenizer behind the same interface.
  """

  def __init__(self, palette, image_size: int, cell_size: int):
    self.palette = np.asarray(palette, np.float32)
    if self.palette.ndim != 2 or self.palette.shape[1] != 3:
      raise ValueError(f"palette must be (K, 3) RGB, got shape {self.palette.shape}")
    if image_size % cell_size:
      raise ValueError(f"image_size {image_size} is not a multiple of cell_size {cell_size}")
    self.image_size, self.cell_size = image_size, cell_size
    self.grid = image_size // cell_size

  @property
  def codebook_size(self) -> int:
    return len(self.palette)

  @property
  def tokens_per_image(self) -> int:
    return self.grid * self.grid

  def encode(self, images) -> np.ndarray:
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, 3), got {images.shape}")
    b, g, c = images.shape[0], self.grid, self.cell_size
    cells = images.astype(np.float32).reshape(b, g, c, g, c, 3).mean(axis=(2, 4))
    distances = ((cells[..., None, :] - self.palette) ** 2).sum(-1)
    return distances.argmin(-1).reshape(b, g * g).astype(np.int32)

  def decode(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
      raise ValueError(f"codes must have shape (B, {self.tokens_per_image}), got {codes.shape}")
    grid = self.palette[np.clip(codes, 0, self.codebook_size - 1)].reshape(-1, self.grid, self.grid, 3)
    pixels = grid.repeat(self.cell_size, axis=1).repeat(self.cell_size, axis=2)
    return pixels.round().astype(np.uint8)
