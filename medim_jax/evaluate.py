"""``--mode eval``: generate every task on a held-out split with a checkpoint, score it, write a page.

For each dataset of the shards (the first ``eval.examples_per_dataset`` rows of ``eval.split``):
  * image->report: report metrics against the real report (paper protocol and COCO toolkit);
  * report->image and joint: Fréchet distance on the image tokenizer's features (FID / IS only with
    local Inception weights), nearest-training-image distances (memorisation);
  * generated reports: longest word n-gram shared with any training report (memorisation);
  * where the data has finding labels (medim-demo's chest part): clinical agreement (finding F1 of the
    rule extractor on generated reports, of a finding classifier on generated images) beside a
    majority and a retrieval baseline, and joint-pair consistency.
Everything goes to ``WORKDIR/eval/metrics.json`` and ``WORKDIR/report.html``, with the evaluation card
(hashes, seeds, config, checkpoint step, package versions). Generations and the classifier are cached
under ``WORKDIR/eval`` and reused while their inputs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from medim_jax import integrity, sample, visualize
from medim_jax.data import base as data_base, build as data_build, dicom
from medim_jax.evaluation import card as card_lib, ground_truth, image_metrics, memorisation
from medim_jax.evaluation.demo import clinical
from medim_jax.training import train

TASKS = ("image_to_report", "report_to_image", "joint")


def evaluate(config, workdir: str, dataset=None, out_dir: str | None = None) -> dict:
  """Generate, score and write metrics.json and the page. ``out_dir`` (default ``WORKDIR/eval``,
  with the page at ``WORKDIR/report.html``) keeps a side evaluation, e.g. the reading study's on
  the validation split, from overwriting the run's own (the page then goes into ``out_dir``)."""
  dataset = dataset or data_build.build_dataset(config, workdir)
  if not hasattr(dataset, "manifests"):
    raise ValueError(f"--mode eval scores shard data (medim_demo or folders); config.data.name is "
                     f"{config.data.name!r} (smoke data is scored by --mode score)")
  start = time.perf_counter()
  page_path = os.path.join(out_dir, "report.html") if out_dir else os.path.join(workdir, "report.html")
  out_dir = out_dir or os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  trainer = train.Trainer(config, dataset.layout)
  params, step = sample.load_sampling_params(config, workdir, trainer,
                                              config.eval.checkpoint_step or None)
  split = first_rows_per_dataset(dataset.split(config.eval.split), config.eval.examples_per_dataset,
                                 [d.strip() for d in config.eval.datasets.split(",") if d.strip()])
  tasks = [t.strip() for t in config.eval.tasks.split(",") if t.strip()]
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    raise ValueError(f"config.eval.tasks names {unknown}; known tasks are {TASKS}")

  generated = {}
  for task in tasks:
    tokens, confidence = cached_generation(config, trainer, params, dataset, split, task, step,
                                           out_dir)
    text_ids, codes = dataset.layout.split(tokens)
    generated[task] = {"images": dataset.image_tokenizer.decode(np.asarray(codes)),
                       "reports": [dataset.text_tokenizer.decode(ids) for ids in text_ids],
                       "prompts": sample.task_prompts(task, split, dataset)}
    confidence = np.asarray(confidence, np.float32)
    if task != "report_to_image":  # the report's words with the probability each had when drawn
      generated[task]["report_confidence"] = [
          visualize.token_pieces(dataset.text_tokenizer, ids, p)
          for ids, p in zip(text_ids, confidence[:, dataset.layout.text_slice])]
    if task != "image_to_report":  # the image's token grid
      grid = dataset.image_tokenizer.grid
      generated[task]["image_confidence"] = confidence[:, dataset.layout.image_slice].reshape(
          -1, grid, grid)

  shards_dir = dataset.directories[0]
  manifest, index = dataset.manifests[shards_dir], ground_truth.read_index(shards_dir)
  results = {"card": card_lib.evaluation_card(config, dataset.directories, step, config.eval.split,
                                              [int(i) for i in split.example_id]),
             "datasets": {}}
  shown = {}
  for name in dict.fromkeys(split.dataset):
    rows = np.array([i for i, d in enumerate(split.dataset) if d == name])
    print(f"Evaluating {name}: {len(rows)} {config.eval.split} examples")
    results["datasets"][name], shown[name] = evaluate_dataset(
        config, name, manifest, index, split.subset(rows),
        {t: {k: pick(v, rows) for k, v in g.items()} for t, g in generated.items()},
        dataset.image_tokenizer, out_dir)
  results["card"]["seconds"] = round(time.perf_counter() - start, 1)
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(finite_or_null(results), f, indent=1, allow_nan=False)

  from medim_jax.evaluation import report_page
  page = report_page.write(page_path, results, shown, workdir)
  print(f"Evaluation of checkpoint {step}: {os.path.join(out_dir, 'metrics.json')}; page: {page}")
  return results


def finite_or_null(value):
  """``value`` with numpy scalars as Python numbers and NaN / inf as None, so metrics.json is strict
  JSON (an F1 of a finding without positives is NaN; strict parsers reject a bare NaN)."""
  if isinstance(value, dict):
    return {k: finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [finite_or_null(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value


def pick(values, rows):
  return values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows]


def first_rows_per_dataset(split: data_base.PairedSplit, count: int,
                           datasets: list[str] | None = None) -> data_base.PairedSplit:
  """The first ``count`` rows of each dataset (of ``datasets`` only, when given)."""
  names = split.dataset or ["data"] * len(split)
  unknown = sorted(set(datasets or ()) - set(names))
  if unknown:
    raise ValueError(f"config.eval.datasets names {unknown}; the split has {sorted(set(names))}")
  seen, rows = {}, []
  for i, name in enumerate(names):
    if datasets and name not in datasets:
      continue
    if seen.get(name, 0) < count:
      seen[name] = seen.get(name, 0) + 1
      rows.append(i)
  return split.subset(rows)


def cached_generation(config, trainer, params, dataset, split, task, step, out_dir):
  """Generated tokens of ``task`` and each token's probability when drawn, reused while
  ``generation_key`` is the same."""
  key = generation_key(config, params, dataset, split, task, step)
  task_dir = os.path.join(out_dir, "generated", task)
  tokens_path, key_path = os.path.join(task_dir, "tokens.npy"), os.path.join(task_dir, "key.txt")
  confidence_path = os.path.join(task_dir, "confidence.npy")
  if is_cached(key_path, key, tokens_path, confidence_path):
    print(f"  {task}: reusing {tokens_path}")
    return np.load(tokens_path), np.load(confidence_path)
  tokens, confidence = sample.generate_task(config, trainer, params, dataset.layout, split, task,
                                            with_confidence=True)
  confidence = confidence.astype(np.float16)  # as cached, so a rerun sees the same values
  os.makedirs(task_dir, exist_ok=True)
  np.save(confidence_path, confidence)
  sample.write_task(task_dir, task, tokens, split, dataset, step)
  write_key(key_path, key, tokens_path, confidence_path)
  return tokens, confidence


# The code that decides generated tokens (the sampler, the model, the training step's model
# wrapper): a change there makes cached generations stale though config and checkpoint are the same.
GENERATION_CODE = ("diffusion", "models", "sample.py", "training/train.py")


def generation_key(config, params, dataset, split, task, step) -> str:
  """What generated tokens depend on: the checkpoint's step and weights, the sampler and model
  settings, the code, the data's manifests and the prompts' example ids."""
  return hashlib.sha256(json.dumps({
      "step": step, "params": params_digest(params), "task": task,
      "sample": config.sample.to_dict(), "model": config.model.to_dict(),
      "code": generation_code_digest(),
      "manifests": sorted(card_lib.file_sha256(os.path.join(d, "manifest.json"))
                          for d in dataset.directories),
      "example_ids": [int(i) for i in split.example_id]}, sort_keys=True).encode()).hexdigest()


def params_digest(params) -> str:
  """A fingerprint of the weights without copying them to the host: each leaf's sum and sum of
  squares (a checkpoint trained again to the same step with other data or code differs here)."""
  leaves = jax.tree_util.tree_leaves(params)
  moments = jax.jit(lambda leaves: jnp.stack([
      jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
      for x in leaves]))(leaves)
  return hashlib.sha256(np.asarray(moments).tobytes()).hexdigest()


def generation_code_digest() -> str:
  package = os.path.dirname(os.path.abspath(__file__))
  files = []
  for entry in GENERATION_CODE:
    path = os.path.join(package, entry)
    files += ([os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py")]
              if os.path.isdir(path) else [path])
  return integrity.files_sha256(files)


def is_cached(key_path: str, key: str, *outputs: str) -> bool:
  """Whether ``outputs`` were made from inputs hashing to ``key`` and are byte for byte what was
  written then. The key file (inputs' hash, then each output's sha256) is written after the
  outputs, so a run cut short leaves no key; a stale key, or an output whose bytes changed since,
  is removed with a warning, and the outputs are made again."""
  if not os.path.exists(key_path):
    return False
  with open(key_path) as f:
    recorded = f.read().split("\n")
  if recorded[0] == key and all(os.path.exists(o) for o in outputs):
    digests = [integrity.file_sha256(o) for o in outputs]
    if recorded[1:] == digests:
      return True
    changed = next((o for o, d, r in zip(outputs, digests, recorded[1:] + [""] * len(outputs))
                    if d != r), outputs[-1])
    print(f"  warning: {changed} is not the file its key recorded (changed or damaged since, or "
          "from an older version): making it again")
  os.remove(key_path)
  return False


def write_key(key_path: str, key: str, *outputs: str) -> None:
  integrity.write_text_atomically(
      key_path, "\n".join([key] + [integrity.file_sha256(o) for o in outputs]))


def evaluate_dataset(config, name, manifest, index, split, generated, image_tokenizer, out_dir):
  """Metrics of one dataset's examples; also returns what the page shows."""
  data_cfg = config.data
  dataset_folders = manifest["datasets"][name]["folders"]
  window = dicom.config_window(data_cfg)
  originals = ground_truth.load_examples(manifest, index, split.example_id, data_cfg.image_size,
                                         data_cfg.square, window)
  training = ground_truth.load_split(dataset_folders["train"], data_cfg.image_size, data_cfg.square,
                                     window)
  features, name_fd, description = tokenizer_features(image_tokenizer)
  image_tasks = [t for t in ("report_to_image", "joint") if t in generated]
  feats = {"train": features(training.images), "real": features(originals.images),
           **{t: features(generated[t]["images"]) for t in image_tasks}}
  result, shown = {}, {"originals": originals, "generated": generated, "training": training}

  if "image_to_report" in generated and config.eval.report_metrics:
    from medim_jax.evaluation import report_metrics
    result["report_metrics"] = report_metrics.evaluate_reports(
        originals.reports, generated["image_to_report"]["reports"])
  if "image_to_report" in generated:
    _, retrieved = clinical.retrieval_baseline(feats["real"], feats["train"], training.reports)
    result["chexpert14_rule_based"] = chexpert_efficacy(
        originals.reports, generated["image_to_report"]["reports"], retrieved)
    if config.eval.get("chexbert_checkpoint"):
      from medim_jax.evaluation import chexbert
      labeler = chexbert.load(config.eval.chexbert_checkpoint, config.eval.chexbert_tokenizer)
      result["chexpert14_chexbert"] = chexpert_efficacy(
          originals.reports, generated["image_to_report"]["reports"], retrieved,
          labeler.label_matrix, f"CheXbert from {config.eval.chexbert_checkpoint}")
    for key in ("chexpert14_rule_based", "chexpert14_chexbert"):
      if key in result:
        scores = result[key]["uncertain as negative"]
        print(f"  {key}, image->report, micro / macro F1 (uncertain as negative): " + "; ".join(
            f"{name} {s['micro']['f1']:.3f} / {s['macro']['f1']:.3f}" for name, s in scores.items()))

  result["image_metrics"] = {"features": description}
  for task in image_tasks:
    result["image_metrics"][task] = {
        **image_metrics.inception_metrics(generated[task]["images"], originals.images,
                                          config.eval.inception_weights),
        **image_metrics.frechet_distance_of_features(name_fd, feats["real"], feats[task])}
  result["image_metrics"]["reference: real training vs real test images"] = (
      image_metrics.frechet_distance_of_features(name_fd, feats["real"], feats["train"]))

  result["memorisation"], shown["memorisation"] = memorisation_checks(
      originals, training, generated, feats)

  if originals.labels is not None:
    result["clinical"] = clinical_agreement(
        config, name, dataset_folders, originals, training, generated, feats, image_tokenizer,
        out_dir)
  return result, shown


def tokenizer_features(image_tokenizer):
  """(feature function, Fréchet-distance name, description) of the image tokenizer's encoder; pixels
  averaged to 16x16 for a tokenizer without one (k-means patches)."""
  if hasattr(image_tokenizer, "features"):
    return (image_tokenizer.features, "frechet_distance_tokenizer_encoder_features",
            f"the {type(image_tokenizer).__name__}'s encoder latents before quantisation "
            "(not Inception)")

  def pixels(images):
    images = np.asarray(images, np.float32) / 255.0
    n, s = images.shape[0], images.shape[1]
    f = max(s // 16, 1)
    return images[:, :s // f * f, :s // f * f].reshape(n, s // f, f, s // f, f, 3).mean((2, 4)).reshape(n, -1)
  return (pixels, "frechet_distance_16x16_pixels",
          "pixels in [0, 1] averaged to 16x16 (the image tokenizer has no encoder; not Inception)")


def memorisation_checks(originals, training, generated, feats):
  """Nearest training image (pixels, tokenizer features ``feats``) and longest verbatim run shared
  with a training report, for the generated samples and, as the yardstick, the real test samples."""
  images = {"reference: real test images": (originals.images, feats["real"]),
            **{t: (generated[t]["images"], feats[t]) for t in ("report_to_image", "joint")
               if t in generated}}
  reports = {"reference: real test reports": originals.reports,
             **{t: generated[t]["reports"] for t in ("image_to_report", "joint") if t in generated}}
  result, shown = {"images": {}, "reports": {}}, {"images": {}, "reports": {}}
  for name, (batch, batch_features) in images.items():
    pixel = memorisation.nearest_images(batch, training.images)
    feature = memorisation.nearest_features(batch_features, feats["train"])
    result["images"][name] = {"nearest training image, pixel RMSE (0-255)": pixel.summary(),
                              "nearest training image, tokenizer-feature L2": feature.summary()}
    shown["images"][name] = pixel
  index = memorisation.NgramIndex(training.reports)
  for name, batch in reports.items():
    shared = memorisation.longest_shared_ngrams(batch, index)
    result["reports"][name] = shared.summary()
    shown["reports"][name] = shared
  return result, shown


def clinical_agreement(config, name, dataset_folders, originals, training, generated, feats,
                       image_tokenizer, out_dir):
  """Finding F1 of generated reports / images against the true labels, with baselines beside them."""
  unknown = [f for f in originals.findings if f not in clinical.FINDINGS]
  if unknown:
    return {"unavailable": f"the rule extractor knows {clinical.FINDINGS}, not {unknown}"}
  findings, true, n = originals.findings, originals.labels, len(originals.labels)
  f1 = lambda predicted: clinical.f1_table(predicted, true, findings)
  extract = lambda reports: clinical.extract_matrix(reports, findings=findings)
  classifier, description = cached_classifier(config, name, dataset_folders, training,
                                                out_dir)
  result = {"classifier": {"description": description}}
  real_from_report = extract(originals.reports)
  real_from_image = classifier.predict_labels(originals.images)

  if "image_to_report" in generated:
    _, retrieved = clinical.retrieval_baseline(feats["real"], feats["train"], training.reports)
    result["image_to_report"] = {
        "MeDiM": f1(extract(generated["image_to_report"]["reports"])),
        "retrieval baseline": f1(extract(retrieved)),
        "majority baseline": f1(clinical.majority_baseline(training.labels, n)),
        "extractor on the real report (ceiling)": f1(real_from_report)}
  if "report_to_image" in generated:
    reconstructed = image_tokenizer.decode(image_tokenizer.encode(originals.images))
    result["report_to_image"] = {
        "MeDiM": f1(classifier.predict_labels(generated["report_to_image"]["images"])),
        "chance (random at training prevalence)": chance_f1(training.labels, true, findings),
        "classifier on the real image": f1(real_from_image),
        "classifier on the tokenizer's reconstruction (ceiling)":
            f1(classifier.predict_labels(reconstructed))}
  if "joint" in generated:
    from_report = extract(generated["joint"]["reports"])
    from_image = classifier.predict_labels(generated["joint"]["images"])
    agree = (from_report == from_image).all(axis=1)
    real_agree = (real_from_report == real_from_image).all(axis=1)
    result["joint_consistency"] = {
        "pairs": int(len(agree)),
        "pairs whose report and image agree on every finding": float(agree.mean()),
        "reference: real test pairs": float(real_agree.mean()),
        "per finding agreement": {f: float((from_report[:, j] == from_image[:, j]).mean())
                                  for j, f in enumerate(findings)},
        "per_pair": [bool(a) for a in agree]}
    export_synthetic(config, name, generated["joint"], agree, out_dir)
  return result


def chance_f1(train_labels, true, findings) -> dict:
  """Expected F1 of flagging each finding at random with its training prevalence q: 2pq / (p + q)
  for test prevalence p."""
  q = np.asarray(train_labels, bool).mean(axis=0)
  p = np.asarray(true, bool).mean(axis=0)
  table = {f: {"f1": float(2 * p[j] * q[j] / (p[j] + q[j])) if p[j] > 0 else float("nan"),
               "support": int(np.asarray(true)[:, j].sum())} for j, f in enumerate(findings)}
  scored = [table[f]["f1"] for f in findings if table[f]["support"]]
  table["macro_f1"] = float(np.mean(scored)) if scored else float("nan")
  return table


def chexpert_efficacy(real_reports, generated_reports, retrieved_reports, label_matrix=None,
                      labeler: str = "rule-based CheXpert-14 (medim_jax.evaluation.chexpert), not "
                                     "the CheXpert labeler itself") -> dict:
  """Clinical efficacy over the 14 CheXpert observations, both reports labelled by ``label_matrix``
  (default: the rules), uncertain counted negative and positive; the retrieval baseline (the
  report of the nearest training image) scored the same way."""
  from medim_jax.evaluation import chexpert
  label_matrix = label_matrix or chexpert.label_matrix
  reference = label_matrix(real_reports)
  scored = {"MeDiM": label_matrix(generated_reports),
            "retrieval baseline": label_matrix(retrieved_reports)}
  return {"labeler": labeler,
          **{f"uncertain as {u}": {name: chexpert.ce_metrics(labels, reference, u)
                                   for name, labels in scored.items()}
             for u in ("negative", "positive")}}


def cached_classifier(config, name, dataset_folders, training, out_dir):
  """The finding classifier of one dataset, trained on its training images, thresholds on its
  validation folder when that has labels (cached by inputs)."""
  steps, seed = config.eval.classifier_steps, config.eval.classifier_seed
  key = hashlib.sha256(json.dumps({"names": training.names, "steps": steps, "seed": seed,
                                   "size": int(training.images.shape[1])}).encode()).hexdigest()
  path = os.path.join(out_dir, f"finding_classifier_{name}.npz")
  if is_cached(path + ".key", key, path):
    classifier = clinical.FindingClassifier.load(path)
  else:
    print(f"  training the {name} finding classifier ({steps} steps, {len(training.names)} images)")
    classifier = clinical.train_finding_classifier(training.images, training.labels, steps=steps,
                                                   seed=seed, findings=training.findings)
    val_folder = dataset_folders.get("val", "")
    val = (ground_truth.load_split(val_folder, config.data.image_size, config.data.square,
                                   dicom.config_window(config.data))
           if val_folder and os.path.isdir(val_folder) else None)
    if val is not None and val.labels is not None:
      classifier.calibrate(val.images, val.labels)
    classifier.save(path)
    write_key(path + ".key", key, path)
  return classifier, (f"Finding classifier: a small CNN trained on the {len(training.names)} "
                      f"training images of {name} and their labels ({steps} steps), decision "
                      "thresholds set for best F1 on the validation split. Its scores on the real "
                      "test images and on their tokenizer reconstructions are the ceilings the "
                      "report->image column can be read against.")


def export_synthetic(config, name, joint, agree, out_dir) -> None:
  """Joint pairs as NAME.png + NAME.txt (a folder --mode tokenize can read), all or consistent."""
  mode = config.eval.export_synthetic
  if not mode:
    return
  if mode not in ("all", "consistent"):
    raise ValueError(f"config.eval.export_synthetic must be '', 'all' or 'consistent', got {mode!r}")
  from PIL import Image
  folder = os.path.join(out_dir, "synthetic", name)
  os.makedirs(folder, exist_ok=True)
  kept = 0
  for i, (image, report) in enumerate(zip(joint["images"], joint["reports"])):
    if mode == "consistent" and not agree[i]:
      continue
    Image.fromarray(np.asarray(image, np.uint8)).save(os.path.join(folder, f"joint{i:05d}.png"))
    with open(os.path.join(folder, f"joint{i:05d}.txt"), "w") as f:
      f.write(report)
    kept += 1
  print(f"  exported {kept} of {len(agree)} joint pairs ({mode}) to {folder}")
