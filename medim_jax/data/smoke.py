"""Procedural smoke data: a coloured shape in one quadrant of a 24x24 image, with a sentence for it.

Made in memory from a seed in well under a second. Images are drawn on a 6x6 grid of 4-pixel
cells from a 5-colour palette; each quadrant is 3x3 cells and holds the shape exactly, so the
palette tokenizer encodes an image exactly into 36 codes (one per cell; ``config.data.image_patch``
= 3 would give 4 codes of 3x3 cells). The attributes (colour, shape, vertical and horizontal
position) are kept as ground truth for scoring.
"""

from __future__ import annotations

import numpy as np

from medim_jax.data.base import PairedDataset, PairedSplit
from medim_jax.tokenizers.image import PalettePatchTokenizer
from medim_jax.tokenizers.text import WordTokenizer
from medim_jax.tokenizers.vocab import TokenLayout

PALETTE = {"black": (0, 0, 0), "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230),
           "yellow": (235, 215, 40)}
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = {
    "square": ("###", "###", "###"),
    "ring": ("###", "#.#", "###"),
    "plus": (".#.", "###", ".#."),
    "cross": ("#.#", ".#.", "#.#"),
}
VERTICAL = ("top", "bottom")
HORIZONTAL = ("left", "right")
# One sentence form keeps the smoke model's job the cross-modal mapping, not phrasing; the prompt
# of the joint task is its first two words ("a red").
TEMPLATE = "a {colour} {shape} in the {vertical} {horizontal}"
PROMPT_WORDS = 2
WORDS = ["a", "in", "the", *COLOURS, *SHAPES, *VERTICAL, *HORIZONTAL]
GRID, CELL = 6, 4


def shape_mask(shape: str) -> np.ndarray:
  return np.array([[c == "#" for c in row] for row in SHAPES[shape]])


def render(attributes: dict) -> np.ndarray:
  """Attributes -> (6, 6) palette indices of the cells; the 3x3 shape fills its quadrant."""
  codes = np.zeros((GRID, GRID), np.int32)
  row = 0 if attributes["vertical"] == "top" else GRID // 2
  col = 0 if attributes["horizontal"] == "left" else GRID // 2
  colour_code = list(PALETTE).index(attributes["colour"])
  codes[row:row + 3, col:col + 3] = np.where(shape_mask(attributes["shape"]), colour_code, 0)
  return codes


def cell_colours(images) -> np.ndarray:
  """(B, 24, 24, 3) pictures -> (B, 6, 6) palette indices of their cells."""
  cells = PalettePatchTokenizer(list(PALETTE.values()), GRID * CELL, CELL, patch=1)
  return cells.encode(images).reshape(-1, GRID, GRID)


def tokenizers(config):
  text = WordTokenizer(WORDS)
  image = PalettePatchTokenizer(list(PALETTE.values()), config.data.image_size, CELL,
                                patch=config.data.image_patch)
  if image.cells != GRID:
    raise ValueError(f"smoke data is drawn on a {GRID}x{GRID} grid of {CELL}-pixel cells, so "
                     f"config.data.image_size must be {GRID * CELL}, got {config.data.image_size}")
  return text, image


def make_split(first_id: int, count: int, seed: int, layout: TokenLayout, text_tok, image_tok) -> PairedSplit:
  rng = np.random.default_rng([seed, first_id])
  attributes, reports, prompt_lengths, cells = [], [], [], []
  for _ in range(count):
    attr = {"colour": str(rng.choice(COLOURS)), "shape": str(rng.choice(list(SHAPES))),
            "vertical": str(rng.choice(VERTICAL)), "horizontal": str(rng.choice(HORIZONTAL))}
    attributes.append(attr)
    reports.append(TEMPLATE.format(**attr))
    prompt_lengths.append(PROMPT_WORDS)
    cells.append(render(attr))
  palette = np.asarray(list(PALETTE.values()), np.uint8)
  images = palette[np.stack(cells)].repeat(CELL, axis=1).repeat(CELL, axis=2)
  codes = image_tok.encode(images)
  text_ids = np.stack([text_tok.encode(r, layout.text_length) for r in reports])
  tokens = layout.join(text_ids, codes)
  return PairedSplit(tokens=tokens, valid=np.ones_like(tokens, bool),
                     prompt_length=np.asarray(prompt_lengths, np.int32),
                     example_id=np.arange(first_id, first_id + count, dtype=np.int32),
                     reports=reports, images=images, attributes=attributes)


def build(config) -> PairedDataset:
  text_tok, image_tok = tokenizers(config)
  layout = TokenLayout(text_vocab_size=text_tok.vocab_size, image_vocab_size=image_tok.codebook_size,
                       text_length=config.data.text_length, image_length=image_tok.tokens_per_image)
  num_train, num_eval = config.data.num_train, config.data.num_eval
  return PairedDataset(
      layout=layout, text_tokenizer=text_tok, image_tokenizer=image_tok,
      train=make_split(0, num_train, config.seed, layout, text_tok, image_tok),
      eval=make_split(num_train, num_eval, config.seed, layout, text_tok, image_tok))
