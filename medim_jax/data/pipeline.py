"""The grain input pipeline over shards: per-host slice, shuffle, repeat, mix, batch, prefetch.

Per dataset: ``ArrayRecordDataSource -> [host::hosts] -> shuffle -> repeat -> decode``; datasets
are mixed with the weights of the config, then batched (the per-host share of the global batch)
and, with ``data.worker_count > 0``, prefetched by worker processes. Each host reads a disjoint
slice of every dataset, so together the hosts cover it. The iterator's state (a small dict) goes
into every checkpoint, and restoring it gives exactly the batches that would have come next.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import numpy as np

from medim_jax import errors
from medim_jax.data import shards
from medim_jax.data.base import PairedSplit, fixed_batches
from medim_jax.tokenizers import image as image_tokenizers, text as text_tokenizers
from medim_jax.tokenizers.vocab import TokenLayout


@dataclasses.dataclass(frozen=True)
class Source:
  directory: str
  dataset: str
  paths: tuple[str, ...]
  weight: float
  rows: tuple[int, ...] | None = None  # a subset of the rows (finding oversampling); None: all
  part: str = ""                       # which subset, for the iterator's description


class RowSubset:
  """Some rows of a record source, as a sequence grain can read (picklable for worker processes)."""

  def __init__(self, source, rows):
    self.source, self.rows = source, tuple(rows)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    return self.source[self.rows[index]]


def to_batch(rows: dict, layout: TokenLayout, train_on_padding: bool) -> dict[str, np.ndarray]:
  """Stacked shard rows -> the model's batch (see data/base.py). A row without an image (a
  text-only dataset's) has no valid image position, which makes it a report-only example
  (diffusion/corruption.py); its image segment holds code 0, never shown to the model or scored."""
  no_image = (rows["image"] == shards.NO_IMAGE).all(axis=-1)
  tokens = layout.join(rows["text"], np.where(no_image[:, None], 0, rows["image"]))
  valid = np.ones_like(tokens, bool)
  if not train_on_padding:
    valid[:, layout.text_slice] = rows["text_mask"]
  valid[no_image, layout.image_slice] = False
  return {"tokens": tokens, "valid": valid,
          "prompt_length": rows["prompt_length"].astype(np.int32),
          "example_id": rows["example_id"].astype(np.int32)}


def train_dataset(sources, row_layout: shards.RowLayout, layout: TokenLayout, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  train_on_padding: bool = True, read_threads: int = 4,
                  worker_count: int = 0, repeat: bool = True) -> grain.IterDataset:
  """Batches of this host's share of the global ``batch_size``."""
  if batch_size % process_count:
    raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} hosts")
  per_source = []
  for i, source in enumerate(sources):
    records = grain.sources.ArrayRecordDataSource(list(source.paths))
    if source.rows is not None:
      records = RowSubset(records, source.rows)
    ds = grain.MapDataset.source(records)[process_index::process_count]
    if len(ds) == 0:
      raise ValueError(f"dataset {source.dataset} in {source.directory} has no training rows for "
                       f"host {process_index} of {process_count}")
    ds = ds.shuffle(seed=seed + 7919 * i)
    if repeat:
      ds = ds.repeat()
    per_source.append(ds.map(row_layout.decode))
  weights = [s.weight for s in sources]
  mixed = per_source[0] if len(per_source) == 1 else grain.MapDataset.mix(per_source, weights)
  batched = mixed.batch(batch_size // process_count, drop_remainder=True)
  batched = batched.map(lambda rows: to_batch(rows, layout, train_on_padding))
  iterable = batched.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                       prefetch_buffer_size=2 * read_threads))
  if worker_count > 0:
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iterable


class BatchIterator:
  """A grain iterator whose ``get_state``/``set_state`` go into checkpoints as JSON."""

  def __init__(self, dataset: grain.IterDataset, description: dict):
    self._iterator = iter(dataset)
    self.description = description  # what the state is only valid for

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_state(self) -> dict:
    state = self._iterator.get_state()
    return {"grain": json.loads(json.dumps(state, default=_jsonable)), **self.description}

  def set_state(self, state: dict) -> None:
    saved = {k: state.get(k) for k in self.description}
    if saved != self.description:
      raise errors.InputError(f"the checkpoint's data iterator was saved for {saved}, this run "
                              f"reads {self.description}: resume with the same data, batch size "
                              "and seed")
    self._iterator.set_state(state["grain"])


def _jsonable(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, bytes):
    return value.decode()
  raise TypeError(f"grain iterator state holds a {type(value).__name__}, which JSON cannot store")


class ShardDataset:
  """Tokenized pairs read from one or more shard directories (same tokenizers required)."""

  def __init__(self, directories, weights: dict | None = None, train_on_padding: bool = True,
               read_threads: int = 4, worker_count: int = 0, finding_oversample: float = 1.0):
    self.directories = list(directories)
    self.manifests = {d: shards.read_manifest(d) for d in self.directories}
    shards.check_same_tokenizers(self.manifests)
    first = self.manifests[self.directories[0]]
    self.row_layout = shards.row_layout(first)
    self.text_tokenizer = _load_tokenizer(self.directories[0], first, "text_tokenizer")
    self.image_tokenizer = _load_tokenizer(self.directories[0], first, "image_tokenizer")
    self.layout = TokenLayout(text_vocab_size=self.text_tokenizer.vocab_size,
                              image_vocab_size=self.image_tokenizer.codebook_size,
                              text_length=self.row_layout.text_length,
                              image_length=self.row_layout.image_length)
    self.weights = weights or {}
    if finding_oversample <= 0:
      raise errors.InputError(f"data.finding_oversample must be > 0, got {finding_oversample}")
    self.finding_oversample = float(finding_oversample)
    self.train_on_padding, self.read_threads, self.worker_count = (
        train_on_padding, read_threads, worker_count)
    self._eval = None

  def sources(self, split: str, text_only: bool = False) -> list[Source]:
    """The datasets with rows in ``split``; text-only datasets (reports without images) only
    when ``text_only``: they train, and take no part in anything that reads images."""
    result = []
    for directory, manifest in self.manifests.items():
      for name, info in manifest["datasets"].items():
        if info.get("text_only") and not text_only:
          continue
        paths = shards.split_files(directory, manifest, split, name)
        if paths and manifest["counts"].get(name, {}).get(split, 0) > 0:
          weight = float(self.weights.get(name, info.get("weight", 1.0)))
          if weight > 0:
            source = Source(directory, name, tuple(paths), weight)
            if split == "train" and self.finding_oversample != 1.0:
              result.extend(self._oversample_findings(source, info))
            else:
              result.append(source)
    if not result:
      raise ValueError(f"no {split} rows in {self.directories}")
    return result

  def _oversample_findings(self, source: Source, info: dict) -> list[Source]:
    """The dataset as two sources, training examples with a finding in their labels and without,
    weighted so that an example with a finding is drawn ``finding_oversample`` times as often as
    one without (datasets without a ``labels.jsonl`` are left as they are). Rare findings are few
    (medim-demo: 25% of chest reports have any), so a small model otherwise learns the normal report."""
    from medim_jax.evaluation import ground_truth
    labels = ground_truth.read_labels(info.get("folders", {}).get("train", ""))
    if labels is None:
      return [source]
    index = ground_truth.read_index(source.directory)
    records = grain.sources.ArrayRecordDataSource(list(source.paths))
    positive = []
    for row in range(len(records)):
      name = index[int(self.row_layout.decode(records[row])["example_id"])]["name"]
      positive.append(any(labels.get(name, {}).values()))
    with_finding = tuple(i for i, p in enumerate(positive) if p)
    without = tuple(i for i, p in enumerate(positive) if not p)
    if not with_finding or not without:
      return [source]
    total = self.finding_oversample * len(with_finding) + len(without)
    return [dataclasses.replace(source, rows=rows, part=part,
                                weight=source.weight * share / total)
            for rows, part, share in (
                (with_finding, "with findings",
                 self.finding_oversample * len(with_finding)),
                (without, "without findings", len(without)))]

  def finding_labels(self, names):
    """Every example's labels for ``names`` (data/finding_labels.py), by example id."""
    from medim_jax.data import finding_labels
    if len(self.directories) != 1:
      raise errors.InputError(f"config.model.finding_names needs one shards directory (example ids "
                              f"are per directory); data.shards_dir names {len(self.directories)}")
    directory = self.directories[0]
    return finding_labels.FindingLabels.from_shards(directory, self.manifests[directory], names)

  def train_iterator(self, batch_size: int, seed: int) -> BatchIterator:
    import jax
    sources = self.sources("train", text_only=True)
    dataset = train_dataset(sources, self.row_layout, self.layout, batch_size, seed,
                            jax.process_index(), jax.process_count(), self.train_on_padding,
                            self.read_threads, self.worker_count)
    description = {"sources": [f"{s.directory}:{s.dataset}{':' + s.part if s.part else ''}:{s.weight}"
                               for s in sources],
                   "batch_size": batch_size, "seed": seed, "process_count": jax.process_count()}
    return BatchIterator(dataset, description)

  def read_split(self, split: str) -> dict[str, np.ndarray]:
    """Every row of a split, decoded and stacked; datasets interleaved (a, b, a, b, ...), so the
    first rows cover every dataset."""
    per_source = []
    for source in self.sources(split):
      data = grain.sources.ArrayRecordDataSource(list(source.paths))
      per_source.append([self.row_layout.decode(data[i]) for i in range(len(data))])
    rows = [r for k in range(max(map(len, per_source))) for rs in per_source if k < len(rs)
            for r in [rs[k]]]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  @property
  def eval(self) -> PairedSplit:
    """The validation split in memory (small), for evaluation batches and sampling prompts."""
    if self._eval is None:
      self._eval = self.split("val")
    return self._eval

  def split(self, name: str) -> PairedSplit:
    """One split in memory, datasets interleaved; images are the tokenizer's reconstructions."""
    rows = self.read_split(name)
    batch = to_batch(rows, self.layout, self.train_on_padding)
    prompts = rows["prompt_length"]
    reports = [self.text_tokenizer.decode(ids[n:]) for ids, n in zip(rows["text"], prompts)]
    names = {info["id"]: dataset for manifest in self.manifests.values()
             for dataset, info in manifest["datasets"].items()}
    return PairedSplit(tokens=batch["tokens"], valid=batch["valid"],
                       prompt_length=batch["prompt_length"], example_id=batch["example_id"],
                       reports=reports, images=self.image_tokenizer.decode(rows["image"]),
                       dataset=[names[int(i)] for i in rows["dataset_id"]])

  def eval_batches(self, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    return fixed_batches(self.eval, batch_size, num_batches)


def _load_tokenizer(directory: str, manifest: dict, key: str):
  record = manifest["tokenizers"][key]
  path = record["path"] if os.path.isabs(record["path"]) else os.path.join(directory, record["path"])
  if key == "text_tokenizer":
    tokenizer = text_tokenizers.load_text_tokenizer(path)
  else:
    tokenizer = image_tokenizers.load_image_tokenizer(path)
  if tokenizer.fingerprint != record["fingerprint"]:
    raise shards.ShardError(f"the {key.replace('_', ' ')} at {path} is not the one the shards in "
                            f"{directory} were made with (fingerprint differs): re-run --mode tokenize")
  return tokenizer
