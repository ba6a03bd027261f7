"""Artefacts read back later: a damaged one is named with the way to rebuild it (never a traceback),
a cache whose bytes changed is made again, and a log cut short mid-line loses only that line."""

import json

import numpy as np
import pytest

from medim_jax import errors, evaluate, integrity
from medim_jax.tokenizers import image, text
from medim_jax.training import metric_writer
from tests.test_tokenizers import REPORTS


def damaged_copies(path, tmp_path):
  """The file truncated to half, and with 8 bytes flipped in its middle."""
  data = path.read_bytes()
  truncated = tmp_path / f"truncated_{path.name}"
  truncated.write_bytes(data[:len(data) // 2])
  flipped = bytearray(data)
  middle = len(data) // 2
  flipped[middle:middle + 8] = bytes(b ^ 0xFF for b in flipped[middle:middle + 8])
  flipped_path = tmp_path / f"flipped_{path.name}"
  flipped_path.write_bytes(bytes(flipped))
  return truncated, flipped_path


def test_a_damaged_text_tokenizer_is_one_error_naming_it_and_the_rebuild(tmp_path):
  model = tmp_path / "text.model"
  text.train_sentencepiece(REPORTS, str(model), vocab_size=120)
  truncated, _ = damaged_copies(model, tmp_path)
  with pytest.raises(errors.InputError, match=r"truncated_text.model is not a readable SentencePiece "
                                              r"model .*--mode tokenize into a fresh data.shards_dir"):
    text.load_text_tokenizer(str(truncated))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_image_tokenizer_is_one_error_naming_it_and_the_rebuild(tmp_path, damage):
  images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
  tokenizer = image.PatchKMeansTokenizer.fit(images, codebook_size=6, patch=4, seed=0)
  path = tmp_path / "image.npz"
  tokenizer.save(str(path))
  truncated, flipped = damaged_copies(path, tmp_path)
  damaged = truncated if damage == "truncated" else flipped
  try:
    loaded = image.load_image_tokenizer(str(damaged))
  except errors.InputError as e:
    assert f"{damaged} is not a readable" in str(e) and "--mode tokenize" in str(e)
  else:
    # npz members carry a CRC: numpy reads the flipped file only if the flip missed the arrays.
    np.testing.assert_array_equal(loaded.codebook, tokenizer.codebook)


def test_a_cache_whose_file_changed_since_its_key_was_written_is_made_again(tmp_path, capsys):
  output, key_path = tmp_path / "tokens.npy", tmp_path / "key.txt"
  np.save(output, np.arange(100, dtype=np.int32))
  assert not evaluate.is_cached(str(key_path), "inputs", str(output))  # no key: never made
  evaluate.write_key(str(key_path), "inputs", str(output))
  assert evaluate.is_cached(str(key_path), "inputs", str(output))
  assert not evaluate.is_cached(str(key_path), "other inputs", str(output))
  assert not key_path.exists()  # a stale key goes before the output is rewritten
  evaluate.write_key(str(key_path), "inputs", str(output))
  data = bytearray(output.read_bytes())
  data[-4] ^= 0x01  # one bit of one token: np.load would read it without complaint
  output.write_bytes(bytes(data))
  assert not evaluate.is_cached(str(key_path), "inputs", str(output))
  assert "tokens.npy is not the file its key recorded" in capsys.readouterr().out
  assert not key_path.exists()


def test_cached_generations_are_keyed_by_the_weights_and_the_code_not_only_the_step(tmp_path,
                                                                                     monkeypatch):
  import types
  from configs import demo
  (tmp_path / "manifest.json").write_text("{}")
  dataset = types.SimpleNamespace(directories=[str(tmp_path)])
  split = types.SimpleNamespace(example_id=np.arange(3))
  config = demo.get_config()
  params = {"a": np.ones((3, 4), np.float32), "b": {"c": np.arange(5, dtype=np.float32)}}
  key = lambda params, task="image_to_report": evaluate.generation_key(config, params, dataset,
                                                                       split, task, 700)
  assert key(params) == key({"a": params["a"].copy(), "b": {"c": params["b"]["c"].copy()}})
  assert key(params) != key(params, "report_to_image")
  # A checkpoint trained again to the same step: one weight differs.
  retrained = {"a": params["a"].copy(), "b": {"c": params["b"]["c"].copy()}}
  retrained["b"]["c"][2] += 1e-3
  assert key(params) != key(retrained)
  before = key(params)
  monkeypatch.setattr(evaluate, "generation_code_digest", lambda: "a changed sampler")
  assert key(params) != before
  with config.unlocked():
    config.model.attention_impl = "jax_dot_product"
  monkeypatch.undo()
  assert key(params) != before


def test_a_log_line_cut_short_by_a_crash_is_left_out_and_the_rest_kept(tmp_path, capsys):
  log = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3, 4)]
  log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "spl')
  read = integrity.read_jsonl(str(log))
  assert [row for _, row in read] == rows
  assert "metrics.jsonl line 5 is not a JSON object" in capsys.readouterr().out
  metric_writer._drop_rows_after(str(log), 3)  # what resuming from checkpoint 3 does
  assert [json.loads(line) for line in log.read_text().splitlines()] == rows[:3]


def test_write_text_atomically_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  integrity.write_text_atomically(str(path), "old")
  real_open = open

  def failing_open(name, mode="r", *args, **kwargs):
    handle = real_open(name, mode, *args, **kwargs)
    if "w" in mode:
      handle.write("half")
      handle.close()
      raise OSError("disk full")
    return handle

  monkeypatch.setattr("builtins.open", failing_open)
  with pytest.raises(OSError, match="disk full"):
    integrity.write_text_atomically(str(path), "new")
  monkeypatch.undo()
  assert path.read_text() == "old"
