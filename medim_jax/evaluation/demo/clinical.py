"""Clinical agreement on the chest demo: findings read from report text and from images, and F1.

Two readers turn either modality into the six demo findings (``iu_reports.FINDINGS``), so a
generated report or image can be scored against the finding labels of its pair:

- ``extract_findings``: rules over report text. A finding is present when one of its phrases is
  mentioned outside the scope of a negation, NegEx-style: a negation cue ("no", "without",
  "negative for", ...) negates every mention after it in the same clause, so "no pneumothorax,
  effusion or consolidation" negates all three, and the scope stops at a sentence end or a
  contrast word ("but", "however"); a few cues negate what comes just before them ("... is not
  seen", "... has resolved"). Phrases like "no change in" are not negations. The heart counts as
  enlarged only when the report says so, so "heart size is normal" is not cardiomegaly.
- ``FindingClassifier``: a small CNN with one sigmoid per finding, trained on the demo's training
  images and labels, with per-finding thresholds picked on the validation split (best F1).

``f1_table`` scores boolean predictions per finding. Convention: a finding with no true positives
in the scored set has no defined recall or F1 (reported as NaN, its false positives still counted
in ``predicted``) and is left out of the macro average; with positives but no predictions,
precision, recall and F1 are 0. ``majority_baseline`` and ``retrieval_baseline`` are the two
reference points any generator should beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from medim_jax import progress
from medim_jax.data import folders
from medim_jax.data.iu_reports import FINDINGS
from medim_jax.diffusion import loss as loss_lib
from medim_jax.evaluation import memorisation, negex

# ---------------------------------------------------------------------------------------------
# Report text -> findings.

_HEART = r"(?:heart|cardiac|cardiomediastinal)"
_ENLARGED = r"(?:enlarged|enlargement|increased|large|prominent|cardiomegaly)"
PHRASES = {
    "cardiomegaly": [
        r"cardiomegaly",
        r"cardiac enlargement",
        rf"enlarge(?:d|ment of)(?: the)? {_HEART}",
        # "The heart size is mildly enlarged"; a comma or "normal" in between breaks it ("heart
        # size normal, prominent hila").
        rf"\b{_HEART}\b(?:\s+(?!normal\b)[\w-]+){{0,5}}?\s+{_ENLARGED}\b",
    ],
    "pleural_effusion": [r"(?<!pericardial )effusions?\b", r"pleural fluid",
                         r"fluid in the (?:pleural space|fissure)"],
    "pneumothorax": [r"pneumothora(?:x|ces)"],
    # "Nodular opacity" describes an opacity's shape; a nodule is named as one.
    "nodule": [r"nodules?\b", r"\bmass(?:es)?\b"],
    "opacity": [r"opaci(?:ty|ties|fication|fied)", r"consolidat\w*", r"atelecta\w*",
                r"air\s?space (?:disease|process)", r"infiltrat\w*", r"densit(?:y|ies)\b",
                r"(?:lobe|lobar|segmental) collapse"],
    "calcified_granuloma": [r"granulom\w*", r"calcifi\w*"],
}
_PHRASES = {finding: re.compile(r"\b(?:" + "|".join(p) + ")") for finding, p in PHRASES.items()}

def mentions(report: str) -> list[tuple[str, str, bool, bool]]:
  """(finding, matched phrase, negated, hedged) for every finding phrase in the report."""
  found = []
  for clause in negex.clauses(report):
    for finding, pattern in _PHRASES.items():
      for m in pattern.finditer(clause):
        found.append((finding, m.group(), negex.negated(clause, m.end()),
                      negex.hedged(clause, m.start())))
  return found


def extract_findings(report: str, count_hedged: bool = False) -> dict[str, bool]:
  """{finding: present} for the six demo findings: mentioned at least once, not negated (and,
  unless ``count_hedged``, not only as a possibility)."""
  present = {finding: False for finding in FINDINGS}
  for finding, _, negated, hedged in mentions(report):
    present[finding] |= not negated and (count_hedged or not hedged)
  return present


def extract_matrix(reports: Sequence[str], count_hedged: bool = False,
                   findings: Sequence[str] = FINDINGS) -> np.ndarray:
  """bool [N, len(findings)], columns in ``findings`` order (each one of FINDINGS)."""
  rows = [extract_findings(r, count_hedged) for r in reports]
  return np.array([[row[f] for f in findings] for row in rows], bool).reshape(
      len(reports), len(findings))


# ---------------------------------------------------------------------------------------------
# Scores and baselines.


def f1_table(predicted, true, findings: Sequence[str] = FINDINGS) -> dict:
  """Per finding {precision, recall, f1, support, predicted, accuracy}; macro F1 over findings with
  support (see the module doc for the convention), micro F1 and the exact-match rate."""
  predicted, true = np.asarray(predicted, bool), np.asarray(true, bool)
  if predicted.shape != true.shape or predicted.ndim != 2 or predicted.shape[1] != len(findings):
    raise ValueError(f"predicted {predicted.shape} and true {true.shape} must both be "
                     f"[N, {len(findings)}]")
  table = {}
  for j, finding in enumerate(findings):
    tp = int((predicted[:, j] & true[:, j]).sum())
    n_pred, support = int(predicted[:, j].sum()), int(true[:, j].sum())
    precision = tp / n_pred if n_pred else (0.0 if support else float("nan"))
    recall = tp / support if support else float("nan")
    f1 = 2 * tp / (n_pred + support) if support else float("nan")
    table[finding] = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                      "predicted": n_pred,
                      "accuracy": float((predicted[:, j] == true[:, j]).mean()) if len(true) else
                                  float("nan")}
  scored = [table[f]["f1"] for f in findings if table[f]["support"]]
  table["macro_f1"] = float(np.mean(scored)) if scored else float("nan")
  tp, n_pred, support = int((predicted & true).sum()), int(predicted.sum()), int(true.sum())
  table["micro_f1"] = 2 * tp / (n_pred + support) if support else float("nan")
  table["exact_match"] = (float((predicted == true).all(axis=1).mean()) if len(true)
                          else float("nan"))
  return table


def format_table(table: dict, findings: Sequence[str] = FINDINGS) -> str:
  """A markdown table of ``f1_table``'s result."""
  lines = ["| finding | support | predicted | precision | recall | F1 | accuracy |",
           "|---|---|---|---|---|---|---|"]
  for f in findings:
    row = table[f]
    lines.append(f"| {f} | {row['support']} | {row['predicted']} | {row['precision']:.3f} | "
                 f"{row['recall']:.3f} | {row['f1']:.3f} | {row['accuracy']:.3f} |")
  lines.append(f"| macro F1 (findings with support) | | | | | {table['macro_f1']:.3f} | |")
  lines.append(f"| micro F1 / exact match | | | | | {table['micro_f1']:.3f} | "
               f"{table['exact_match']:.3f} |")
  return "\n".join(lines)


def auc_per_finding(probabilities, labels) -> np.ndarray:
  """Area under the ROC curve of each column: the chance that a random positive scores above a
  random negative, ties counted half; NaN where a column has no positives or no negatives."""
  probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels, bool)
  result = np.full(labels.shape[1], np.nan)
  for k in range(labels.shape[1]):
    positive, negative = probabilities[labels[:, k], k], probabilities[~labels[:, k], k]
    if len(positive) and len(negative):
      above = (positive[:, None] > negative[None]).mean()
      result[k] = above + 0.5 * (positive[:, None] == negative[None]).mean()
  return result


def majority_baseline(train_labels, n: int) -> np.ndarray:
  """bool [n, K]: the most frequent training label set (ties: the first seen), for everyone."""
  train_labels = np.asarray(train_labels, bool)
  sets, first, counts = np.unique(train_labels, axis=0, return_index=True, return_counts=True)
  best = max(range(len(sets)), key=lambda i: (counts[i], -first[i]))
  return np.tile(sets[best], (n, 1))


def retrieval_baseline(query_features, train_features, train_items=None, metric: str = "cosine"):
  """Index of each query's nearest training item (and, given ``train_items``, those items: the
  label rows or reports the baseline answers with)."""
  _, indices = memorisation.nearest_neighbours(query_features, train_features, metric)
  if train_items is None:
    return indices
  if isinstance(train_items, np.ndarray):
    return indices, train_items[indices]
  return indices, [train_items[i] for i in indices]


# ---------------------------------------------------------------------------------------------
# Images -> findings.


class FindingCNN(nnx.Module):
  """Stride-2 3x3 convolutions (64 px -> a 4x4 map with four of them), mean- and max-pooled into one
  logit per finding (max pooling so one small spot is not averaged away)."""

  def __init__(self, channels: Sequence[int], num_findings: int, *, rngs: nnx.Rngs):
    widths = [3, *channels]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs)
                           for a, b in zip(widths[:-1], widths[1:])])
    self.norms = nnx.List([nnx.GroupNorm(b, num_groups=min(8, b), rngs=rngs) for b in channels])
    self.head = nnx.Linear(2 * channels[-1], num_findings, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.gelu(norm(conv(x)))
    return self.head(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1))


def standardise(images) -> jax.Array:
  """uint8 [N, H, W, C] -> float32 with zero mean and unit variance per image: exposure and gamma
  vary from film to film, findings are local contrast."""
  x = jnp.asarray(images, jnp.float32)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) / (x.std(axis=(1, 2, 3), keepdims=True) + 1.0)


@dataclasses.dataclass(eq=False)
class FindingClassifier:
  """A trained ``FindingCNN`` with its decision thresholds (one per finding)."""
  channels: tuple[int, ...]
  params: dict
  thresholds: np.ndarray                      # float [K]; predict p >= threshold
  findings: tuple[str, ...] = FINDINGS

  def __post_init__(self):
    abstract = nnx.eval_shape(lambda: FindingCNN(self.channels, len(self.findings),
                                                 rngs=nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)
    self._logits = jax.jit(lambda params, x: nnx.merge(self.graphdef, params)(standardise(x)))

  def predict(self, images, batch_size: int = 256) -> np.ndarray:
    """float32 [N, K] probabilities for uint8 images [N, H, W, 3]."""
    out = [np.asarray(jax.nn.sigmoid(self._logits(self.params, images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(self.findings)), np.float32)

  def predict_labels(self, images) -> np.ndarray:
    """bool [N, K]: probabilities at or above each finding's threshold."""
    return self.predict(images) >= self.thresholds[None]

  def calibrate(self, images, labels) -> np.ndarray:
    """Sets each finding's threshold to the best-F1 one on (images, labels); returns them."""
    self.thresholds = best_f1_thresholds(self.predict(images), labels)
    return self.thresholds

  def save(self, path: str) -> None:
    flat = {"params/" + "/".join(map(str, k)): np.asarray(v)
            for k, v in traverse_util.flatten_dict(self.params).items()}
    np.savez(path, **flat, thresholds=np.asarray(self.thresholds, np.float32),
             channels=np.asarray(self.channels, np.int64), findings=np.asarray(self.findings))

  @classmethod
  def load(cls, path: str) -> "FindingClassifier":
    with np.load(path) as data:
      channels = tuple(int(c) for c in data["channels"])
      findings = tuple(str(f) for f in data["findings"])
      flat = {k[len("params/"):]: data[k] for k in data.files if k.startswith("params/")}
      thresholds = data["thresholds"]
    abstract = nnx.eval_shape(lambda: FindingCNN(channels, len(findings), rngs=nnx.Rngs(0)))
    # The abstract model's keys (ints for list entries) name what to read.
    template = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    missing = {"/".join(map(str, k)) for k in template} - set(flat)
    if missing:
      raise ValueError(f"{path}: classifier weights missing {sorted(missing)[:3]}")
    params = traverse_util.unflatten_dict(
        {k: jnp.asarray(flat["/".join(map(str, k))]) for k in template})
    return cls(channels, params, thresholds, findings)


def best_f1_thresholds(probabilities, labels, default: float = 0.5) -> np.ndarray:
  """Per finding, the threshold with the best F1 on these examples: halfway between the lowest
  probability it accepts and the next one below (a margin for unseen data). A finding without
  positives here keeps ``default``."""
  probabilities, labels = np.asarray(probabilities), np.asarray(labels, bool)
  thresholds = np.full(probabilities.shape[1], default, np.float32)
  for j in range(probabilities.shape[1]):
    positives = int(labels[:, j].sum())
    if not positives:
      continue
    order = np.argsort(-probabilities[:, j], kind="stable")
    p, hits = probabilities[order, j], labels[order, j]
    tp = np.cumsum(hits)
    f1 = 2 * tp / (np.arange(1, len(p) + 1) + positives)
    # Only cut between distinct probabilities.
    cut = np.append(p[1:] < p[:-1], True)
    best = int(np.argmax(np.where(cut, f1, -1.0)))
    below = p[best + 1] if best + 1 < len(p) else 0.0
    thresholds[j] = (p[best] + below) / 2.0
  return thresholds


def train_finding_classifier(images, labels, *, steps: int = 600, seed: int = 0,
                             batch_size: int = 64, channels: Sequence[int] = (16, 32, 64, 64),
                             learning_rate: float = 3e-3, max_positive_weight: float = 20.0,
                             findings: Sequence[str] = FINDINGS, val_images=None, val_labels=None,
                             progress_bar: bool = True) -> FindingClassifier:
  """Trains a ``FindingCNN`` on uint8 images [N, H, W, 3] and bool labels [N, K].

  Most images have no finding, so each finding's positives weigh ``n_negative / n_positive`` in
  the loss (capped at ``max_positive_weight``). Batches depend only on (seed, step), so a seed
  gives the same classifier every time. Thresholds are picked on (val_images, val_labels) when
  given, else left at 0.5 (``calibrate`` later).
  """
  images, labels = np.asarray(images), np.asarray(labels, bool)
  if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images), len(findings)):
    raise ValueError(f"images must be uint8 [N, H, W, C] with one label row of {len(findings)} "
                     f"findings each; got {images.dtype} {images.shape} and labels {labels.shape}")
  positive_weight = jnp.asarray(loss_lib.positive_weights(labels, max_positive_weight))
  model = FindingCNN(tuple(channels), labels.shape[1], rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, 0.05), weight_decay=1e-4)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(standardise(x))
    return loss_lib.weighted_bce(logits, y, positive_weight).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bar = progress.bar(steps, "finding classifier", "step", enabled=progress_bar)
  for step in range(steps):
    rows = np.random.default_rng([seed, step]).integers(0, len(images), batch_size)
    params, opt_state, loss = train_step(params, opt_state, images[rows],
                                         labels[rows].astype(np.float32))
    if step % 50 == 0 or step == steps - 1:
      bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.update(1)
  bar.close()
  classifier = FindingClassifier(tuple(channels), params,
                                 np.full(len(findings), 0.5, np.float32), tuple(findings))
  if val_images is not None:
    classifier.calibrate(val_images, val_labels)
  return classifier


def load_demo_chest(chest_dir: str, split: str, image_size: int = 64):
  """(images uint8 [N, S, S, 3], labels bool [N, 6], reports, names) of one split of the demo's
  chest part, labels from its ``labels.jsonl``."""
  with open(os.path.join(chest_dir, "labels.jsonl")) as f:
    truth = {row["name"]: row["labels"] for row in map(json.loads, f)}
  data = folders.load(os.path.join(chest_dir, split), image_size, "pad", "skip")
  labels = np.array([[truth[name][finding] for finding in FINDINGS] for name in data.names], bool)
  return data.images, labels.reshape(len(data), len(FINDINGS)), data.texts, data.names


def main(argv=None) -> None:
  """Measures both readers on the built demo: the extractor against the MeSH labels of the
  training reports, the classifier (trained on train, thresholds on val; or loaded) on the test
  images, and with --tokenizers the classifier's AUC on their reconstructions of the films."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("chest_dir",
                      help="the demo's chest folder (train/, val/, test/, labels.jsonl)")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--save", default="", help="write the classifier here (.npz)")
  parser.add_argument("--load", default="", help="use this saved classifier instead of training one "
                      "(e.g. WORKDIR/eval/finding_classifier_chest.npz)")
  parser.add_argument("--tokenizers", nargs="*", default=[],
                      help="saved image tokenizers (.npz): also read their reconstructions")
  args = parser.parse_args(argv)
  train, val, test = (load_demo_chest(args.chest_dir, s) for s in ("train", "val", "test"))
  print("Report extractor vs MeSH labels, train reports:")
  print(format_table(f1_table(extract_matrix(train[2]), train[1])))
  if args.load:
    classifier = FindingClassifier.load(args.load)
    print(f"\nImage classifier {args.load}, test images:")
  else:
    start = time.time()
    classifier = train_finding_classifier(train[0], train[1], steps=args.steps, seed=args.seed,
                                          val_images=val[0], val_labels=val[1])
    print(f"\nImage classifier, {args.steps} steps in {time.time() - start:.0f} s (thresholds on "
          f"val included), test images:")
  print(format_table(f1_table(classifier.predict_labels(test[0]), test[1])))
  print("\nMajority baseline (most frequent training label set), test:")
  print(format_table(f1_table(majority_baseline(train[1], len(test[1])), test[1])))
  if args.save:
    classifier.save(args.save)
  if args.tokenizers:
    print_reader_on_reconstructions(classifier, args.tokenizers, {
        "train": (train[0], train[1]),
        "val + test": (np.concatenate([val[0], test[0]]), np.concatenate([val[1], test[1]]))})


def print_reader_on_reconstructions(classifier, tokenizer_paths, splits) -> None:
  """Does the image reader still see the findings after encode -> decode? Its AUC per finding on
  the real images and on each tokenizer's reconstructions of them."""
  from medim_jax.tokenizers import image as image_tokenizers
  tokenizers = {path: image_tokenizers.load_image_tokenizer(path) for path in tokenizer_paths}
  for split, (images, labels) in splits.items():
    print(f"\nImage classifier AUC, {split} ({len(images)} images; positives "
          + ", ".join(f"{f} {n}" for f, n in zip(FINDINGS, labels.sum(axis=0))) + "):")
    print("  " + " ".join(f"{f[:12]:>12s}" for f in FINDINGS) + "  images")
    readings = {"real": images, **{path: t.decode(t.encode(images)) for path, t in tokenizers.items()}}
    for name, shown in readings.items():
      aucs = auc_per_finding(classifier.predict(shown), labels)
      print("  " + " ".join(f"{a:12.3f}" for a in aucs) + f"  {name}")


if __name__ == "__main__":
  main()
