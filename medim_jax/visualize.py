"""Pictures for people: sample grids of images with their reports."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def sample_grid(images, captions, path: str, columns: int = 8, image_px: int = 128,
                caption_width: int = 22) -> None:
  """Save a PNG grid: each cell one image (nearest-neighbour upscaled) with its caption lines below."""
  font = ImageFont.load_default()
  wrapped = ["\n".join(textwrap.fill(line, caption_width) for line in caption) for caption in captions]
  line_height = 12
  text_px = line_height * max(1, max(w.count("\n") + 1 for w in wrapped)) + 6
  cell_w, cell_h = image_px + 12, image_px + text_px + 12
  rows = -(-len(images) // columns)
  sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(sheet)
  for i, (image, text) in enumerate(zip(images, wrapped)):
    x, y = (i % columns) * cell_w + 6, (i // columns) * cell_h + 6
    tile = Image.fromarray(np.asarray(image, np.uint8)).resize((image_px, image_px), Image.NEAREST)
    sheet.paste(tile, (x, y))
    draw.multiline_text((x, y + image_px + 4), text, fill="black", font=font, spacing=2)
  sheet.save(path)


def comparison_grid(columns, titles, path: str, image_px: int = 128, row_labels=None) -> None:
  """Save a PNG with one column per image set (e.g. originals, reconstructions), rows aligned and
  optionally named in a left margin."""
  font = ImageFont.load_default()
  rows = len(columns[0])
  header, pad = 18, 4
  margin = 0 if row_labels is None else 6 * max(len(label) for label in row_labels) + pad
  sheet = Image.new("RGB", (margin + len(columns) * (image_px + pad) + pad,
                            header + rows * (image_px + pad)), "white")
  draw = ImageDraw.Draw(sheet)
  for r, label in enumerate(row_labels or []):
    draw.text((pad, header + r * (image_px + pad) + image_px // 2 - 5), label, fill="black", font=font)
  for c, (images, title) in enumerate(zip(columns, titles)):
    x = margin + pad + c * (image_px + pad)
    draw.text((x, 3), title, fill="black", font=font)
    for r, image in enumerate(images):
      tile = Image.fromarray(np.asarray(image, np.uint8)).resize((image_px, image_px), Image.NEAREST)
      sheet.paste(tile, (x, header + r * (image_px + pad)))
  sheet.save(path)


def confidence_colours(confidence: np.ndarray) -> np.ndarray:
  """Probabilities (...,) -> RGB (..., 3) uint8: red = the model was unsure (p near 0), green =
  sure (p near 1), grey = given, not generated (NaN)."""
  p = np.nan_to_num(np.asarray(confidence, np.float32), nan=-1.0)
  red = np.where(p < 0, 128, np.clip(2.0 * (1.0 - p), 0, 1) * 230)
  green = np.where(p < 0, 128, np.clip(2.0 * p, 0, 1) * 200)
  blue = np.where(p < 0, 128, 40)
  return np.stack([red, green, blue], -1).astype(np.uint8)


def token_pieces(text_tokenizer, ids, probs) -> list[tuple[str, float]]:
  """(text, probability) for each report token up to EOS: each token's text is what it adds to the
  decoded report (spaces included), so the texts joined give the report."""
  pieces, before = [], ""
  for k, (token, p) in enumerate(zip(ids, probs)):
    if token in (text_tokenizer.eos_id, text_tokenizer.pad_id):
      break
    text = text_tokenizer.decode([int(t) for t in ids[:k + 1]])
    pieces.append((text[len(before):] if text.startswith(before) else text, float(p)))
    before = text
  return pieces
