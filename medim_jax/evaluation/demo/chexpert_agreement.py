"""Does the rule-based CheXpert-14 labeler (evaluation/chexpert.py) read medim-demo's real reports
as the demo's own labels do? For the findings both name, its labels of the chest reports against the
demo's finding labels (IU's MeSH tags, ``labels.jsonl``) and against the demo's report extractor
(clinical.py), as F1 tables with the second as the truth.

``python -m medim_jax.evaluation.demo.chexpert_agreement CHEST_DIR [--split train]``
(CHEST_DIR: the built demo's chest folder, e.g. .cache/medim-demo/medim-demo-64px-*/chest)
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from medim_jax.data import folders
from medim_jax.evaluation import chexpert, ground_truth
from medim_jax.evaluation.demo import clinical

# medim-demo finding -> the CheXpert observation that covers it. Calcified granuloma has none: the
# labeler's Lung Lesion leaves calcified nodules and granulomas out, as the CheXpert labeler does.
OVERLAP = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion",
           "pneumothorax": "Pneumothorax", "nodule": "Lung Lesion", "opacity": "Lung Opacity"}


def labeler_findings(reports, uncertain: str = "negative") -> np.ndarray:
  """(N, len(OVERLAP)) bool: the labeler's reading of each report, in OVERLAP's order."""
  present = chexpert.present(chexpert.label_matrix(reports), uncertain)
  columns = [chexpert.OBSERVATIONS.index(observation) for observation in OVERLAP.values()]
  return present[:, columns]


def agreement_tables(reports, labels: np.ndarray) -> dict[str, dict]:
  """F1 tables of the labeler (uncertain as negative and as positive) against ``labels`` (N, 6 in
  clinical.FINDINGS order) and against the extractor, over the OVERLAP findings."""
  findings = tuple(OVERLAP)
  columns = [clinical.FINDINGS.index(f) for f in findings]
  extracted = clinical.extract_matrix(reports, findings=findings)
  truth = np.asarray(labels, bool)[:, columns]
  tables = {}
  for uncertain in ("negative", "positive"):
    labeled = labeler_findings(reports, uncertain)
    tables[f"labeler (uncertain {uncertain}) vs demo labels"] = clinical.f1_table(labeled, truth, findings)
    tables[f"labeler (uncertain {uncertain}) vs extractor"] = clinical.f1_table(labeled, extracted, findings)
  tables["extractor vs demo labels"] = clinical.f1_table(extracted, truth, findings)
  return tables


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m medim_jax.evaluation.demo.chexpert_agreement",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("chest_dir", help="the demo's chest folder (train/, val/, test/, labels.jsonl)")
  parser.add_argument("--split", default="train", choices=("train", "val", "test"))
  args = parser.parse_args(argv)
  split_folder = os.path.join(args.chest_dir, args.split)
  truth = ground_truth.read_labels(split_folder)
  if truth is None:
    raise SystemExit(f"error: no {ground_truth.LABELS_FILE} in or beside {split_folder}")
  pairs, _ = folders.scan(split_folder)
  names = [name for name, _, _ in pairs]
  reports = [folders.read_text(text_path) for _, _, text_path in pairs]
  labels = np.array([[truth[n][f] for f in clinical.FINDINGS] for n in names], bool)
  print(f"{len(reports)} {args.split} reports of {args.chest_dir}")
  for title, table in agreement_tables(reports, labels).items():
    print(f"\n{title}:")
    print(clinical.format_table(table, tuple(OVERLAP)))


if __name__ == "__main__":
  main()
