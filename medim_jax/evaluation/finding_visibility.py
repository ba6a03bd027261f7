"""How much of a finding's contrast survives an image tokenizer (encode -> decode).

The demo renders the same patient, pose and film with and without one finding; the finding's signal
is their difference. Passing both through the tokenizer, the retained fraction is the projection of
the reconstructed difference onto the original one, ``<d_rec, d> / <d, d>``: 1 when the tokenizer
keeps the finding exactly, 0 when it erases it (negative: it inverts it). A radiologist's question
"is the effusion still there after tokenization?" as a number per finding.
"""

from __future__ import annotations

import numpy as np

from medim_jax.data import demo_chest
from medim_jax.data.iu_reports import FINDINGS, Finding

# One representative MeSH term per finding, at moderate size, side and zone left to chance.
TERMS = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
         "pneumothorax": "Pneumothorax", "nodule": "Nodule", "opacity": "Consolidation",
         "calcified_granuloma": "Calcified Granuloma"}


def paired_renders(phantom, kind: str, count: int, image_size: int, seed: int):
  """(with, without) uint8 image batches of ``count`` poses."""
  with_finding, without = [], []
  finding = Finding(kind, TERMS[kind], None, None, "moderate", False)
  for i in range(count):
    key = [seed, FINDINGS.index(kind), i]
    with_finding.append(demo_chest.render(phantom, [finding], image_size, np.random.default_rng(key),
                                          pose_rng=np.random.default_rng(key + [1])))
    without.append(demo_chest.render(phantom, [], image_size, np.random.default_rng(key),
                                     pose_rng=np.random.default_rng(key + [1])))
  return np.stack(with_finding), np.stack(without)


def retained_fraction(tokenizer, with_finding, without) -> float:
  """Mean over pairs of <d_rec, d> / <d, d> (pairs whose finding left no trace are skipped)."""
  original = with_finding.astype(np.float64) - without.astype(np.float64)
  recon = (tokenizer.decode(tokenizer.encode(with_finding)).astype(np.float64)
           - tokenizer.decode(tokenizer.encode(without)).astype(np.float64))
  energy = (original ** 2).sum(axis=(1, 2, 3))
  visible = energy > 0
  if not visible.any():
    return float("nan")
  return float(((recon * original).sum(axis=(1, 2, 3))[visible] / energy[visible]).mean())


def finding_visibility(tokenizer, image_size: int, count: int = 16, seed: int = 0,
                       phantom=None) -> dict[str, float]:
  phantom = phantom or demo_chest.ChestPhantom.from_ct(*demo_chest.ct_paths())
  return {kind: retained_fraction(tokenizer, *paired_renders(phantom, kind, count, image_size, seed))
          for kind in FINDINGS}
