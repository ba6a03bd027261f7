"""``--mode tokenize``: paired folders -> tokenizers -> ArrayRecord shards.

Sources are the datasets of ``config.data.datasets`` (for medim_demo, the parts of the built demo).
The text tokenizer is trained on the training reports (or loaded from a local path), the image
tokenizer fitted on training images (or loaded), and every pair becomes one fixed-length row:
``prompt + report + EOS + padding`` and the image's codes. Pairs are read in chunks, so a folder
need not fit in memory. Example ids are unique across datasets and splits; ``index.jsonl`` maps
them back to dataset, split and file name (for evaluation against the originals).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from medim_jax import progress as progress_bars
from medim_jax.data import folders, shards
from medim_jax.tokenizers import image as image_tokenizers
from medim_jax.tokenizers import text as text_tokenizers

SPLITS = ("train", "val", "test")
CHUNK = 512
MAX_IMAGES_FOR_CODEBOOK = 2048


def shards_dirs(config, workdir: str) -> list[str]:
  spec = config.data.shards_dir or os.path.join(workdir, "shards")
  return [os.path.abspath(d.strip()) for d in spec.split(",") if d.strip()]


def source_folders(config, progress: bool = True) -> dict[str, dict]:
  """{dataset: {"prompt", "weight", "train"/"val"/"test": folder or ""}} from the config."""
  data = config.data
  sources = {}
  if data.name == "medim_demo":
    from medim_jax.data import demo
    root = demo.build(data, progress=progress)
    for part in demo.settings(data)["parts"]:
      options = data.datasets.get(part, {})
      sources[part] = {"prompt": options.get("prompt", ""), "weight": options.get("weight", 1.0),
                       **{s: os.path.join(root, part, s) for s in SPLITS}}
  elif data.name == "folders":
    if not data.datasets:
      raise ValueError("config.data.datasets is empty: name at least one dataset with its train "
                       "folder, e.g. --config.data.datasets.mimic.train=/data/mimic/train")
    for name, options in data.datasets.items():
      if not options.get("train"):
        raise ValueError(f"config.data.datasets.{name}.train is not set: the folder of training "
                         "NAME.png|jpg + NAME.txt pairs")
      sources[name] = {"prompt": options.get("prompt", ""), "weight": options.get("weight", 1.0),
                       **{s: options.get(s, "") for s in SPLITS}}
  else:
    raise ValueError(f"--mode tokenize reads medim_demo or folders datasets; config.data.name is "
                     f"{data.name!r}")
  return sources


def _split_pairs(source: dict, name: str, val_fraction: float) -> tuple[dict, list]:
  """{split: pairs} with val carved from train (by a hash of the file name) when not given."""
  pairs, skipped = {}, []
  for split in SPLITS:
    if source[split]:
      pairs[split], missing = folders.scan(source[split])
      skipped += missing
  if "val" not in pairs:
    def in_val(pair):
      digest = hashlib.sha256(f"{name}/{pair[0]}".encode()).digest()
      return int.from_bytes(digest[:4], "little") / 2**32 < val_fraction
    pairs["val"] = [p for p in pairs["train"] if in_val(p)]
    pairs["train"] = [p for p in pairs["train"] if not in_val(p)]
  return pairs, skipped


def _read(pairs, config, progress=None) -> folders.FolderData:
  return folders.load_pairs(pairs, config.data.image_size, config.data.square,
                            config.data.on_bad_pair, progress)


def make_text_tokenizer(config, train_texts, staging: str):
  spec = config.data.text_tokenizer
  if spec == "train":
    path = os.path.join(staging, "text.model")
    return text_tokenizers.train_sentencepiece(train_texts, path, config.data.text_vocab_size), \
        "tokenizers/text.model"
  tokenizer = text_tokenizers.load_text_tokenizer(spec)
  return tokenizer, os.path.abspath(spec)


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
    return tokenizer, "tokenizers/image.npz"
  if spec.endswith(".npz"):
    return image_tokenizers.load_image_tokenizer(spec), os.path.abspath(spec)
  raise ValueError(f"config.data.image_tokenizer {spec!r}: expected 'patch_kmeans', 'vq' or a "
                   "saved image tokenizer .npz")


def tokenizer_record(kind: str, tokenizer, path: str, size: int) -> dict:
  return {"kind": kind, "path": path, "fingerprint": tokenizer.fingerprint, "size": size}


def tokenize(config, workdir: str, progress: bool = True) -> dict:
  """Write the shards of every configured dataset; returns the manifest."""
  out_dir = shards_dirs(config, workdir)[0]
  sources = source_folders(config, progress)
  split_pairs, skipped = {}, []
  for name, source in sources.items():
    split_pairs[name], missing = _split_pairs(source, name, config.data.val_fraction)
    skipped += missing
  if skipped and config.data.on_bad_pair == "error":
    raise skipped[0]

  with tempfile.TemporaryDirectory() as staging:
    train_texts = []
    for name, source in sources.items():
      for _, _, text_path in split_pairs[name]["train"]:
        try:
          train_texts.append(folders.read_text(text_path))
        except folders.BadPairError:
          pass  # reported when the pair is read below
      train_texts.append(source["prompt"])
    text_tok, text_path = make_text_tokenizer(config, train_texts, staging)
    all_train = [p for name in sources for p in split_pairs[name]["train"]]
    image_tok, image_path = make_image_tokenizer(config, all_train, staging, config.data.demo_seed,
                                                 workdir)
    layout = shards.RowLayout(config.data.text_length, image_tok.tokens_per_image)

    rows, index, truncated = {}, [], 0
    total = sum(len(p) for name in sources for p in split_pairs[name].values())
    bar = progress_bars.bar(total, "tokenize", "pair", progress)
    for dataset_id, (name, source) in enumerate(sources.items()):
      prompt_ids = text_tok.tokenize(source["prompt"]) if source["prompt"] else []
      for split in SPLITS:
        records = rows.setdefault((name, split), [])
        pairs = split_pairs[name].get(split, [])
        for start in range(0, len(pairs), CHUNK):
          chunk = _read(pairs[start:start + CHUNK], config, bar.update)
          skipped += chunk.skipped
          codes = image_tok.encode(chunk.images) if len(chunk) else []
          for pair_name, text, image_codes in zip(chunk.names, chunk.texts, codes):
            ids = prompt_ids + text_tok.tokenize(text)
            truncated += len(ids) + 1 > layout.text_length
            if len(ids) + 1 > layout.text_length and not config.data.truncate_reports:
              raise ValueError(f"{name}/{split}/{pair_name}.txt needs {len(ids) + 1} tokens; the "
                               f"text segment holds {layout.text_length} (raise data.text_length "
                               "or allow data.truncate_reports)")
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
    include = {"index.jsonl": index_path}
    for inside in (text_path, image_path):
      if inside.startswith("tokenizers/"):
        include[inside] = os.path.join(staging, os.path.basename(inside))
    tokenizers = {
        "text_tokenizer": tokenizer_record(config.data.text_tokenizer, text_tok, text_path,
                                           text_tok.vocab_size),
        "image_tokenizer": tokenizer_record(config.data.image_tokenizer, image_tok, image_path,
                                            image_tok.codebook_size)}
    datasets = {name: {"id": i, "prompt": s["prompt"], "weight": s["weight"],
                       "folders": {k: s[k] for k in SPLITS}} for i, (name, s) in enumerate(sources.items())}
    manifest = shards.write(out_dir, rows, layout, tokenizers, datasets,
                            config.data.records_per_shard, include_files=include,
                            extra={"truncated_reports": int(truncated),
                                   "skipped": [str(e) for e in skipped]})
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
  if skipped:
    lines.append(f"  skipped {len(skipped)} bad pairs; first: {skipped[0]}")
  return "\n".join(lines)
