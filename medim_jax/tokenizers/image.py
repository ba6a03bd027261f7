"""Image tokenizers behind one interface: ``encode(images) -> codes`` and ``decode(codes) -> images``.

Images are uint8 arrays (B, H, W, 3); codes are int32 (B, tokens_per_image) in raster order.
"""

from __future__ import annotations

import numpy as np


class PalettePatchTokenizer:
  """A fixed quantiser for pictures drawn on a grid of flat-coloured cells from a small palette.

  Each token covers ``patch x patch`` cells. Code 0 is an empty patch (all background, palette
  colour 0); otherwise the code says which of the patch's cells are filled and with which single
  palette colour: ``1 + (colour - 1) * (2^(patch^2) - 1) + (pattern - 1)``. Exact on such
  pictures (the smoke data); a stand-in for the learned VQ tokenizer behind the same interface.
  """

  def __init__(self, palette, image_size: int, cell_size: int, patch: int = 1):
    self.palette = np.asarray(palette, np.float32)
    if self.palette.ndim != 2 or self.palette.shape[1] != 3:
      raise ValueError(f"palette must be (K, 3) RGB, got shape {self.palette.shape}")
    if image_size % (cell_size * patch):
      raise ValueError(f"image_size {image_size} is not a multiple of cell_size * patch "
                       f"({cell_size} * {patch})")
    self.image_size, self.cell_size, self.patch = image_size, cell_size, patch
    self.cells = image_size // cell_size
    self.grid = self.cells // patch
    self.patterns = 2 ** (patch * patch) - 1  # non-empty fill patterns of one patch

  @property
  def codebook_size(self) -> int:
    return 1 + (len(self.palette) - 1) * self.patterns

  @property
  def tokens_per_image(self) -> int:
    return self.grid * self.grid

  def _patches(self, cell_colours):
    """(B, cells, cells) -> (B, grid*grid, patch*patch) in raster order of patches and of cells."""
    b, g, p = cell_colours.shape[0], self.grid, self.patch
    return cell_colours.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g, p * p)

  def encode(self, images) -> np.ndarray:
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, 3), got {images.shape}")
    b, n, c = images.shape[0], self.cells, self.cell_size
    means = images.astype(np.float32).reshape(b, n, c, n, c, 3).mean(axis=(2, 4))
    colours = ((means[..., None, :] - self.palette) ** 2).sum(-1).argmin(-1)  # (B, n, n)
    patches = self._patches(colours)
    filled = patches > 0
    pattern = (filled * (1 << np.arange(self.patch * self.patch))).sum(-1)
    counts = np.stack([(patches == k).sum(-1) for k in range(1, len(self.palette))], -1)
    colour = counts.argmax(-1) + 1  # the patch's most common non-background colour
    codes = np.where(pattern > 0, 1 + (colour - 1) * self.patterns + (pattern - 1), 0)
    return codes.astype(np.int32)

  def decode(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
      raise ValueError(f"codes must have shape (B, {self.tokens_per_image}), got {codes.shape}")
    codes = np.clip(codes, 0, self.codebook_size - 1)
    colour = np.where(codes > 0, (codes - 1) // self.patterns + 1, 0)
    pattern = np.where(codes > 0, (codes - 1) % self.patterns + 1, 0)
    bits = (pattern[..., None] >> np.arange(self.patch * self.patch)) & 1
    cells = bits * colour[..., None]  # (B, grid*grid, patch*patch)
    b, g, p = codes.shape[0], self.grid, self.patch
    grid = cells.reshape(b, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(b, self.cells, self.cells)
    pixels = self.palette[grid].repeat(self.cell_size, axis=1).repeat(self.cell_size, axis=2)
    return pixels.round().astype(np.uint8)
