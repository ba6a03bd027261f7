"""Does a checkpoint read the findings in the image when it writes a report? Measured on the
validation split of a labelled dataset (medim-demo's chest part), each as an AUC per finding:

* ``tokens``: what the image tokens carry. The finding classifier (clinical.py) trained on the
  image tokenizer's reconstructions of the training images and scored on the validation
  reconstructions, next to the same classifier trained and scored on the real images.
* ``model``: what the model reads. With the whole report masked (t = 1) one forward pass per
  validation image gives a distribution at every report position; each training report is scored
  by the summed log-probability of its tokens under it, and an image's reading score for a finding
  is the mean score of the training reports with the finding minus that of the reports without.
  Its AUC is 0.5 when the image does not move the model's reports towards that finding.
* ``model-ranked retrieval``: the same scores used as a decoder. Each image gets the training
  report it raises most, the highest log p(report | image) - log p(report) (the second term from one
  more pass with the image masked too), and that report's findings by the rule extractor; macro F1
  beside the ``retrieval baseline`` (the nearest training image's report, as in evaluation). No
  sampling, so no sampling noise: what the model's reading is worth as reports.
* ``finding head`` (a model with config.model.finding_names): the finding head's logits, report
  fully masked and image given, averaged over the report positions: what the auxiliary finding loss
  taught the report positions to see.
* ``transformer on labels`` (with ``label_steps`` > 0): the same architecture, freshly initialised
  as the config says, trained on the labels directly: the logits of text ids 0..K-1 at the first
  report position (report masked, image given) as K finding logits, the classifier's weighted
  binary cross-entropy, the optimizer of config.train. Whether this architecture can learn to read
  the findings from these tokens at all in that many steps, with a far stronger signal than the
  generative loss gives it.

A model whose image->report findings are no better than guessing while ``tokens`` is high has not
learned to read the image (not: the tokenizer lost the finding).

``python -m medim_jax.evaluation.demo.reading_probe --config configs/demo.py --workdir WORKDIR [--split test] [--label_steps 700]``
"""

from __future__ import annotations

import numpy as np


def report_scores(text_log_probs, candidate_texts) -> np.ndarray:
  """(N, M): sum over positions l of ``text_log_probs[n, l, candidate_texts[m, l]]``.

  text_log_probs (N, T, V) per image, candidate_texts (M, T) token ids of the candidate reports."""
  text_log_probs, candidate_texts = np.asarray(text_log_probs), np.asarray(candidate_texts)
  positions = np.arange(candidate_texts.shape[1])[None, :]
  return np.stack([lp[positions, candidate_texts].sum(axis=1) for lp in text_log_probs])


def finding_reading_scores(scores, candidate_labels) -> np.ndarray:
  """(N, K): per image, mean score of the candidates with each finding minus those without
  (NaN for a finding that all or none of the candidates have)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(candidate_labels, bool)
  result = np.full((scores.shape[0], labels.shape[1]), np.nan)
  for k in range(labels.shape[1]):
    if 0 < labels[:, k].sum() < len(labels):
      result[:, k] = scores[:, labels[:, k]].mean(axis=1) - scores[:, ~labels[:, k]].mean(axis=1)
  return result


def ranked_retrieval(scores, unconditional_scores) -> np.ndarray:
  """(N,) index of the candidate each image raises most: argmax over m of ``scores[n, m] -
  unconditional_scores[m]``, the pointwise mutual information log p(r | image) - log p(r) under
  the model. The conditional score alone prefers the shortest, most common reports, whatever the
  image."""
  pmi = np.asarray(scores, np.float64) - np.asarray(unconditional_scores, np.float64)[None]
  return pmi.argmax(axis=1)


def masked_report_scores(trainer, params, inputs, candidate_texts, batch_size: int = 64) -> np.ndarray:
  """(N, M) ``report_scores`` of the candidate reports for the token rows ``inputs`` (report fully
  masked, image given), a batch at a time so that no (N, T, V) array is held."""
  import jax
  import jax.numpy as jnp

  from medim_jax.diffusion import loss as loss_lib
  layout = trainer.layout
  apply = jax.jit(lambda p, x, s: loss_lib.subs_log_probs(trainer.model.apply(p, x, s), layout))
  sigma = np.full((batch_size,), float(trainer.schedule.sigma(jnp.float32(1.0))), np.float32)
  out = []
  with jax.set_mesh(trainer.mesh):
    for start in range(0, len(inputs), batch_size):
      rows = inputs[start:start + batch_size]
      log_probs = apply(params, jnp.asarray(rows), jnp.asarray(sigma[:len(rows)]))
      out.append(report_scores(np.asarray(log_probs[:, layout.text_slice]), candidate_texts))
  return np.concatenate(out)


def finding_head_scores(trainer, params, inputs, batch_size: int = 64) -> np.ndarray:
  """(N, K): the finding head's logits averaged over the report positions of ``inputs`` (report
  fully masked, image given), for a model with config.model.finding_names."""
  import jax
  import jax.numpy as jnp
  text = trainer.layout.text_slice
  sigma = float(trainer.schedule.sigma(jnp.float32(1.0)))
  head = jax.jit(lambda p, x: trainer.model.apply_with_findings(
      p, x, jnp.full((x.shape[0],), sigma, jnp.float32))[1][:, text].mean(axis=1))
  with jax.set_mesh(trainer.mesh):
    return np.concatenate([np.asarray(head(params, jnp.asarray(inputs[i:i + batch_size])))
                           for i in range(0, len(inputs), batch_size)])


def train_on_labels(trainer, image_tokenizer, inputs, labels, val_inputs, steps: int, seed: int = 0,
                    batch_size: int = 32, max_positive_weight: float = 20.0) -> np.ndarray:
  """A fresh model of ``trainer``'s config trained as a finding classifier on token rows ``inputs``
  (report masked) and bool ``labels`` (N, K); returns its (M, K) logits on ``val_inputs``."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax

  from medim_jax import progress
  from medim_jax.diffusion import loss as loss_lib
  from medim_jax.training.optimizer import make_optimizer
  labels = np.asarray(labels, np.float32)
  num_findings = labels.shape[1]
  positive_weight = jnp.asarray(loss_lib.positive_weights(labels, max_positive_weight))
  sigma = float(trainer.schedule.sigma(jnp.float32(1.0)))

  def finding_logits(params, rows):
    logits = trainer.model.apply(params, rows, jnp.full((rows.shape[0],), sigma, jnp.float32))
    return logits[:, trainer.layout.text_slice.start, :num_findings]

  def loss_fn(params, rows, y):
    return loss_lib.weighted_bce(finding_logits(params, rows), y, positive_weight).mean()

  train_config = ml_collections.ConfigDict(trainer.config.train.to_dict())
  train_config.num_steps = steps  # the MeDiM run's optimizer, its schedule over these steps
  tx, _ = make_optimizer(train_config)

  @jax.jit
  def step_fn(params, opt_state, rows, y):
    grads = jax.grad(loss_fn)(params, rows, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.set_mesh(trainer.mesh):
    params = trainer.init_state(seed, image_tokenizer).params
    opt_state = tx.init(params)
    bar = progress.bar(steps, "transformer on labels", "step")
    for step in range(steps):
      rows = np.random.default_rng([seed, step]).integers(0, len(inputs), batch_size)
      params, opt_state = step_fn(params, opt_state, jnp.asarray(inputs[rows]), jnp.asarray(labels[rows]))
      bar.update(1)
    bar.close()
    predict = jax.jit(finding_logits)
    return np.concatenate([np.asarray(predict(params, jnp.asarray(val_inputs[i:i + 64])))
                           for i in range(0, len(val_inputs), 64)])


def probe(config, workdir: str, dataset_name: str = "chest", seed: int = 0,
          label_steps: int = 0, step: int | None = None, classifiers: bool = True,
          split: str = "val") -> dict:
  """{"tokens", "real images", "model"[, "finding head"][, "transformer on labels"]}: AUC per
  finding on ``split`` (validation unless said), of checkpoint ``step`` (None: the latest), and
  {"model-ranked retrieval", "retrieval baseline"}: macro and per-finding F1 (where the rule
  extractor knows the findings). ``classifiers=False`` leaves out "tokens" and "real images" (they
  do not depend on the checkpoint)."""
  from medim_jax import evaluate, sample
  from medim_jax.data import build as data_build, dicom
  from medim_jax.diffusion import sampler as sampler_lib
  from medim_jax.evaluation import ground_truth
  from medim_jax.evaluation.demo import clinical
  from medim_jax.models import transformer
  from medim_jax.training import train

  dataset = data_build.build_dataset(config, workdir)
  trainer = train.Trainer(config, dataset.layout)
  params, step = sample.load_sampling_params(config, workdir, trainer, step)
  shards_dir = dataset.directories[0]
  manifest, index = dataset.manifests[shards_dir], ground_truth.read_index(shards_dir)

  def labelled(split_name):
    whole = dataset.split(split_name)
    split = evaluate.first_rows_per_dataset(whole, len(whole), [dataset_name])
    reference = ground_truth.load_examples(manifest, index, split.example_id,
                                           config.data.image_size, config.data.square,
                                           dicom.config_window(config.data))
    if reference.labels is None:
      raise ValueError(f"the {split_name} split of {dataset_name} has no finding labels to probe")
    return split, reference

  (train_split, train_ref), (val_split, val_ref) = labelled("train"), labelled(split)
  findings = list(val_ref.findings)
  result = {"checkpoint": step, "split": split, "images": len(val_split),
            "positives": dict(zip(findings, np.asarray(val_ref.labels).sum(0).tolist()))}
  for name, train_images, val_images in (
      (("tokens", train_split.images, val_split.images),
       ("real images", train_ref.images, val_ref.images)) if classifiers else ()):
    classifier = clinical.train_finding_classifier(
        np.asarray(train_images, np.uint8), train_ref.labels, seed=seed, findings=findings,
        steps=config.eval.classifier_steps, progress_bar=False)
    result[name] = dict(zip(findings, clinical.auc_per_finding(
        classifier.predict(np.asarray(val_images, np.uint8)), val_ref.labels).tolist()))
  masked = lambda split: sampler_lib.task_inputs("image_to_report", split.tokens,
                                                 split.prompt_length, dataset.layout)
  val_inputs = masked(val_split)
  candidates = train_split.tokens[:, dataset.layout.text_slice]
  scores = masked_report_scores(trainer, params, val_inputs, candidates)
  reading = finding_reading_scores(scores, train_ref.labels)
  aucs = clinical.auc_per_finding(np.nan_to_num(reading), val_ref.labels)
  aucs[np.isnan(reading).any(axis=0)] = np.nan  # no training report with (or without) the finding
  result["model"] = dict(zip(findings, aucs.tolist()))
  if set(findings) <= set(clinical.FINDINGS):
    nothing_given = sampler_lib.task_inputs("unconditional", val_split.tokens[:1],
                                            val_split.prompt_length[:1], dataset.layout)
    unconditional = masked_report_scores(trainer, params, nothing_given, candidates)[0]
    features = evaluate.tokenizer_features(dataset.image_tokenizer)[0]
    nearest = clinical.retrieval_baseline(features(val_ref.images), features(train_ref.images))
    train_findings = clinical.extract_matrix(train_ref.reports, findings=findings)
    for name, picked in (("model-ranked retrieval", ranked_retrieval(scores, unconditional)),
                         ("retrieval baseline", nearest)):
      table = clinical.f1_table(train_findings[picked], val_ref.labels, findings)
      result[name] = {"macro F1": table["macro_f1"], "F1": {f: table[f]["f1"] for f in findings},
                      "distinct reports": len(np.unique(picked))}
  if trainer.model.config.num_findings:
    head = finding_head_scores(trainer, params, val_inputs)
    names = transformer.finding_names(config.model)
    result["finding head"] = {f: float(clinical.auc_per_finding(
        head[:, [names.index(f)]], np.asarray(val_ref.labels)[:, [k]])[0]) if f in names else np.nan
        for k, f in enumerate(findings)}
  if label_steps:
    logits = train_on_labels(trainer, dataset.image_tokenizer, masked(train_split), train_ref.labels,
                             val_inputs, label_steps, seed)
    result["transformer on labels"] = dict(zip(findings, clinical.auc_per_finding(
        logits, val_ref.labels).tolist()))
  return result


def print_probe(config, workdir: str, label_steps: int, split: str = "val",
                step: int | None = None, seed: int = 0) -> None:
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  result = probe(config, workdir, seed=seed, label_steps=label_steps, step=step, split=split)
  findings = list(result["positives"])
  print(f"Reading probe, checkpoint {result['checkpoint']}, {result['images']} {split} images; "
        "AUC per finding (0.5: not read):")
  print(f"  {'':38s}" + " ".join(f"{f[:12]:>12s}" for f in findings))
  print(f"  {'positives':38s}" + " ".join(f"{result['positives'][f]:12d}" for f in findings))
  for row, label in (("real images", "classifier trained on real images"),
                     ("tokens", "classifier trained on reconstructions"),
                     ("model", "the model's masked-report reading"),
                     ("finding head", "its finding head (finding_names)"),
                     ("transformer on labels", f"its architecture on labels, {label_steps} steps")):
    if row not in result:
      continue
    print(f"  {label:38s}" + " ".join(f"{result[row][f]:12.3f}" for f in findings))
  if "model-ranked retrieval" in result:
    print("F1 per finding and macro F1 of the training report each image is given:")
    for row, label in (("model-ranked retrieval", "ranked by the model (its PMI)"),
                       ("retrieval baseline", "the nearest training image's")):
      scores = result[row]
      print(f"  {label:38s}" + " ".join(f"{scores['F1'][f]:12.3f}" for f in findings)
            + f"   macro {scores['macro F1']:.3f} ({scores['distinct reports']} distinct reports)")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The workdir of the trained checkpoint.")
  _LABEL_STEPS = flags.DEFINE_integer("label_steps", 0, "> 0: also train a fresh model of the "
                                      "config's architecture on the labels for that many steps")
  _SPLIT = flags.DEFINE_enum("split", "val", ["val", "test"], "The images to probe.")
  _STEP = flags.DEFINE_integer("step", None, "The checkpoint (default: the latest).")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the classifiers and of --label_steps' model.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: print_probe(_CONFIG.value, _WORKDIR.value, _LABEL_STEPS.value,
                                   _SPLIT.value, _STEP.value, _SEED.value))
