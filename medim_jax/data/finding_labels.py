"""Per-example finding labels for the auxiliary finding loss (config.model.finding_names).

The shards hold tokens only; the labels stay in each dataset's ``labels.jsonl`` (beside its split
folders, as medim-demo and ``data.name=folders`` write them). They are looked up on the host by a
batch's example ids and added to it as

  finding_labels (B, K) float32   1 where the example has finding k
  finding_known  (B,)   bool      the example's dataset labels all K findings

so that examples of unlabelled datasets (medim-demo's pathology part) train no finding logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medim_jax import errors


@dataclasses.dataclass(frozen=True)
class FindingLabels:
  names: tuple[str, ...]
  labels: np.ndarray           # (num_example_ids, K) float32
  known: np.ndarray            # (num_example_ids,) bool
  positive_weight: np.ndarray  # (K,) float32: weighs the positive term of each finding's loss

  @classmethod
  def from_shards(cls, shards_dir: str, manifest: dict, names, max_positive_weight: float = 20.0
                  ) -> "FindingLabels":
    """Labels of every example in ``shards_dir``; ``positive_weight`` from the training split's
    counts (negatives / positives, capped), as the finding classifier weighs them."""
    from medim_jax.evaluation import ground_truth
    names = tuple(names)
    index = ground_truth.read_index(shards_dir)
    labels = np.zeros((max(index, default=-1) + 1, len(names)), np.float32)
    known = np.zeros(len(labels), bool)
    by_folder = {}
    for example_id, entry in index.items():
      folders = manifest["datasets"][entry["dataset"]].get("folders", {})
      folder = folders.get(entry["split"]) or folders.get("train", "")  # a val split carved from train
      if folder not in by_folder:
        by_folder[folder] = ground_truth.read_labels(folder) if folder else None
      row = (by_folder[folder] or {}).get(entry["name"])
      if row is not None and all(name in row for name in names):
        labels[example_id] = [float(bool(row[name])) for name in names]
        known[example_id] = True
    in_train = np.zeros(len(labels), bool)
    in_train[[i for i, e in index.items() if e["split"] == "train"]] = True
    train_rows = known & in_train
    if not train_rows.any():
      raise errors.InputError(
          f"config.model.finding_names asks for {', '.join(names)}, but no training example in "
          f"{shards_dir} has all of them in its dataset's labels.jsonl (datasets: "
          f"{', '.join(sorted(manifest['datasets']))}): name findings the labels have, or leave "
          "finding_names empty")
    from medim_jax.diffusion import loss as loss_lib
    positive_weight = loss_lib.positive_weights(labels[train_rows], max_positive_weight)
    return cls(names, labels, known, positive_weight)

  def __call__(self, batch: dict) -> dict:
    """The batch with ``finding_labels`` and ``finding_known`` added."""
    ids = np.asarray(batch["example_id"])
    inside = (ids >= 0) & (ids < len(self.labels))
    safe = np.where(inside, ids, 0)
    labels = np.where(inside[:, None], self.labels[safe], 0.0).astype(np.float32)
    return {**batch, "finding_labels": labels, "finding_known": inside & self.known[safe]}
