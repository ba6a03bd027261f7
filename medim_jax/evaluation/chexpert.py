"""Rule-based CheXpert-14 labels of report text, and clinical efficacy (CE) metrics.

The 14 CheXpert observations, each labelled per report as 1 (positive), 0 (negative), -1
(uncertain) or None (not mentioned), in the spirit of the CheXpert labeler (Irvin et al., 2019):
its mention phrases (the labeler's public phrase lists, as regular expressions), NegEx-style
negation scopes (``negex``; "normal" and "unremarkable" also negate), and uncertainty cues anywhere
in a mention's clause ("possible", "cannot be excluded", ...). A report that mentions an
observation several times gets, as in the labeler: negative + uncertain -> uncertain, positive +
anything -> positive. No Finding is 1 when no other observation but Support Devices is positive or
uncertain. This is not the labeler itself (no dependency parse): results are labelled
"rule-based CheXpert-14" wherever they are reported.

CE metrics compare the labels of generated reports with those of the reference reports: an
observation counts as present when it is 1 (``uncertain="negative"``, the usual report-generation
convention) or 1 or -1 (``uncertain="positive"``); precision, recall and F1 per observation,
micro (pooled counts) and macro (mean over the observations with reference positives).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from medim_jax.evaluation import negex

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion",
                "Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")

_ABNORMAL_SIZE = re.compile(r"\b(?:enlarg\w*|widen\w*|increased|large|prominen\w*)")
# A structure named alone ("the heart", "the mediastinum") is a mention only when the clause says
# it is abnormal (positive) or normal (negative): "heart size is stable" says neither.
STRUCTURES = {
    "Cardiomegaly": r"\bheart\b|cardiac (?:size|silhouette|shadow|contour)",
    "Enlarged Cardiomediastinum": r"cardiomediastin\w*|mediastin\w*|hila\b|hilar contours?",
}
PHRASES = {
    "Cardiomegaly": r"cardiomegaly|cardiac enlargement|enlarged heart",
    "Lung Lesion": r"mass(?:es)?\b|nodul\w*|lump|cavitary lesion|carcinoma|neoplasm|tumou?r",
    "Lung Opacity": (r"opaci\w*|decreased translucency|increased density|air[\s-]?space disease|"
                     r"infiltrat\w*|interstitial (?:marking|pattern|lung)\w*|reticular (?:pattern|"
                     r"marking)s?|reticulation|parenchymal scarring|peribronchial thickening|"
                     r"wall thickening|scar(?:s|ring)?\b"),
    "Edema": (r"edema|oedema|heart failure|\bchf\b|vascular congestion|pulmonary congestion|"
              r"indistinctness|vascular prominence"),
    "Consolidation": r"consolidat\w*",
    "Pneumonia": r"pneumonia|infection|infectious(?: process)?",
    "Atelectasis": r"atelecta\w*|collapse",
    "Pneumothorax": r"pneumothora(?:x|ces)",
    "Pleural Effusion": r"(?<!pericardial )effusions?\b|pleural fluid",
    "Pleural Other": (r"pleural thickening|fibrosis|fibrothorax|pleural scar|"
                      r"pleur\w*[\s-]?parenchymal scar|pleuro-pericardial scar"),
    "Fracture": r"fractur\w*",
    "Support Devices": (r"pacer|\blines?\b|picc|\btubes?\b|valve|catheter|pacemaker|hardware|"
                        r"arthroplast\w*|\bicd\b|defib\w*|devices?\b|\bdrains?\b|\bplates?\b|"
                        r"screws?\b|cannula|apparatus|\bcoils?\b|mediport|sternotomy wires?"),
}
# Calcified nodules and granulomas are old, benign findings the labeler leaves out of Lung Lesion.
NOT_A_LESION = re.compile(r"calcified nodul\w*|massive|granulom\w*")
# "Normal" and "unremarkable" negate ("heart size is normal", "unremarkable mediastinum").
NORMAL = re.compile(r"\b(?:normal|unremarkable|within normal limits|top normal)\b")
# "Cannot be excluded" and the like: negex.clauses drops them (they are not negations), so they are
# replaced by this mark first, which UNCERTAIN counts.
_UNCERTAIN_MARK = "uncertaincue"
_KEEP = re.compile(r"cannot (?:be )?(?:excluded|exclude|ruled out)|not (?:be )?excluded|"
                   r"can not be excluded")
# Cues of uncertainty anywhere in the clause, before or after the mention.
UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|probabl[ey]|likely|may|might|could|questionable|suspect\w*|"
    r"suggest\w*|concern\w*|versus|vs|differential|borderline|equivocal|indeterminate|"
    rf"consider\w*|represent\w*|worrisome|evaluate for|to exclude|{_UNCERTAIN_MARK})\b|\?")

_PATTERNS = {name: re.compile(rf"\b(?:{pattern})") for name, pattern in PHRASES.items()}
_STRUCTURES = {name: re.compile(rf"\b(?:{pattern})") for name, pattern in STRUCTURES.items()}


def _near(pattern: re.Pattern, clause: str, start: int, end: int, before: int | None = 30,
          after: int = 30) -> bool:
  """Whether ``pattern`` occurs within ``before`` / ``after`` characters of the mention (None:
  anywhere before it in the clause)."""
  left = 0 if before is None else max(0, start - before)
  return bool(pattern.search(clause[left:start])) or bool(pattern.search(clause[end:end + after]))


def _clause_label(clause: str, start: int, end: int) -> int:
  if negex.negated(clause, end) or _near(NORMAL, clause, start, end, after=60):
    return 0
  if _near(UNCERTAIN, clause, start, end, before=None):
    return -1
  return 1


def mentions(report: str) -> list[tuple[str, str, int]]:
  """(observation, matched phrase, label 1 / 0 / -1) for every mention in the report."""
  found = []
  for clause in negex.clauses(_KEEP.sub(f" {_UNCERTAIN_MARK} ", report.lower())):
    for name, pattern in _PATTERNS.items():
      for m in pattern.finditer(clause):
        if name == "Lung Lesion" and NOT_A_LESION.match(clause, m.start()):
          continue
        found.append((name, m.group(), _clause_label(clause, m.start(), m.end())))
    for name, pattern in _STRUCTURES.items():
      for m in pattern.finditer(clause):
        label = _clause_label(clause, m.start(), m.end())
        if label == 0 or _near(_ABNORMAL_SIZE, clause, m.start(), m.end(), 40, 40):
          found.append((name, m.group(), label))
  return found


def label_report(report: str) -> dict[str, int | None]:
  """{observation: 1, 0, -1 or None} for the 14 observations."""
  seen: dict[str, set] = {}
  for name, _, label in mentions(report):
    seen.setdefault(name, set()).add(label)
  labels = {}
  for name in OBSERVATIONS[1:]:
    found = seen.get(name)
    labels[name] = (None if not found else 1 if 1 in found else -1 if -1 in found else 0)
  finding = any(labels[n] in (1, -1) for n in OBSERVATIONS[1:] if n != "Support Devices")
  labels["No Finding"] = None if finding else 1
  return {name: labels[name] for name in OBSERVATIONS}


def label_matrix(reports: Sequence[str]) -> np.ndarray:
  """(N, 14) float: 1, 0, -1, or NaN where not mentioned."""
  return np.array([[np.nan if v is None else v for v in label_report(r).values()]
                   for r in reports], np.float64).reshape(len(reports), len(OBSERVATIONS))


def present(labels: np.ndarray, uncertain: str = "negative") -> np.ndarray:
  if uncertain not in ("negative", "positive"):
    raise ValueError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
  labels = np.asarray(labels, np.float64)
  return (labels == 1) | ((labels == -1) if uncertain == "positive" else False)


def ce_metrics(generated_labels, reference_labels, uncertain: str = "negative") -> dict:
  """Clinical efficacy of generated reports against reference reports (both (N, 14) labels)."""
  predicted, true = present(generated_labels, uncertain), present(reference_labels, uncertain)
  tp = (predicted & true).sum(0)
  fp = (predicted & ~true).sum(0)
  fn = (~predicted & true).sum(0)
  divide = lambda a, b: float(a / b) if b else 0.0
  table = {}
  for k, name in enumerate(OBSERVATIONS):
    p, r = divide(tp[k], tp[k] + fp[k]), divide(tp[k], tp[k] + fn[k])
    table[name] = {"precision": p, "recall": r, "f1": divide(2 * p * r, p + r),
                   "support": int(true[:, k].sum())}
  p, r = divide(tp.sum(), tp.sum() + fp.sum()), divide(tp.sum(), tp.sum() + fn.sum())
  table["micro"] = {"precision": p, "recall": r, "f1": divide(2 * p * r, p + r)}
  scored = [table[n] for n in OBSERVATIONS if table[n]["support"]]
  table["macro"] = {k: float(np.mean([t[k] for t in scored])) if scored else float("nan")
                    for k in ("precision", "recall", "f1")}
  return table
