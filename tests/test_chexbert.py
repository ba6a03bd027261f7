"""CheXbert from local files, on a tiny random BERT the test writes: the encoder against a loop-by-
loop NumPy BERT (and transformers' BertModel where torch is installed), the head-to-label mapping,
and the errors a user sees."""

import math

import numpy as np
import pytest

from medim_jax import errors, evaluate
from medim_jax.evaluation import chexbert, chexpert

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "heart", "is", "enlarged", "no",
         "effusion", ".", "lungs", "are", "clear"]
HIDDEN, LAYERS, INNER, POSITIONS = 128, 2, 64, 40  # 128 / 64 = 2 heads


def tiny_checkpoint(tmp_path, seed=0, heads_bias=None):
  rng = np.random.default_rng(seed)
  w = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
  params = {"bert.embeddings.word_embeddings.weight": w(len(WORDS), HIDDEN),
            "bert.embeddings.position_embeddings.weight": w(POSITIONS, HIDDEN),
            "bert.embeddings.token_type_embeddings.weight": w(2, HIDDEN),
            "bert.embeddings.LayerNorm.weight": 1 + w(HIDDEN), "bert.embeddings.LayerNorm.bias": w(HIDDEN)}
  for i in range(LAYERS):
    layer = f"bert.encoder.layer.{i}."
    for name, (rows, cols) in {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
                               "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
                               "intermediate.dense": (INNER, HIDDEN), "output.dense": (HIDDEN, INNER)}.items():
      params[layer + name + ".weight"], params[layer + name + ".bias"] = w(rows, cols), w(rows)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      params[layer + name + ".weight"], params[layer + name + ".bias"] = 1 + w(HIDDEN), w(HIDDEN)
  for i in range(14):
    classes = 2 if i == 13 else 4
    params[f"linear_heads.{i}.weight"] = w(classes, HIDDEN) * (0 if heads_bias is not None else 1)
    params[f"linear_heads.{i}.bias"] = (np.eye(classes, dtype=np.float32)[heads_bias[i]] * 5
                                        if heads_bias is not None else w(classes))
  path = tmp_path / f"chexbert{seed}.npz"
  np.savez(path, **{"module." + k: v for k, v in params.items()})  # saved from DataParallel
  (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
  return str(path), params


def numpy_bert_cls(params, ids):
  """One report at a time, one head at a time: the BERT encoder's [CLS] state."""
  def norm(x, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * params[name + ".weight"] + params[name + ".bias"]
  linear = lambda x, name: x @ params[name + ".weight"].T + params[name + ".bias"]
  x = (params["bert.embeddings.word_embeddings.weight"][ids]
       + params["bert.embeddings.position_embeddings.weight"][:len(ids)]
       + params["bert.embeddings.token_type_embeddings.weight"][0])
  x = norm(x, "bert.embeddings.LayerNorm")
  heads, size = HIDDEN // 64, 64
  for i in range(LAYERS):
    layer = f"bert.encoder.layer.{i}."
    q, k, v = (linear(x, layer + f"attention.self.{n}") for n in ("query", "key", "value"))
    context = np.zeros_like(x)
    for h in range(heads):
      cols = slice(h * size, (h + 1) * size)
      scores = q[:, cols] @ k[:, cols].T / math.sqrt(size)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      context[:, cols] = (weights / weights.sum(-1, keepdims=True)) @ v[:, cols]
    x = norm(x + linear(context, layer + "attention.output.dense"), layer + "attention.output.LayerNorm")
    inner = linear(x, layer + "intermediate.dense")
    inner = 0.5 * inner * (1 + np.vectorize(math.erf)(inner / math.sqrt(2)))
    x = norm(x + linear(inner, layer + "output.dense"), layer + "output.LayerNorm")
  return x[0]


REPORTS = ["The heart is enlarged.", "No effusion. Lungs are clear.", "the heart"]


def test_the_encoder_and_heads_match_a_numpy_bert_report_by_report(tmp_path):
  checkpoint, params = tiny_checkpoint(tmp_path)
  labeler = chexbert.CheXbert(checkpoint, str(tmp_path), batch_size=2)  # padding in each batch
  encoded = labeler.tokenizer.encode_batch(REPORTS)
  labels = labeler.label_matrix(REPORTS)
  for row, e in enumerate(encoded):
    assert e.tokens[0] == "[CLS]" and e.tokens[-1] == "[SEP]"
    cls = numpy_bert_cls(params, np.array(e.ids))
    for head, condition in enumerate(chexbert.CONDITIONS):
      logits = cls @ params[f"linear_heads.{head}.weight"].T + params[f"linear_heads.{head}.bias"]
      want = chexbert.CLASS_LABELS[int(np.argmax(logits))]
      got = labels[row, chexpert.OBSERVATIONS.index(condition)]
      assert (np.isnan(want) and np.isnan(got)) or want == got, (row, condition)
  batched = chexbert.encode(labeler.params, *map(np.asarray, _padded(encoded)), LAYERS, 2)
  for row, e in enumerate(encoded):
    np.testing.assert_allclose(batched[row], numpy_bert_cls(params, np.array(e.ids)),
                               rtol=2e-4, atol=2e-4)


def _padded(encoded):
  length = max(len(e.ids) for e in encoded)
  ids = np.zeros((len(encoded), length), np.int32)
  mask = np.zeros((len(encoded), length), bool)
  for row, e in enumerate(encoded):
    ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, True
  return ids, mask


def test_head_classes_become_chexpert_labels_in_chexpert_order(tmp_path):
  # Head i always answers class i % 4 (blank, positive, negative, uncertain); No Finding: positive.
  classes = [i % 4 for i in range(13)] + [1]
  checkpoint, _ = tiny_checkpoint(tmp_path, heads_bias=classes)
  labels = chexbert.CheXbert(checkpoint, str(tmp_path)).label_matrix(REPORTS)
  for head, condition in enumerate(chexbert.CONDITIONS):
    column = labels[:, chexpert.OBSERVATIONS.index(condition)]
    want = chexbert.CLASS_LABELS[classes[head]]
    assert np.isnan(column).all() if np.isnan(want) else (column == want).all(), condition
  assert (labels[:, chexpert.OBSERVATIONS.index("No Finding")] == 1).all()
  # Scored as --mode eval scores them, under the labeler's name.
  labeler = chexbert.load(checkpoint, str(tmp_path))
  assert chexbert.load(checkpoint, str(tmp_path)) is labeler  # read and compiled once
  result = evaluate.chexpert_efficacy(REPORTS, REPORTS, REPORTS, labeler.label_matrix, "CheXbert")
  assert result["labeler"] == "CheXbert"
  assert result["uncertain as negative"]["MeDiM"]["Cardiomegaly"]["f1"] == 1.0


def test_missing_or_wrong_files_are_one_clear_error(tmp_path):
  checkpoint, _ = tiny_checkpoint(tmp_path)
  with pytest.raises(errors.InputError, match="vocab.txt is missing"):
    chexbert.CheXbert(checkpoint, str(tmp_path / "nowhere"))
  np.savez(tmp_path / "other.npz", weight=np.zeros(3))
  with pytest.raises(errors.InputError, match="not a CheXbert checkpoint"):
    chexbert.CheXbert(str(tmp_path / "other.npz"), str(tmp_path))
  with pytest.raises(errors.InputError, match="does not exist"):
    chexbert.CheXbert(str(tmp_path / "absent.pth"), str(tmp_path))


def test_the_encoder_matches_transformers_bert_where_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  checkpoint, params = tiny_checkpoint(tmp_path)
  config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=2, intermediate_size=INNER,
                                   max_position_embeddings=POSITIONS, hidden_act="gelu")
  model = transformers.BertModel(config, add_pooling_layer=False).eval()
  model.load_state_dict({k.removeprefix("bert."): torch.from_numpy(v) for k, v in params.items()
                         if k.startswith("bert.")}, strict=False)
  labeler = chexbert.CheXbert(checkpoint, str(tmp_path))
  ids, mask = _padded(labeler.tokenizer.encode_batch(REPORTS))
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())[0][:, 0]
  np.testing.assert_allclose(chexbert.encode(labeler.params, ids, mask, LAYERS, 2), want.numpy(),
                             rtol=2e-4, atol=2e-4)
