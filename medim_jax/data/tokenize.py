"""``--mode tokenize``: paired folders -> tokenizers -> ArrayRecord shards.

Sources are the datasets of ``config.data.datasets`` (for medim_demo, the parts of the built demo).
The text tokenizer is trained on the training reports (or loaded from a local path), the image
tokenizer fitted on training images (or loaded), and every pair becomes one fixed-length row:
``prompt + report + EOS + padding`` and the image's codes. Pairs are read in chunks, so a folder
need not fit in memory. Example ids are unique across datasets and splits; ``index.jsonl`` maps
them back to dataset, split and file name (for evaluation against the originals).

A **text-only** dataset (``data.datasets.<name>.text_only``, or medim-demo's ``chest_text`` part) is
a training folder of ``NAME.txt`` reports without images: its rows carry ``shards.NO_IMAGE`` codes and
train the report side alone (diffusion/corruption.py). It has no validation or test split, and it
takes no part in fitting either tokenizer, so adding one leaves the paired rows as they were.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from medim_jax import errors, progress as progress_bars
from medim_jax.data import dicom, folders, shards
from medim_jax.tokenizers import image as image_tokenizers, text as text_tokenizers

SPLITS = ("train", "val", "test")
# The data.name values whose pairs become shards (--mode tokenize): medim-demo, your own paired
# folders, and MIMIC-CXR-JPG as distributed.
SHARD_SOURCES = ("medim_demo", "folders", "mimic_cxr")
CHUNK = 512
MAX_IMAGES_FOR_CODEBOOK = 2048


def shards_dirs(config, workdir: str) -> list[str]:
  spec = config.data.shards_dir or os.path.join(workdir, "shards")
  return [os.path.abspath(d.strip()) for d in spec.split(",") if d.strip()]


def source_folders(config, progress: bool = True, workdir: str | None = None) -> dict[str, dict]:
  """{dataset: {"prompt", "weight", "train"/"val"/"test": folder or ""}} from the config. MIMIC-CXR
  (data.name=mimic_cxr) is first converted into paired folders under ``workdir``."""
  data = config.data
  sources = {}
  if data.name == "mimic_cxr":
    name = data.mimic_cxr.dataset
    options = data.datasets.get(name, {})
    out = mimic_cxr_folders(config, workdir, progress)
    sources[name] = {"prompt": options.get("prompt", ""), "weight": options.get("weight", 1.0),
                     "text_only": False, **{s: os.path.join(out, s) for s in SPLITS}}
  elif data.name == "medim_demo":
    from medim_jax.data import demo
    root = demo.build(data, progress=progress)
    for part in demo.parts(data):
      options = data.datasets.get(part, {})
      text_only = part in demo.TEXT_ONLY_PARTS
      sources[part] = {"prompt": options.get("prompt", ""), "weight": options.get("weight", 1.0),
                       "text_only": text_only,
                       **{s: os.path.join(root, part, s) if s == "train" or not text_only else ""
                          for s in SPLITS}}
  elif data.name == "folders":
    for name, options in data.datasets.items():
      if not options.get("train"):  # a dataset without a training folder is not used
        continue
      text_only = bool(options.get("text_only", False))
      if text_only and (options.get("val") or options.get("test")):
        raise errors.InputError(f"config.data.datasets.{name} is text_only: it only trains, so give "
                                "it a train folder and no val or test folder")
      sources[name] = {"prompt": options.get("prompt", ""), "weight": options.get("weight", 1.0),
                       "text_only": text_only, **{s: options.get(s, "") for s in SPLITS}}
    if not sources:
      raise errors.InputError(
          "no dataset in config.data.datasets has a train folder: set one, e.g. "
          "--config.data.datasets.chest.train=/data/mimic-cxr/data with configs/demo.py "
          "(whose datasets are chest and pathology)")
  else:
    raise ValueError(f"paired image + report folders come from data.name {', '.join(SHARD_SOURCES)}; "
                     f"config.data.name is {data.name!r}")
  return sources


def mimic_cxr_folders(config, workdir: str | None, progress: bool = True) -> str:
  """MIMIC-CXR-JPG at config.data.mimic_cxr.root -> W/mimic_cxr_folders (data/mimic_cxr.py), made
  anew each time (links, so it is quick); returns that folder."""
  from medim_jax.data import mimic_cxr
  options = config.data.mimic_cxr
  if not options.root:
    raise errors.InputError("data.name=mimic_cxr needs the MIMIC-CXR-JPG folder: "
                            "--config.data.mimic_cxr.root=/path/to/mimic-cxr-jpg/2.1.0")
  if workdir is None:
    raise errors.InputError("data.name=mimic_cxr is converted into the work directory: run "
                            "--mode tokenize (or all) with --workdir")
  out = os.path.join(os.path.abspath(workdir), "mimic_cxr_folders")
  shutil.rmtree(out, ignore_errors=True)
  summary = mimic_cxr.convert(
      options.root, options.reports_root or options.root, out, options.section,
      tuple(v.strip() for v in options.views.split(",") if v.strip()), not options.all_images,
      options.uncertain, progress=progress)
  print(f"MIMIC-CXR {options.root} -> {out}: {summary}")
  if summary.missing and config.data.on_bad_pair == "error":
    raise errors.InputError(f"{summary.missing[0]}: listed in mimic-cxr-2.0.0-metadata.csv but not "
                            "on disk (an incomplete download?); fetch it, or set "
                            "data.on_bad_pair=skip to go on without it")
  if not summary.written.get("train"):
    raise errors.InputError(f"{options.root}: no training study was usable ({summary}); check "
                            "data.mimic_cxr.root, .reports_root, .views and .section")
  return out


def _split_pairs(source: dict, name: str, val_fraction: float) -> tuple[dict, list]:
  """{split: pairs} with val carved from train (by a hash of the file name) when not given; a
  text-only dataset's "pairs" are (name, None, text path) and all train."""
  if source.get("text_only"):
    reports = folders.scan_reports(source["train"])
    images = folders.count_images(source["train"])
    if images:
      print(f"{source['train']}: dataset {name!r} is text_only, so its {images} image file(s) are "
            "not used")
    return {"train": reports}, []
  pairs, skipped = {}, []
  for split in SPLITS:
    if source[split]:
      pairs[split], missing = folders.scan(source[split])
      skipped += missing
  if not pairs.get("val"):
    def in_val(pair):
      digest = hashlib.sha256(f"{name}/{pair[0]}".encode()).digest()
      return int.from_bytes(digest[:4], "little") / 2**32 < val_fraction
    pairs["val"] = [p for p in pairs["train"] if in_val(p)]
    pairs["train"] = [p for p in pairs["train"] if not in_val(p)]
  return pairs, skipped


def _read(pairs, config, progress=None) -> folders.FolderData:
  return folders.load_pairs(pairs, config.data.image_size, config.data.square,
                            config.data.on_bad_pair, progress, dicom.config_window(config.data))


def make_text_tokenizer(config, train_texts, staging: str):
  """(tokenizer, the file or folder to copy beside the shards, its name there)."""
  spec = config.data.text_tokenizer
  if spec == "train":
    path = os.path.join(staging, "text.model")
    tokenizer = text_tokenizers.train_sentencepiece(train_texts, path, config.data.text_vocab_size)
    return tokenizer, path, "tokenizers/text.model"
  tokenizer = text_tokenizers.load_text_tokenizer(spec)
  inside = "tokenizers/text" if os.path.isdir(spec) else "tokenizers/text.model"
  return tokenizer, os.path.abspath(spec), inside


def make_image_tokenizer(config, train_pairs, staging: str, seed: int, workdir: str = "."):
  spec = config.data.image_tokenizer
  if spec == "vq":
    spec = os.path.join(workdir, "vq", "tokenizer.npz")
    if not os.path.exists(spec):
      raise FileNotFoundError(f"no VQ tokenizer at {spec}: run --mode train_vq first")
  if spec == "patch_kmeans":
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(train_pairs))[:MAX_IMAGES_FOR_CODEBOOK]
    images = _read([train_pairs[i] for i in sorted(chosen)], config).images
    tokenizer = image_tokenizers.PatchKMeansTokenizer.fit(
        images, config.data.image_codebook_size, config.data.patch_pixels, seed)
    tokenizer.save(os.path.join(staging, "image.npz"))
    return tokenizer, os.path.join(staging, "image.npz"), "tokenizers/image.npz"
  if spec.endswith(".npz"):
    return image_tokenizers.load_image_tokenizer(spec), os.path.abspath(spec), "tokenizers/image.npz"
  raise ValueError(f"config.data.image_tokenizer {spec!r}: expected 'patch_kmeans', 'vq' or a "
                   "saved image tokenizer .npz")


def tokenizer_record(kind: str, tokenizer, source: str, inside: str, size: int) -> dict:
  """The tokenizer is copied to ``inside`` (relative to the shards), so the shards never depend on
  a file elsewhere that may change; ``source`` says where it came from."""
  return {"kind": kind, "path": inside, "source": source, "fingerprint": tokenizer.fingerprint,
          "size": size}


def settings(config) -> dict:
  """Every setting the shards depend on; training refuses shards made with other settings."""
  data = config.data
  keys = ("name", "image_size", "square", "text_length", "text_tokenizer", "text_vocab_size",
          "image_tokenizer", "image_codebook_size", "patch_pixels", "val_fraction")
  result = {k: data[k] for k in keys}
  # text_only only where set, so shards made before the knob keep their settings
  result["datasets"] = {n: {**{k: d.get(k, "") for k in ("train", "val", "test", "prompt")},
                            **({"text_only": True} if d.get("text_only", False) else {})}
                        for n, d in data.datasets.items()}
  if data.get("dicom_window", ""):  # only when set: shards made before the knob stay valid
    result["dicom_window"] = data.dicom_window
  if data.name == "medim_demo":
    from medim_jax.data import demo
    result["demo"] = demo.settings(data)
  if data.name == "mimic_cxr":
    result["mimic_cxr"] = data.mimic_cxr.to_dict()
  return json.loads(json.dumps(result))


def tokenize(config, workdir: str, progress: bool = True) -> dict:
  """Write the shards of every configured dataset; returns the manifest."""
  out_dir = shards_dirs(config, workdir)[0]
  shards.check_replaceable(out_dir)
  sources = source_folders(config, progress, workdir)
  # Paired datasets first: their dataset and example ids do not depend on text-only ones.
  sources = dict(sorted(sources.items(), key=lambda item: bool(item[1].get("text_only"))))
  split_pairs, skipped = {}, []
  for name, source in sources.items():
    split_pairs[name], missing = _split_pairs(source, name, config.data.val_fraction)
    skipped += missing
    if not split_pairs[name]["train"]:
      first = f"; first problem: {missing[0]}" if missing else ""
      wanted = ("reports (NAME.txt) for text-only" if source.get("text_only") else
                "image + report pairs (NAME.png|jpg with NAME.txt) for")
      raise folders.BadPairError(f"{source['train']}: no usable {wanted} training dataset "
                                 f"{name!r}{first}", "empty")
  if skipped and config.data.on_bad_pair == "error":
    raise skipped[0]

  with tempfile.TemporaryDirectory() as staging:
    train_texts = []
    paired = [name for name, source in sources.items() if not source.get("text_only")]
    if not paired:
      raise errors.InputError(f"every configured dataset ({', '.join(sources)}) is text_only: the "
                              "tokenizers need at least one dataset of image + report pairs")
    for name, source in ((n, sources[n]) for n in paired):
      for _, _, text_path in split_pairs[name]["train"]:
        try:
          train_texts.append(folders.read_text(text_path))
        except folders.BadPairError:
          pass  # reported when the pair is read below
      train_texts.append(source["prompt"])
    text_tok, text_source, text_inside = make_text_tokenizer(config, train_texts, staging)
    all_train = [p for name in paired for p in split_pairs[name]["train"]]
    image_tok, image_source, image_inside = make_image_tokenizer(
        config, all_train, staging, config.data.demo_seed, workdir)
    layout = shards.RowLayout(config.data.text_length, image_tok.tokens_per_image)
    def origin(source):
      return "fitted while tokenizing" if source.startswith(staging) else source
    tokenizers = {
        "text_tokenizer": tokenizer_record(config.data.text_tokenizer, text_tok,
                                           origin(text_source), text_inside, text_tok.vocab_size),
        "image_tokenizer": tokenizer_record(config.data.image_tokenizer, image_tok,
                                            origin(image_source), image_inside,
                                            image_tok.codebook_size)}
    shards.check_replaceable(out_dir, tokenizers, layout)  # before the long part

    rows, index, truncated, dicom_display = {}, [], 0, collections.Counter()
    left_out_long = collections.Counter()  # text-only reports longer than the text segment
    total = sum(len(p) for name in sources for p in split_pairs[name].values())
    bar = progress_bars.bar(total, "tokenize", "pair", progress)
    for dataset_id, (name, source) in enumerate(sources.items()):
      prompt_ids = text_tok.tokenize(source["prompt"]) if source["prompt"] else []
      for split in SPLITS:
        records = rows.setdefault((name, split), [])
        pairs = split_pairs[name].get(split, [])
        for start in range(0, len(pairs), CHUNK):
          chunk = _read(pairs[start:start + CHUNK], config, bar.update)
          if source.get("text_only"):
            codes = [np.full(layout.image_length, shards.NO_IMAGE)] * len(chunk)
          else:
            codes = image_tok.encode(chunk.images) if len(chunk) else []
          skipped += chunk.skipped
          dicom_display.update(chunk.dicom_display)
          for pair_name, text, image_codes in zip(chunk.names, chunk.texts, codes):
            ids = prompt_ids + text_tok.tokenize(text)
            if source.get("text_only") and len(ids) + 1 > layout.text_length:
              # Cut short, it would teach reports that run off the segment without an end; and
              # with no image beside it, leaving it out loses nothing else.
              left_out_long[name] += 1
              continue
            truncated += len(ids) + 1 > layout.text_length
            if len(ids) + 1 > layout.text_length and not config.data.truncate_reports:
              raise errors.InputError(
                  f"{name}/{split}/{pair_name}.txt needs {len(ids) + 1} tokens; the text segment "
                  f"holds {layout.text_length} (raise data.text_length or allow "
                  "data.truncate_reports)")
            text_ids = text_tokenizers.fixed_length(ids, layout.text_length, text_tok.eos_id,
                                                    text_tok.pad_id, truncate=True)
            text_mask = np.arange(layout.text_length) < min(len(ids) + 1, layout.text_length)
            example_id = len(index)
            records.append(layout.encode(dataset_id, example_id, len(prompt_ids), text_ids,
                                         text_mask, image_codes))
            index.append({"example_id": example_id, "dataset": name, "split": split,
                          "name": pair_name})
    bar.close()

    index_path = os.path.join(staging, "index.jsonl")
    with open(index_path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in index)
    include = {"index.jsonl": index_path, text_inside: text_source, image_inside: image_source}
    datasets = {name: {"id": i, "prompt": s["prompt"], "weight": s["weight"],
                       "folders": {k: s[k] for k in SPLITS},
                       **({"text_only": True} if s.get("text_only") else {})}
                for i, (name, s) in enumerate(sources.items())}
    manifest = shards.write(out_dir, rows, layout, tokenizers, datasets,
                            config.data.records_per_shard, include_files=include,
                            extra={"settings": settings(config), "truncated_reports": int(truncated),
                                   "skipped": [str(e) for e in skipped],
                                   **({"text_only_left_out_too_long": dict(left_out_long)}
                                      if left_out_long else {}),
                                   **({"dicom_display": dict(dicom_display)} if dicom_display else {})})
  print(describe(out_dir, manifest, skipped))
  return manifest


def describe(directory: str, manifest: dict, skipped=()) -> str:
  lines = [f"Shards written to {directory}:"]
  for name, counts in manifest["counts"].items():
    lines.append(f"  {name}: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in SPLITS))
  layout = manifest["row_layout"]
  tok = manifest["tokenizers"]
  lines.append(f"  rows: {layout['text_length']} text + {layout['image_length']} image tokens; text "
               f"vocabulary {tok['text_tokenizer']['size']}, image codebook "
               f"{tok['image_tokenizer']['size']}; {manifest['truncated_reports']} reports truncated")
  for name, count in manifest.get("text_only_left_out_too_long", {}).items():
    lines.append(f"  {name}: {count} text-only reports left out, longer than the text segment")
  if skipped:
    lines.append(f"  skipped {len(skipped)} bad pairs; first: {skipped[0]}")
  return "\n".join(lines)
