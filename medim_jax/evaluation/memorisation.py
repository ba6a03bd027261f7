"""Does a generator copy its training set? Each generated sample's nearest training sample.

- Images: the nearest training image by RMSE in pixel space (``nearest_images``), or by L2 or
  cosine distance in a feature space the caller supplies (``nearest_features``). A generated image
  much closer to a training image than held-out real images are (run the same function on the
  test split for that reference) is likely a copy.
- Reports: the longest run of words a generated report shares verbatim with any one training
  report (``longest_shared_ngrams``). Words are lower-cased alphanumeric runs; punctuation is
  ignored. Binary search on the length n: a shared run of n words contains shared runs of every
  shorter length, so "is some n-gram shared?" flips from yes to no once. Each probe looks the
  query's n-grams up in a sorted table of the training corpus's n-gram hashes (two 31-bit
  polynomial hashes, built once per n), and a hit is checked word by word, so the answer is exact.

Both results carry ``summary()`` (quantiles) and ``most_suspicious(k)`` (closest / longest first).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import numpy as np


def quantiles(values) -> dict[str, float]:
  values = np.asarray(values, np.float64)
  if not values.size:
    return {}
  names = ("min", "p05", "p25", "median", "p75", "p95", "max")
  q = np.percentile(values, [0, 5, 25, 50, 75, 95, 100])
  return {**{name: float(v) for name, v in zip(names, q)}, "mean": float(values.mean())}


# ---------------------------------------------------------------------------------------------
# Images.


def nearest_neighbours(queries, keys, metric: str = "l2", chunk: int = 256):
  """(distance, index) of each query row's nearest key row; metric "l2" (Euclidean) or "cosine"
  (1 - cosine similarity). Chunked over both sides, so memory stays at chunk x chunk distances
  plus one chunk of each side in float64. For integer-valued inputs (uint8 images) the L2
  distances are exact: every sum stays below 2^53."""
  if metric not in ("l2", "cosine"):
    raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
  queries = np.asarray(queries).reshape(len(queries), -1)
  keys = np.asarray(keys).reshape(len(keys), -1)
  if queries.shape[1] != keys.shape[1] or not len(keys):
    raise ValueError(f"queries {queries.shape} and keys {keys.shape} must be non-empty rows of one "
                     "length")
  best = np.full(len(queries), np.inf)
  index = np.zeros(len(queries), np.int64)

  def prepared(rows):
    rows = rows.astype(np.float64)
    if metric == "cosine":
      rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return rows, (rows ** 2).sum(axis=1)

  for k_lo in range(0, len(keys), chunk):
    k, k_sq = prepared(keys[k_lo:k_lo + chunk])
    for q_lo in range(0, len(queries), chunk):
      q, q_sq = prepared(queries[q_lo:q_lo + chunk])
      if metric == "cosine":
        d = 1.0 - q @ k.T
      else:
        d = q_sq[:, None] + k_sq[None] - 2.0 * (q @ k.T)
      j = d.argmin(axis=1)
      d_min = d[np.arange(len(q)), j]
      better = d_min < best[q_lo:q_lo + chunk]     # strict: ties keep the earlier key
      best[q_lo:q_lo + chunk][better] = d_min[better]
      index[q_lo:q_lo + chunk][better] = j[better] + k_lo
  best = np.maximum(best, 0.0)
  return (np.sqrt(best) if metric == "l2" else best), index


@dataclasses.dataclass
class NearestTraining:
  """Per generated sample: the distance to its nearest training sample and that sample's index."""
  distance: np.ndarray      # float [G]
  index: np.ndarray         # int [G], into the training set
  metric: str

  def summary(self) -> dict[str, float]:
    return quantiles(self.distance)

  def most_suspicious(self, k: int) -> list[dict]:
    """The k generated samples closest to a training sample, closest first."""
    order = np.argsort(self.distance, kind="stable")[:k]
    return [{"generated": int(i), "train": int(self.index[i]), "distance": float(self.distance[i])}
            for i in order]


def nearest_images(generated, train, chunk: int = 256) -> NearestTraining:
  """Pixel-space RMSE (in the images' own units, e.g. 0..255 for uint8) to the nearest training
  image; images [N, H, W, C] of one shape."""
  generated, train = np.asarray(generated), np.asarray(train)
  if generated.shape[1:] != train.shape[1:]:
    raise ValueError(f"generated {generated.shape[1:]} and train {train.shape[1:]} images differ "
                     "in shape")
  distance, index = nearest_neighbours(generated, train, "l2", chunk)
  return NearestTraining(distance / np.sqrt(np.prod(train.shape[1:])), index, "pixel_rmse")


def nearest_features(generated_features, train_features, metric: str = "l2",
                     chunk: int = 256) -> NearestTraining:
  """L2 or cosine distance to the nearest training sample in a given feature space [N, D]."""
  distance, index = nearest_neighbours(generated_features, train_features, metric, chunk)
  return NearestTraining(distance, index, f"feature_{metric}")


# ---------------------------------------------------------------------------------------------
# Reports.

_MODULI = (2_147_483_647, 1_000_000_007)    # primes below 2^31: products fit in int64
_BASES = (911_382_323, 972_663_749)


def words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def _prefix_hashes(ids: np.ndarray) -> list[np.ndarray]:
  out = []
  for mod, base in zip(_MODULI, _BASES):
    h = np.zeros(len(ids) + 1, np.int64)
    acc = 0
    for i, w in enumerate(ids.tolist()):
      acc = (acc * base + w) % mod
      h[i + 1] = acc
    out.append(h)
  return out


@dataclasses.dataclass
class SharedNgrams:
  """Per generated report: the longest word run it shares with one training report."""
  length: np.ndarray        # int [G], in words (0: not even one word in common)
  index: np.ndarray         # int [G], the training report holding it (-1 when length is 0)
  ngram: list[str]          # the shared words, space-joined
  report_words: np.ndarray  # int [G], words in each generated report

  def summary(self) -> dict[str, float]:
    fraction = self.length / np.maximum(self.report_words, 1)
    return {**{f"length_{k}": v for k, v in quantiles(self.length).items()},
            **{f"fraction_{k}": v for k, v in quantiles(fraction).items()},
            # Whole generated report found verbatim inside a training report.
            "copied_whole": float(np.mean((self.length == self.report_words)
                                          & (self.report_words > 0))) if len(self.length) else 0.0}

  def most_suspicious(self, k: int) -> list[dict]:
    """The k generated reports sharing the longest runs, longest first."""
    order = np.argsort(-self.length, kind="stable")[:k]
    return [{"generated": int(i), "train": int(self.index[i]), "length": int(self.length[i]),
             "ngram": self.ngram[i]} for i in order]


class NgramIndex:
  """The training reports' word sequences, for exact longest-shared-run queries."""

  def __init__(self, train_reports: Sequence[str], cache_size: int = 64):
    self.vocab: dict[str, int] = {}
    docs = [self._ids(words(r), grow=True) for r in train_reports]
    # One corpus with a 0 between reports: no query word has id 0, so no match spans two reports.
    pieces = [np.zeros(1, np.int64)]
    for d in docs:
      pieces += [d, np.zeros(1, np.int64)]
    self.corpus = np.concatenate(pieces)
    self.doc_starts = np.cumsum([1] + [len(d) + 1 for d in docs])[:-1]
    self.max_length = max((len(d) for d in docs), default=0)
    self.hashes = _prefix_hashes(self.corpus)
    self._tables: collections.OrderedDict = collections.OrderedDict()
    self._cache_size = cache_size

  def _ids(self, tokens: list[str], grow: bool = False) -> np.ndarray:
    if grow:
      for t in tokens:
        self.vocab.setdefault(t, len(self.vocab) + 1)
    # Words never seen in training get -1: they match nothing.
    return np.array([self.vocab.get(t, -1) for t in tokens], np.int64)

  @staticmethod
  def _keys(hashes: list[np.ndarray], n: int) -> np.ndarray:
    """One int64 key per n-gram start: the two n-gram hashes side by side."""
    parts = []
    for h, mod, base in zip(hashes, _MODULI, _BASES):
      power = pow(base, n, mod)
      parts.append((h[n:] - (h[:-n] * power) % mod) % mod)
    return (parts[0] << 31) | parts[1]

  def _table(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n in self._tables:
      self._tables.move_to_end(n)
      return self._tables[n]
    keys = self._keys(self.hashes, n)
    order = np.argsort(keys, kind="stable")
    self._tables[n] = (keys[order], order)
    if len(self._tables) > self._cache_size:
      self._tables.popitem(last=False)
    return self._tables[n]

  def _find(self, ids: np.ndarray, hashes, n: int) -> tuple[int, int] | None:
    """(query offset, corpus position) of an n-gram of ``ids`` found in training, or None."""
    sorted_keys, order = self._table(n)
    query_keys = self._keys(hashes, n)
    left = np.searchsorted(sorted_keys, query_keys, "left")
    right = np.searchsorted(sorted_keys, query_keys, "right")
    for i in np.flatnonzero(right > left):
      for position in order[left[i]:right[i]]:
        if np.array_equal(self.corpus[position:position + n], ids[i:i + n]):  # not a collision
          return int(i), int(position)
    return None

  def longest_match(self, report: str) -> tuple[int, int, str]:
    """(length in words, training report index or -1, the shared words)."""
    tokens = words(report)
    ids = self._ids(tokens)
    hashes = _prefix_hashes(ids)
    lo, hi, match = 0, min(len(ids), self.max_length), None
    while lo < hi:
      mid = (lo + hi + 1) // 2
      found = self._find(ids, hashes, mid)
      if found is None:
        hi = mid - 1
      else:
        lo, match = mid, found
    if not lo:
      return 0, -1, ""
    offset, position = match
    doc = int(np.searchsorted(self.doc_starts, position, "right") - 1)
    return lo, doc, " ".join(tokens[offset:offset + lo])


def longest_shared_ngrams(generated_reports: Sequence[str],
                          train_reports: Sequence[str] | NgramIndex) -> SharedNgrams:
  """For each generated report, the longest verbatim word run shared with one training report."""
  index = train_reports if isinstance(train_reports, NgramIndex) else NgramIndex(train_reports)
  results = [index.longest_match(r) for r in generated_reports]
  return SharedNgrams(np.array([r[0] for r in results], np.int64),
                      np.array([r[1] for r in results], np.int64), [r[2] for r in results],
                      np.array([len(words(r)) for r in generated_reports], np.int64))
