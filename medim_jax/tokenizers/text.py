"""Text tokenizers behind one interface: ``tokenize(text) -> ids``, ``encode(text, length) -> ids``,
``decode(ids) -> text``, with ``vocab_size``, ``pad_id``, ``eos_id`` and a ``fingerprint`` that
shards record so that ids made by one tokenizer are never read with another.

Reports are encoded to a fixed number of ids: the pieces, one EOS, then padding. Padding is part
of what the model learns to generate (the original never trains it, so its generated reports run
on to the segment's end); decoding stops at the first EOS.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from medim_jax import integrity


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
    self.fingerprint = "words:" + hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def tokenize(self, text: str) -> list[int]:
    words = text.lower().replace(".", " ").split()
    unknown = [w for w in words if w not in self.index]
    if unknown:
      raise ValueError(f"words {unknown} of {text!r} are not in the vocabulary")
    return [self.index[w] for w in words]

  def encode(self, text: str, length: int, truncate: bool = False) -> np.ndarray:
    ids = self.tokenize(text)
    if len(ids) + 1 > length and not truncate:
      raise ValueError(f"{text!r} needs {len(ids) + 1} tokens with EOS; the text segment holds {length}")
    return fixed_length(ids, length, self.eos_id, self.pad_id, truncate)

  def decode(self, ids) -> str:
    words = []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i != self.pad_id and 0 <= i < self.vocab_size:
        words.append(self.vocab[i])
    return " ".join(words)


def fixed_length(ids, length: int, eos_id: int, pad_id: int, truncate: bool = False) -> np.ndarray:
  """ids + EOS + padding to ``length``; too long: an error, or (truncate) the first ``length`` ids."""
  ids = list(ids)
  if len(ids) + 1 > length:
    if not truncate:
      raise ValueError(f"{len(ids)} ids + EOS do not fit the text segment of {length}")
    return np.asarray(ids[:length], np.int32)
  return np.asarray(ids + [eos_id] + [pad_id] * (length - len(ids) - 1), np.int32)


class _PieceTokenizer:
  """What a tokenizer of reports adds to ``tokenize``: fixed-length rows and their content ids."""

  def encode(self, text: str, length: int, truncate: bool = False) -> np.ndarray:
    return fixed_length(self.tokenize(text), length, self.eos_id, self.pad_id, truncate)

  def content_ids(self, ids) -> list[int]:
    """The ids before the first EOS, without padding or out-of-vocabulary ids."""
    ids = np.asarray(ids).tolist()
    ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
    return [i for i in ids if i != self.pad_id and 0 <= i < self.vocab_size]


class SentencePieceTokenizer(_PieceTokenizer):
  """A local SentencePiece ``.model``. Padding is the model's pad id, or 0 when it has none (as the
  original pads Llama-2 ids with 0); EOS is the model's EOS id."""

  def __init__(self, model_path: str):
    import sentencepiece
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path} does not exist")
    with open(model_path, "rb") as f:
      proto = f.read()
    try:
      self.processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
      from medim_jax import errors
      raise errors.InputError(f"{model_path} is not a readable SentencePiece model "
                              f"({str(e).splitlines()[0][:200]}); rebuild it: --mode tokenize into a "
                              "fresh data.shards_dir") from None
    if self.processor.eos_id() < 0:
      raise ValueError(f"SentencePiece model {model_path} has no EOS piece; reports need one")
    self.path = model_path
    self.pad_id = self.processor.pad_id() if self.processor.pad_id() >= 0 else 0
    self.eos_id = self.processor.eos_id()
    self.fingerprint = "sentencepiece:" + hashlib.sha256(proto).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def tokenize(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def decode(self, ids) -> str:
    return self.processor.decode(self.content_ids(ids))


class HuggingFaceTokenizer(_PieceTokenizer):
  """A local Hugging Face tokenizer directory (``tokenizer.json`` and/or ``tokenizer.model``), read
  with ``transformers`` and never downloaded. Padding falls back to 0 when the tokenizer has none."""

  FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
           "vocab.json", "merges.txt")

  def __init__(self, directory: str):
    import transformers
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"Hugging Face tokenizer directory {directory} does not exist")
    files = [os.path.join(directory, f) for f in self.FILES if os.path.exists(os.path.join(directory, f))]
    if not files:
      raise FileNotFoundError(f"{directory} holds none of {self.FILES}: not a tokenizer directory")
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"{directory}: transformers cannot load this tokenizer: {e}") from None
    if self.tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer in {directory} has no EOS token; reports need one")
    self.path = directory
    self.eos_id = self.tokenizer.eos_token_id
    self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    self.fingerprint = "huggingface:" + integrity.files_sha256(files)

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def tokenize(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)

  def decode(self, ids) -> str:
    return self.tokenizer.decode(self.content_ids(ids), skip_special_tokens=True)




def train_sentencepiece(texts, model_path: str, vocab_size: int) -> SentencePieceTokenizer:
  """Train a BPE SentencePiece model (pad 0, EOS 1, unk 2, no BOS) on ``texts``; deterministic.

  A small vocabulary still keeps common medical words whole ("cardiomegaly", "pneumothorax").
  ``vocab_size`` is an upper bound: a small corpus may give fewer pieces.
  """
  import sentencepiece
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("cannot train a SentencePiece model on no text")
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, split_digits=True,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = model_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)
  return SentencePieceTokenizer(model_path)


def load_text_tokenizer(path: str):
  """A ``.model`` file -> SentencePiece; a directory -> Hugging Face tokenizer."""
  if os.path.isdir(path):
    return HuggingFaceTokenizer(path)
  if path.endswith(".model") or os.path.isfile(path):
    return SentencePieceTokenizer(path)
  raise FileNotFoundError(f"text tokenizer {path!r} is neither a SentencePiece .model file nor a "
                          "Hugging Face tokenizer directory")
