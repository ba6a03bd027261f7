"""What evaluation compares generations with: the original images, reports and finding labels.

Shards hold tokens; the tokenizers' reconstructions are not the truth. Every shard set has an
``index.jsonl`` mapping example ids to (dataset, split, file name), and its manifest names the
folders, so the original image and report of any example can be read back. Finding labels come from
a ``labels.jsonl`` beside a dataset's split folders (medim-demo writes one for its chest part; your
own folders can have one too: one ``{"name": ..., "labels": {finding: bool}}`` per line).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from medim_jax.data import folders

LABELS_FILE = "labels.jsonl"


@dataclasses.dataclass
class Reference:
  """Originals of some examples of one dataset, with finding labels where the data has them."""
  names: list[str]
  images: np.ndarray                 # (N, S, S, 3) uint8
  reports: list[str]
  labels: np.ndarray | None          # (N, F) bool, columns in ``findings`` order
  findings: tuple[str, ...]


def read_index(shards_dir: str) -> dict[int, dict]:
  path = os.path.join(shards_dir, "index.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: re-run --mode tokenize (evaluation needs it to "
                            "find the original images and reports)")
  with open(path) as f:
    return {entry["example_id"]: entry for entry in map(json.loads, f)}


def read_labels(split_folder: str) -> dict[str, dict[str, bool]] | None:
  """Labels of a dataset (from ``labels.jsonl`` beside or inside its split folders), by name."""
  for folder in (split_folder, os.path.dirname(os.path.normpath(split_folder))):
    path = os.path.join(folder, LABELS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        return {entry["name"]: entry["labels"] for entry in map(json.loads, f)}
  return None


def load_examples(manifest: dict, index: dict[int, dict], example_ids, image_size: int,
                  square: str, dicom_window: tuple[float, float] | None = None) -> Reference:
  """The original image, report and labels of each example id (all of one dataset)."""
  entries = [index[int(i)] for i in example_ids]
  datasets = {e["dataset"] for e in entries}
  if len(datasets) != 1:
    raise ValueError(f"load_examples takes the examples of one dataset, got {sorted(datasets)}")
  dataset_folders = manifest["datasets"][entries[0]["dataset"]]["folders"]
  pairs = []
  for entry in entries:
    # A val split carved from train has its files in the train folder.
    candidates = [dataset_folders.get(entry["split"], ""), dataset_folders.get("train", "")]
    pairs.append(_find_pair(entry["name"], [c for c in candidates if c]))
  data = folders.load_pairs(pairs, image_size, square, on_bad_pair="error", dicom_window=dicom_window)
  return _with_labels(data, [os.path.dirname(image) for _, image, _ in pairs])


def load_split(folder: str, image_size: int, square: str,
               dicom_window: tuple[float, float] | None = None) -> Reference:
  """Every pair of a split folder (e.g. a dataset's training set, for nearest-neighbour checks)."""
  data = folders.load(folder, image_size, square, dicom_window=dicom_window)
  return _with_labels(data, [folder] * len(data))


def _find_pair(name: str, candidates: list[str]) -> tuple[str, str, str]:
  for folder in candidates:
    text = os.path.join(folder, name + ".txt")
    for ext in folders.IMAGE_EXTENSIONS:
      for image in (os.path.join(folder, name + ext), os.path.join(folder, name + ext.upper())):
        if os.path.exists(image) and os.path.exists(text):
          return name, image, text
  raise FileNotFoundError(f"the original files of example {name!r} are not in {candidates}: the "
                          "data folders changed since tokenizing; re-run --mode tokenize")


def _with_labels(data: folders.FolderData, label_folders: list[str]) -> Reference:
  """``label_folders[i]`` is the split folder whose labels.jsonl (in it or beside it) labels pair i."""
  labels_of = {folder: read_labels(folder) for folder in dict.fromkeys(label_folders)}
  present = [found for found in labels_of.values() if found]
  if not present:
    return Reference(names=list(data.names), images=data.images, reports=list(data.texts),
                     labels=None, findings=())
  findings = tuple(next(iter(present[0].values())).keys())
  missing = [(n, f) for n, f in zip(data.names, label_folders) if n not in (labels_of[f] or {})]
  if missing:
    raise ValueError(f"{LABELS_FILE} in or beside {missing[0][1]} has no labels for "
                     f"{missing[0][0]!r} ({len(missing)} examples without labels in all)")
  labels = np.array([[bool(labels_of[f][n][k]) for k in findings]
                     for n, f in zip(data.names, label_folders)])
  return Reference(names=list(data.names), images=data.images, reports=list(data.texts),
                   labels=labels, findings=findings)
