"""ArrayRecord shards of fixed-length token rows, with a manifest that says how they were made.

A row is one little-endian int32 vector:
  [dataset_id, example_id, prompt_length, text ids (T), text mask (T), image codes (I)]
Text ids and image codes are the tokenizers' own ids (image codes ``NO_IMAGE`` throughout: a report
without an image, from a text-only dataset); the joint layout (text | MASK | image) is
applied when batches are read, so shards do not depend on it. The manifest (``manifest.json``)
records the layout, counts per dataset and split, every file with its size and sha256, and the
fingerprints of both tokenizers: rows made by one tokenizer are never read with another.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from medim_jax import errors, integrity

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
NO_IMAGE = -1  # the image codes of a row that has no image


class ShardError(errors.InputError):
  """Shards that cannot be used as asked; the message names the directory or file."""


@dataclasses.dataclass(frozen=True)
class RowLayout:
  text_length: int
  image_length: int

  @property
  def row_length(self) -> int:
    return 3 + 2 * self.text_length + self.image_length

  def encode(self, dataset_id: int, example_id: int, prompt_length: int, text_ids, text_mask,
             image_codes) -> bytes:
    text_ids, image_codes = np.asarray(text_ids), np.asarray(image_codes)
    if text_ids.shape != (self.text_length,) or image_codes.shape != (self.image_length,):
      raise ShardError(f"a row needs {self.text_length} text ids and {self.image_length} image "
                       f"codes, got {text_ids.shape} and {image_codes.shape}")
    row = np.concatenate([[dataset_id, example_id, prompt_length], text_ids,
                          np.asarray(text_mask, np.int32), image_codes]).astype("<i4")
    return row.tobytes()

  def decode(self, record: bytes) -> dict[str, np.ndarray]:
    row = np.frombuffer(record, "<i4")
    if row.size != self.row_length:
      raise ShardError(f"a shard record holds {row.size} int32 values, the manifest's layout "
                       f"{self.row_length}: the shard files and the manifest disagree")
    t, i = self.text_length, self.image_length
    return {"dataset_id": row[0], "example_id": row[1], "prompt_length": row[2],
            "text": row[3:3 + t], "text_mask": row[3 + t:3 + 2 * t].astype(bool),
            "image": row[3 + 2 * t:3 + 2 * t + i]}


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no shards in {directory} ({MANIFEST} missing): run --mode tokenize "
                            "first")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ShardError(f"{path} is not valid JSON ({e}); re-run --mode tokenize") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ShardError(f"{path} has format {manifest.get('format_version')}, this version reads "
                     f"{FORMAT_VERSION}; re-run --mode tokenize")
  return manifest


def row_layout(manifest: dict) -> RowLayout:
  return RowLayout(**manifest["row_layout"])


def _incompatibility(tokenizers: dict, row_layout: dict, other_tokenizers: dict,
                     other_row_layout: dict | None) -> str | None:
  """What makes rows of one tokenizer set/layout unreadable as the other's, or None."""
  for key in ("text_tokenizer", "image_tokenizer"):
    ours, theirs = tokenizers[key]["fingerprint"], other_tokenizers[key]["fingerprint"]
    if ours != theirs:
      return f"another {key.replace('_', ' ')} ({ours[:24]}... vs {theirs[:24]}...)"
  if other_row_layout is not None and row_layout != other_row_layout:
    return f"other rows ({row_layout} vs {other_row_layout})"
  return None


def check_same_tokenizers(manifests: dict[str, dict]) -> None:
  """Refuse shard sets whose text or image tokenizers differ (their ids would mean other things)."""
  items = list(manifests.items())
  first_dir, first = items[0]
  for directory, manifest in items[1:]:
    problem = _incompatibility(manifest["tokenizers"], manifest["row_layout"], first["tokenizers"],
                               first["row_layout"])
    if problem:
      raise ShardError(f"shards in {directory} were made with {problem} than those in {first_dir}: "
                       "they cannot be mixed; tokenize both with the same tokenizers")


def split_files(directory: str, manifest: dict, split: str, dataset: str | None = None) -> list[str]:
  """Paths of one split's shard files (of one dataset, or all), checked to exist with their size."""
  paths = []
  for entry in manifest["files"]:
    if entry["split"] != split or (dataset is not None and entry["dataset"] != dataset):
      continue
    path = os.path.join(directory, entry["name"])
    if not os.path.exists(path):
      raise ShardError(f"shard {path} listed in the manifest is missing; re-run --mode tokenize")
    if os.path.getsize(path) != entry["bytes"]:
      raise ShardError(f"shard {path} has {os.path.getsize(path)} bytes, the manifest says "
                       f"{entry['bytes']}: the file is truncated or was changed; re-run --mode tokenize")
    paths.append(path)
  return paths


def verify(directory: str) -> None:
  """Check every shard file's sha256 against the manifest."""
  manifest = read_manifest(directory)
  for entry in manifest["files"]:
    path = os.path.join(directory, entry["name"])
    split_files(directory, manifest, entry["split"], entry["dataset"])
    if integrity.file_sha256(path) != entry["sha256"]:
      raise ShardError(f"shard {path} does not match its sha256 in the manifest: it is corrupt; "
                       "restore it or re-run --mode tokenize")


def check_replaceable(directory: str, tokenizers: dict | None = None,
                      layout: RowLayout | None = None) -> None:
  """Refuse to replace a folder that is not a shard set, or shards made with other tokenizers."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    return
  if not os.path.exists(os.path.join(directory, MANIFEST)):
    if os.listdir(directory):
      raise ShardError(f"{directory} is not empty and holds no shards ({MANIFEST} missing): "
                       "refusing to replace it; choose an empty or new data.shards_dir")
    return
  if tokenizers is None:
    return
  old = read_manifest(directory)
  problem = _incompatibility(old["tokenizers"], old["row_layout"], tokenizers,
                             vars(layout) if layout is not None else None)
  if problem:
    raise ShardError(f"the shards in {directory} were made with {problem} than this run's; "
                     "checkpoints trained on them would no longer match. Refusing to replace them: "
                     f"choose another data.shards_dir or delete {directory}")


def write(directory: str, rows: dict, layout: RowLayout, tokenizers: dict, datasets: dict,
          records_per_shard: int, include_files: dict | None = None, extra: dict | None = None) -> dict:
  """Write ``rows[(dataset, split)] -> list of row bytes`` and the manifest; returns the manifest.

  ``include_files`` (name inside the set -> source path) are copied in: the tokenizers the rows were
  made with travel with them. Everything is written into a temporary directory that then replaces
  ``directory``, so readers never see half a set. An existing set made with other tokenizers is
  refused, not overwritten.
  """
  directory = os.path.abspath(directory)
  check_replaceable(directory, tokenizers, layout)
  tmp = f"{directory}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    manifest = _write_into(tmp, rows, layout, tokenizers, datasets, records_per_shard,
                           include_files, extra)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(directory):  # swap, then delete: a crash in between leaves one whole set
    old = f"{directory}.old-{os.getpid()}"
    os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old)
  else:
    os.replace(tmp, directory)
  return manifest


def _write_into(tmp, rows, layout, tokenizers, datasets, records_per_shard, include_files, extra):
  from array_record.python import array_record_module

  files, counts = [], {}
  for (dataset, split), records in sorted(rows.items()):
    counts.setdefault(dataset, {})[split] = len(records)
    num_shards = max(1, -(-len(records) // records_per_shard))
    for k in range(num_shards):
      name = f"{dataset}.{split}-{k:05d}-of-{num_shards:05d}.array_record"
      path = os.path.join(tmp, name)
      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      chunk = records[k * records_per_shard:(k + 1) * records_per_shard]
      for record in chunk:
        writer.write(record)
      writer.close()
      files.append({"name": name, "dataset": dataset, "split": split, "records": len(chunk),
                    "bytes": os.path.getsize(path), "sha256": integrity.file_sha256(path)})
  manifest = {"format_version": FORMAT_VERSION, "row_layout": vars(layout), "tokenizers": tokenizers,
              "datasets": datasets, "counts": counts, "files": files, **(extra or {})}
  for name, source in (include_files or {}).items():
    os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
    (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, os.path.join(tmp, name))
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest
