"""Smoke data, tokenizers, the batch iterator, and the rule-based smoke scorer."""

import itertools

import numpy as np
import pytest

from configs import smoke as smoke_config
from medim_jax.data import build as data_build, smoke
from medim_jax.evaluation.demo import smoke_scoring
from medim_jax.tokenizers.text import WordTokenizer
from medim_jax.tokenizers.vocab import TokenLayout


@pytest.fixture(scope="module")
def dataset():
  return data_build.build_dataset(smoke_config.get_config("tiny"))


def test_smoke_data_is_deterministic_and_tokens_follow_the_layout(dataset):
  again = data_build.build_dataset(smoke_config.get_config("tiny"))
  np.testing.assert_array_equal(dataset.train.tokens, again.train.tokens)
  layout = dataset.layout
  text, codes = layout.split(dataset.train.tokens)
  assert [dataset.text_tokenizer.decode(t) for t in text[:5]] == dataset.train.reports[:5]
  np.testing.assert_array_equal(dataset.image_tokenizer.encode(dataset.train.images), codes)
  assert not set(dataset.train.example_id) & set(dataset.eval.example_id)


def test_word_tokenizer_round_trip_and_errors():
  tok = WordTokenizer(["a", "red", "cross"])
  ids = tok.encode("a red cross", 6)
  assert ids.tolist() == [2, 3, 4, tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "a red cross"
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.encode("a blue cross", 6)
  with pytest.raises(ValueError, match="needs 4 tokens"):
    tok.encode("a red cross", 3)


def test_token_layout_ids_and_errors():
  layout = TokenLayout(text_vocab_size=10, image_vocab_size=4, text_length=2, image_length=3)
  assert (layout.mask_id, layout.image_offset, layout.vocab_size) == (10, 11, 15)
  joined = layout.join([[1, 2]], [[0, 3, 1]])
  assert joined.tolist() == [[1, 2, 11, 14, 12]]
  text, codes = layout.split(joined)
  assert text.tolist() == [[1, 2]] and codes.tolist() == [[0, 3, 1]]
  with pytest.raises(ValueError, match="image codes must lie"):
    layout.join([[1, 2]], [[0, 4, 1]])


def test_iterator_state_resumes_the_same_batches(dataset):
  it = dataset.train_iterator(4, seed=3)
  next(it)
  state = it.get_state()
  expected = [next(it)["example_id"] for _ in range(3)]
  other = dataset.train_iterator(4, seed=3)
  other.set_state(state)
  np.testing.assert_array_equal(np.stack(expected), np.stack([next(other)["example_id"] for _ in range(3)]))
  with pytest.raises(ValueError, match="different seed"):
    dataset.train_iterator(4, seed=4).set_state(state)


def test_image_reader_recovers_every_rendered_combination():
  for colour, shape, v, h in itertools.product(smoke.COLOURS, smoke.SHAPES, smoke.VERTICAL,
                                               smoke.HORIZONTAL):
    attr = dict(colour=colour, shape=shape, vertical=v, horizontal=h)
    read = smoke_scoring.read_image(smoke.render(attr))
    assert read == {"colour": colour, "shape": shape, "position": f"{v} {h}"}


def test_image_reader_rejects_what_is_not_one_clean_shape():
  cells = smoke.render(dict(colour="red", shape="plus", vertical="top", horizontal="left"))
  cells[5, 5] = 1  # a stray red cell in the opposite corner
  read = smoke_scoring.read_image(cells)
  assert read["shape"] is None and read["position"] is None
  assert smoke_scoring.read_image(np.zeros((6, 6), np.int32)) == {"colour": None, "shape": None, "position": None}


def test_report_reader_and_agreement():
  assert smoke_scoring.read_report("a red plus in the top left") == {
      "colour": "red", "shape": "plus", "position": "top left"}
  assert smoke_scoring.read_report("a red blue plus")["colour"] == "conflicting"
  truth = [{"colour": "red", "shape": "plus", "position": "top left"}] * 4
  predicted = [dict(truth[0]), dict(truth[0], shape="ring"), dict(truth[0], colour=None),
               dict(truth[0], position="top right", shape="cross")]
  scores = smoke_scoring.agreement(predicted, truth)
  assert scores == {"colour_accuracy": 0.75, "shape_accuracy": 0.5, "position_accuracy": 0.75,
                    "all_attributes_accuracy": 0.25}
  unreadable = {"colour": None, "shape": None, "position": None}
  assert smoke_scoring.agreement([unreadable], [unreadable])["all_attributes_accuracy"] == 0.0


@pytest.mark.parametrize("patch", [1, 2, 3])
def test_palette_patch_tokenizer_round_trips_codes_and_pictures(patch):
  from medim_jax.tokenizers.image import PalettePatchTokenizer
  tok = PalettePatchTokenizer(list(smoke.PALETTE.values()), 24, 4, patch=patch)
  assert tok.tokens_per_image == (6 // patch) ** 2
  codes = np.random.default_rng(0).integers(0, tok.codebook_size, (5, tok.tokens_per_image))
  pictures = tok.decode(codes)
  assert pictures.shape == (5, 24, 24, 3) and pictures.dtype == np.uint8
  np.testing.assert_array_equal(tok.encode(pictures), codes)
  with pytest.raises(ValueError, match="images must have shape"):
    tok.encode(pictures[:, :16])
