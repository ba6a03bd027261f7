"""Scores for the smoke model: does a generated image show what its report says, and vice versa.

- report->image: a rule-based reader finds the one shape in the generated image (its colour, its
  3x3 pattern, its quadrant) and compares with the prompt's attributes.
- image->report: the generated sentence is parsed for the attribute words and compared with the
  attributes the image was drawn from.
- joint (prompt -> pair): the reader's view of the generated image against the generated report,
  and the prompt's attributes kept in both.
"""

from __future__ import annotations

import json
import os

import numpy as np

from medim_jax.data import smoke

ATTRIBUTES = ("colour", "shape", "position")
_WORD_ATTRIBUTE = {**{c: "colour" for c in smoke.COLOURS}, **{s: "shape" for s in smoke.SHAPES},
                   **{v: "vertical" for v in smoke.VERTICAL}, **{h: "horizontal" for h in smoke.HORIZONTAL}}


def _with_position(attributes: dict) -> dict:
  out = {k: attributes.get(k) for k in ("colour", "shape")}
  v, h = attributes.get("vertical"), attributes.get("horizontal")
  out["position"] = f"{v} {h}" if v and h else None
  return out


def read_image(cells: np.ndarray) -> dict:
  """(6, 6) palette indices of a picture's cells -> {'colour', 'shape', 'position'}; None for
  what cannot be read (several colours, no known shape, a shape across quadrants)."""
  grid = np.asarray(cells).reshape(smoke.GRID, smoke.GRID)
  rows, cols = np.nonzero(grid)
  if rows.size == 0:
    return {"colour": None, "shape": None, "position": None}
  colours = list(smoke.PALETTE)
  counts = np.bincount(grid[rows, cols], minlength=len(colours))
  colour = colours[int(counts.argmax())] if counts.max() == rows.size else None  # one colour only
  top, left = rows.min(), cols.min()
  half = smoke.GRID // 2
  box = grid[top:top + 3, left:left + 3] > 0
  shape = None
  if rows.max() - top < 3 and cols.max() - left < 3 and box.shape == (3, 3):
    shape = next((name for name in smoke.SHAPES if np.array_equal(box, smoke.shape_mask(name))), None)
  same_quadrant = (top // half == rows.max() // half) and (left // half == cols.max() // half)
  position = (f"{smoke.VERTICAL[top // half]} {smoke.HORIZONTAL[left // half]}"
              if same_quadrant else None)
  return {"colour": colour, "shape": shape, "position": position}


def read_report(text: str) -> dict:
  found = {}
  for word in text.split():
    attribute = _WORD_ATTRIBUTE.get(word)
    if attribute is not None:
      if attribute in found and found[attribute] != word:
        found[attribute] = "conflicting"
      else:
        found[attribute] = word
  return _with_position(found)


def agreement(predicted: list[dict], truth: list[dict], only: list[set] | None = None) -> dict:
  """Per-attribute accuracy and the fraction of examples with every (checked) attribute right.

  An attribute that cannot be read (None) is wrong on either side: two unreadable values do not agree.
  """
  scores = {}
  all_right = np.ones(len(truth), bool)
  for attribute in ATTRIBUTES:
    right = np.array([
        (p[attribute] is not None and p[attribute] == t[attribute])
        if (only is None or attribute in o) else True
        for p, t, o in zip(predicted, truth, only or [None] * len(truth))])
    all_right &= right
    scores[f"{attribute}_accuracy"] = float(right.mean())
  scores["all_attributes_accuracy"] = float(all_right.mean())
  return scores


def score(task: str, tokens: np.ndarray, dataset) -> dict:
  layout, text_tok = dataset.layout, dataset.text_tokenizer
  split = dataset.eval
  truth = [_with_position(a) for a in split.attributes[:len(tokens)]]
  text_ids, codes = layout.split(tokens)
  pictures = dataset.image_tokenizer.decode(np.asarray(codes))
  images = [read_image(c) for c in smoke.cell_colours(pictures)]
  reports = [read_report(text_tok.decode(ids)) for ids in text_ids]
  if task == "report_to_image":
    return agreement(images, truth)
  if task == "image_to_report":
    return agreement(reports, truth)
  if task == "joint":
    prompts = [read_report(text_tok.decode(ids[:n])) for ids, n in
               zip(split.tokens[:len(tokens), layout.text_slice], split.prompt_length)]
    in_prompt = [{k for k, v in p.items() if v} for p in prompts]
    pair = {f"pair_{k}": v for k, v in agreement(images, reports).items()}
    kept = agreement(images, prompts, in_prompt)["all_attributes_accuracy"]
    return {**pair, "prompt_kept_in_image_accuracy": kept}
  if task == "unconditional":
    return {f"pair_{k}": v for k, v in agreement(images, reports).items()}
  raise ValueError(f"no smoke score for task {task!r}")


def score_workdir(workdir: str, dataset) -> dict:
  """Score every task under workdir/samples; write workdir/samples/scores.json and print a table."""
  results = {}
  samples_dir = os.path.join(workdir, "samples")
  for task in sorted(os.listdir(samples_dir)) if os.path.isdir(samples_dir) else []:
    tokens_path = os.path.join(samples_dir, task, "tokens.npy")
    if os.path.exists(tokens_path):
      results[task] = score(task, np.load(tokens_path), dataset)
  if not results:
    raise FileNotFoundError(f"no samples under {samples_dir}: run --mode sample first")
  with open(os.path.join(samples_dir, "scores.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("Smoke scores (fraction of generated samples; attribute checks by rule):")
  for task, scores in results.items():
    print(f"  {task}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
  return results
