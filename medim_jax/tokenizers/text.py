"""Text tokenizers behind one interface: ``encode(text, length) -> ids`` and ``decode(ids) -> text``.

Reports are encoded to a fixed number of ids: the pieces, one EOS, then padding. Padding is part
of what the model learns to generate (the original never trains it, so its generated reports run
on to the segment's end); decoding stops at the first EOS.
"""

from __future__ import annotations

import numpy as np


class WordTokenizer:
  """A closed word-level vocabulary, for the procedural smoke data. Id 0 is padding, 1 is EOS."""

  PAD, EOS = "<pad>", "<eos>"

  def __init__(self, words):
    words = list(words)
    if len(set(words)) != len(words):
      raise ValueError("WordTokenizer words must be unique")
    self.vocab = [self.PAD, self.EOS] + [w for w in words if w not in (self.PAD, self.EOS)]
    self.index = {w: i for i, w in enumerate(self.vocab)}
    self.pad_id, self.eos_id = 0, 1

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str, length: int) -> np.ndarray:
    words = text.lower().replace(".", " ").split()
    unknown = [w for w in words if w not in self.index]
    if unknown:
      raise ValueError(f"words {unknown} of {text!r} are not in the vocabulary")
    if len(words) + 1 > length:
      raise ValueError(f"{text!r} needs {len(words) + 1} tokens with EOS; the text segment holds {length}")
    ids = [self.index[w] for w in words] + [self.eos_id]
    return np.asarray(ids + [self.pad_id] * (length - len(ids)), np.int32)

  def decode(self, ids) -> str:
    words = []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i != self.pad_id and 0 <= i < self.vocab_size:
        words.append(self.vocab[i])
    return " ".join(words)
