"""Text tokenizers (SentencePiece trained here, a Hugging Face directory written here) and the patch
quantiser: round trips, fixed-length rows, fingerprints."""

import numpy as np
import pytest

from medim_jax.tokenizers import image, text

REPORTS = [f"the {organ} is {state}. no {finding} is seen."
           for organ in ("heart", "left lung", "right lung", "mediastinum")
           for state in ("normal", "enlarged", "clear", "stable")
           for finding in ("pneumothorax", "effusion", "nodule", "consolidation")]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "text.model"
  return text.train_sentencepiece(REPORTS, str(path), vocab_size=120)


def test_sentencepiece_round_trip_and_fixed_length(sentencepiece_tokenizer):
  tok = sentencepiece_tokenizer
  assert (tok.pad_id, tok.eos_id) == (0, 1) and tok.vocab_size <= 120
  for report in REPORTS[:8]:
    ids = tok.encode(report, 40)
    assert ids.shape == (40,) and ids.dtype == np.int32
    n = len(tok.tokenize(report))
    assert ids[n] == tok.eos_id and (ids[n + 1:] == tok.pad_id).all()
    assert tok.decode(ids) == report
  assert "▁pneumothorax" in tok.processor.encode(REPORTS[0], out_type=str)  # medical words whole
  with pytest.raises(ValueError, match="do not fit"):
    tok.encode(REPORTS[0], 4)
  cut = tok.encode(REPORTS[0], 4, truncate=True)
  assert list(cut) == tok.tokenize(REPORTS[0])[:4]


def test_sentencepiece_training_is_deterministic_and_fingerprinted(tmp_path, sentencepiece_tokenizer):
  again = text.train_sentencepiece(REPORTS, str(tmp_path / "again.model"), vocab_size=120)
  assert again.fingerprint == sentencepiece_tokenizer.fingerprint
  other = text.train_sentencepiece(REPORTS[:20], str(tmp_path / "other.model"), vocab_size=60)
  assert other.fingerprint != sentencepiece_tokenizer.fingerprint
  loaded = text.load_text_tokenizer(str(tmp_path / "again.model"))
  assert isinstance(loaded, text.SentencePieceTokenizer) and loaded.fingerprint == again.fingerprint


def test_hugging_face_directory_round_trip(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  words = sorted({w for r in REPORTS for w in r.replace(".", " .").split()})
  vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  backend.decoder = tokenizers.decoders.WordPiece()  # joins tokens with spaces
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")
  fast.save_pretrained(str(tmp_path))

  tok = text.load_text_tokenizer(str(tmp_path))
  assert isinstance(tok, text.HuggingFaceTokenizer)
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, len(vocab))
  report = "the heart is normal . no effusion is seen ."
  ids = tok.encode(report, 16)
  assert list(ids[:10]) == [vocab[w] for w in report.split()] and ids[10] == 1
  assert tok.decode(ids) == "the heart is normal. no effusion is seen."  # HF's space clean-up
  assert tok.fingerprint.startswith("huggingface:")


def test_text_tokenizer_paths_that_are_not_tokenizers(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a SentencePiece"):
    text.load_text_tokenizer(str(tmp_path / "missing.bin"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model is not a readable SentencePiece model"):
    text.load_text_tokenizer(str(tmp_path / "bad.model"))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
    text.load_text_tokenizer(str(tmp_path / "empty_dir"))


def test_patch_quantiser_round_trip_save_and_load(tmp_path):
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256, (6, 4 * 4 * 3)).astype(np.float32)  # six distinct 4x4 patches
  codes = rng.integers(0, 6, (20, 16))
  maker = image.PatchKMeansTokenizer(blocks, patch=4, image_size=16)
  images = maker.decode(codes)
  assert images.shape == (20, 16, 16, 3)

  fitted = image.PatchKMeansTokenizer.fit(images, codebook_size=6, patch=4, seed=0)
  recon = fitted.decode(fitted.encode(images))
  np.testing.assert_array_equal(recon, images)  # the images are made of 6 patches: k-means finds them
  assert fitted.tokens_per_image == 16 and fitted.codebook_size == 6

  fitted.save(str(tmp_path / "image.npz"))
  loaded = image.PatchKMeansTokenizer.load(str(tmp_path / "image.npz"))
  assert loaded.fingerprint == fitted.fingerprint
  np.testing.assert_array_equal(loaded.encode(images), fitted.encode(images))
  with pytest.raises(ValueError, match=r"images must have shape \(B, 16, 16, 3\)"):
    fitted.encode(images[:, :8])
  # What each code looks like, read back through decode alone: here the codebook blocks themselves.
  np.testing.assert_allclose(image.code_appearance(maker, chunk=4), blocks / 255.0, atol=1e-6)
