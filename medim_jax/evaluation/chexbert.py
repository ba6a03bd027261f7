"""CheXbert (Smit et al., 2020) from local files: the 14 CheXpert observations of report text by the
BERT labeler most report-generation papers score with, when a user has its weights.

Nothing is downloaded: ``config.eval.chexbert_checkpoint`` is CheXbert's ``chexbert.pth`` (a torch
pickle holding ``model_state_dict``; reading it needs torch) or the same tensors as ``.npz`` /
``.safetensors``, and ``config.eval.chexbert_tokenizer`` a folder with bert-base-uncased's
``vocab.txt`` (read by the ``tokenizers`` library). The network is the BERT encoder (post-LayerNorm,
exact GELU) in NumPy-shaped JAX, its [CLS] state fed to 14 linear heads: 13 with the classes blank /
positive / negative / uncertain, No Finding with blank / positive. Labels come out in
``chexpert.OBSERVATIONS`` order as 1, 0, -1 or NaN (blank), so ``chexpert.ce_metrics`` scores them.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from medim_jax import errors
from medim_jax.convert import state_dict as state_dict_lib
from medim_jax.evaluation import chexpert

# The order of CheXbert's heads (its constants.CONDITIONS).
CONDITIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
              "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
              "Pleural Other", "Fracture", "Support Devices", "No Finding")
CLASS_LABELS = (np.nan, 1.0, 0.0, -1.0)  # head class -> CheXpert label (blank, pos, neg, uncertain)
MAX_TOKENS = 512
LAYER_NORM_EPS = 1e-12


def _layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + LAYER_NORM_EPS) * scale + bias


def _dense(x, params, name):
  return x @ params[name + ".weight"].T + params[name + ".bias"]


def encode(params: dict, ids: jax.Array, mask: jax.Array, num_layers: int, num_heads: int):
  """[CLS] hidden state (B, H) of the BERT encoder for token ids (B, T) with padding mask (B, T)."""
  p = lambda name: params["bert." + name]
  positions = jnp.arange(ids.shape[1])
  x = p("embeddings.word_embeddings.weight")[ids] + p("embeddings.position_embeddings.weight")[positions]
  x = x + p("embeddings.token_type_embeddings.weight")[0]
  x = _layer_norm(x, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"))
  batch, length, hidden = x.shape
  head_dim = hidden // num_heads
  bias = jnp.where(mask[:, None, None, :], 0.0, -1e9)
  for i in range(num_layers):
    layer = f"bert.encoder.layer.{i}."
    heads = lambda y: y.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)
    q, k, v = (heads(_dense(x, params, layer + f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias
    context = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
    x = _layer_norm(x + _dense(context, params, layer + "attention.output.dense"),
                    params[layer + "attention.output.LayerNorm.weight"],
                    params[layer + "attention.output.LayerNorm.bias"])
    inner = jax.nn.gelu(_dense(x, params, layer + "intermediate.dense"), approximate=False)
    x = _layer_norm(x + _dense(inner, params, layer + "output.dense"),
                    params[layer + "output.LayerNorm.weight"], params[layer + "output.LayerNorm.bias"])
  return x[:, 0]


class CheXbert:
  """The labeler from a checkpoint and a tokenizer folder; ``label_matrix(reports)`` -> (N, 14)."""

  def __init__(self, checkpoint: str, tokenizer_dir: str, batch_size: int = 16):
    vocab = os.path.join(tokenizer_dir, "vocab.txt")
    if not os.path.isfile(vocab):
      raise errors.InputError(f"{vocab} is missing: config.eval.chexbert_tokenizer must be a folder "
                              "with bert-base-uncased's vocab.txt")
    try:
      raw = state_dict_lib.read(checkpoint, "CheXbert checkpoint", wrappers=("model_state_dict",))
    except (FileNotFoundError, ImportError, ValueError) as e:
      raise errors.InputError(str(e)) from None
    # Saved from torch.nn.DataParallel: every name starts with "module.".
    self.params = {k.removeprefix("module."): jnp.asarray(v) for k, v in raw.items()}
    missing = [n for n in ("bert.embeddings.word_embeddings.weight", "linear_heads.13.weight")
               if n not in self.params]
    if missing:
      raise errors.InputError(f"{checkpoint}: not a CheXbert checkpoint (no {missing[0]})")
    self.num_layers = len({k.split(".")[3] for k in self.params if k.startswith("bert.encoder.layer.")})
    hidden = self.params["bert.embeddings.word_embeddings.weight"].shape[1]
    self.num_heads = max(hidden // 64, 1)  # BERT's head size is 64
    from tokenizers import BertWordPieceTokenizer
    self.tokenizer = BertWordPieceTokenizer(vocab, lowercase=True)
    self.tokenizer.enable_truncation(MAX_TOKENS)
    self.batch_size = batch_size
    self._logits = jax.jit(self._head_logits)

  def _head_logits(self, params, ids, mask):
    cls = encode(params, ids, mask, self.num_layers, self.num_heads)
    return [cls @ params[f"linear_heads.{i}.weight"].T + params[f"linear_heads.{i}.bias"]
            for i in range(len(CONDITIONS))]

  def label_matrix(self, reports) -> np.ndarray:
    """(N, 14) float in chexpert.OBSERVATIONS order: 1, 0, -1, or NaN where CheXbert says blank."""
    out = np.full((len(reports), len(chexpert.OBSERVATIONS)), np.nan)
    columns = [chexpert.OBSERVATIONS.index(c) for c in CONDITIONS]
    for start in range(0, len(reports), self.batch_size):
      texts = [" ".join(str(r).split()) for r in reports[start:start + self.batch_size]]
      encoded = self.tokenizer.encode_batch(texts)
      length = max(len(e.ids) for e in encoded)
      ids = np.zeros((len(encoded), length), np.int32)
      mask = np.zeros((len(encoded), length), bool)
      for row, e in enumerate(encoded):
        ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, True
      logits = self._logits(self.params, jnp.asarray(ids), jnp.asarray(mask))
      for head, column in zip(logits, columns):
        out[start:start + len(encoded), column] = np.take(CLASS_LABELS, np.argmax(head, -1))
    return out


@functools.lru_cache(maxsize=1)
def load(checkpoint: str, tokenizer_dir: str) -> CheXbert:
  """The labeler of these files, read and compiled once per process (--mode eval scores every
  dataset with it)."""
  return CheXbert(checkpoint, tokenizer_dir)
