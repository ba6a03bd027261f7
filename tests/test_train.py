"""Training: the loss falls, EMA, save/restore of the whole state, resume == uninterrupted run
(on shard data here; killed and preempted command-line runs in test_reliability)."""

import os

import jax
import numpy as np
import pytest

from configs import smoke
from medim_jax import errors
from medim_jax.data import build as data_build
from medim_jax.models import code_embedding
from medim_jax.tokenizers import image as image_tokenizers
from medim_jax.training import checkpointing, optimizer, train


def tiny_config(**train_overrides):
  config = smoke.get_config("tiny")
  with config.unlocked():
    for key, value in train_overrides.items():
      config.train[key] = value
  return config


@pytest.fixture(scope="module")
def dataset():
  return data_build.build_dataset(tiny_config())


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_training_loss_falls_on_smoke_data(dataset):
  config = tiny_config(learning_rate=3e-3, warmup_steps=5, num_steps=60)
  trainer = train.Trainer(config, dataset.layout)
  state = trainer.init_state(0)
  eval_batches = dataset.eval_batches(16, 2)
  before = trainer.evaluate(state.params, eval_batches)["loss"]
  batches = dataset.train_iterator(16, seed=0)
  for _ in range(60):
    state, metrics = trainer.train_step(state, next(batches))
  after = trainer.evaluate(state.params, eval_batches)["loss"]
  assert np.isfinite(after) and after < 0.7 * before, (before, after)
  assert {"text_loss", "image_loss", "grad_norm", "learning_rate"} <= set(metrics)
  assert float(metrics["text_loss"]) != float(metrics["image_loss"])


def test_appearance_coordinates_closed_form():
  # Three codes on a line in pixel space: one principal direction, the middle code at its centre;
  # scaled so the mean square over 3 x 4 entries is 0.1**2, i.e. 2 c**2 / 12 = 0.01.
  coords = code_embedding.appearance_coordinates([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], 4, 0.1)
  c = 0.1 * np.sqrt(6.0)
  np.testing.assert_allclose(np.abs(coords), [[c, 0, 0, 0], [c, 0, 0, 0], [0, 0, 0, 0]], atol=1e-7)
  assert coords[0, 0] == -coords[1, 0]
  with pytest.raises(ValueError, match="same appearance"):
    code_embedding.appearance_coordinates(np.ones((5, 3)), 4, 0.1)


def test_codebook_embedding_init_moves_only_the_image_code_rows(dataset):
  layout = dataset.layout
  appearance = image_tokenizers.code_appearance(dataset.image_tokenizer)
  plain = train.Trainer(tiny_config(), layout).init_state(0)
  config = tiny_config()
  config.model.image_embedding_init = "codebook"
  trainer = train.Trainer(config, layout)
  state = trainer.init_state(0, dataset.image_tokenizer)

  moved = np.asarray(state.params["embedding"]) - np.asarray(plain.params["embedding"])
  codes = slice(layout.image_offset, layout.image_offset + layout.image_vocab_size)
  np.testing.assert_allclose(moved[codes], code_embedding.appearance_coordinates(
      appearance, config.model.d_model, config.model.init_std), atol=1e-6)
  assert not moved[:layout.image_offset].any() and not moved[codes.stop:].any()
  rest = lambda params: {k: v for k, v in params.items() if k != "embedding"}
  assert_trees_equal(rest(state.params), rest(plain.params))
  with pytest.raises(errors.InputError, match="needs the image tokenizer"):
    trainer.init_state(0)
  three_codes = image_tokenizers.PatchKMeansTokenizer(np.zeros((3, 4 * 4 * 3)), patch=4, image_size=8)
  with pytest.raises(errors.InputError, match="tokenizer has 3 codes"):
    trainer.init_state(0, three_codes)


def test_ema_follows_the_params(dataset):
  config = tiny_config(ema_decay=0.9)
  trainer = train.Trainer(config, dataset.layout)
  state = trainer.init_state(0)
  params_before = jax.tree.map(np.asarray, state.params)
  state, _ = trainer.train_step(state, next(dataset.train_iterator(8, seed=0)))
  want = jax.tree.map(lambda old, new: 0.9 * old + 0.1 * np.asarray(new), params_before, state.params)
  for got, expected in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7)


def test_dropout_changes_the_training_loss_only(dataset):
  """Dropout draws its own key: the times and masks, validation and the rate-0 step stay as they were."""
  plain = train.Trainer(tiny_config(), dataset.layout)
  config = tiny_config()
  config.model.dropout_rate = 0.3
  dropping = train.Trainer(config, dataset.layout)
  params = plain.init_state(0).params
  batch = next(dataset.train_iterator(8, seed=0))
  key = jax.random.PRNGKey(3)
  loss = lambda trainer, training: jax.jit(trainer._loss, static_argnums=3)(params, batch, key,
                                                                             training)[1]
  without = loss(plain, True)
  assert_trees_equal(loss(plain, False), without)  # at rate 0 the same either way
  assert_trees_equal(loss(dropping, False), without)  # validation: no dropout
  trained = loss(dropping, True)
  assert float(trained["loss"]) != float(without["loss"])
  assert float(trained["masked_fraction"]) == float(without["masked_fraction"])


def test_bfloat16_first_moment_keeps_the_steps_close_to_float32(dataset):
  states = {}
  for mu_dtype in ("float32", "bfloat16"):
    trainer = train.Trainer(tiny_config(mu_dtype=mu_dtype, learning_rate=3e-3), dataset.layout)
    state, batches = trainer.init_state(0), dataset.train_iterator(8, seed=0)
    for _ in range(3):
      state, _ = trainer.train_step(state, next(batches))
    states[mu_dtype] = state
  mu = lambda state: jax.tree.leaves(state.opt_state[1][0].mu)
  assert {x.dtype for x in mu(states["bfloat16"])} == {np.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(states["bfloat16"].params)} == {np.dtype("float32")}
  for a, b in zip(jax.tree.leaves(states["float32"].params), jax.tree.leaves(states["bfloat16"].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
  with pytest.raises(errors.InputError, match="mu_dtype"):
    optimizer.make_optimizer(tiny_config(mu_dtype="float8").train)


def test_factored_second_moment_normalises_a_rank_one_gradient_to_its_sign():
  # For g = a b^T Adafactor's row x column estimate of g^2 is exact, and its first step (decay 0)
  # divides g by |g|: the update is -learning_rate * sign(g), with 256 + 128 statistics, not 32,768.
  config = tiny_config(second_moment="factored", warmup_steps=0, learning_rate=0.01,
                       grad_clip_norm=1e9, weight_decay=0.0)
  tx, learning_rate = optimizer.make_optimizer(config.train)
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.5, 2, 256) * rng.choice([-1, 1], 256), rng.uniform(0.5, 2, 128)
  params = {"w": np.zeros((256, 128), np.float32), "bias": np.zeros((128,), np.float32)}
  grads = {"w": np.outer(a, b).astype(np.float32), "bias": np.linspace(-1, 1, 128, dtype=np.float32)}
  state = tx.init(params)
  statistics = sum(x.size for x in jax.tree.leaves(state[1]))
  assert statistics < 256 + 128 + 2 * 128 + 10  # w: row + column means; bias: its own full moment
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], -float(learning_rate(0)) * np.sign(grads["w"]), rtol=1e-5)
  with pytest.raises(errors.InputError, match="second_moment"):
    optimizer.make_optimizer(tiny_config(second_moment="diagonal").train)


def test_checkpoint_round_trips_the_whole_train_state(dataset, tmp_path):
  config = tiny_config(ema_decay=0.5)
  trainer = train.Trainer(config, dataset.layout)
  state = trainer.init_state(0)
  batches = dataset.train_iterator(8, seed=0)
  for _ in range(2):
    state, _ = trainer.train_step(state, next(batches))
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  checkpointer.save(2, state, batches)
  checkpointer.wait()
  fresh_iter = dataset.train_iterator(8, seed=0)
  restored = checkpointer.restore(trainer.abstract_state(), fresh_iter)
  checkpointer.close()
  assert_trees_equal(state, restored)
  assert fresh_iter.get_state() == batches.get_state()
  np.testing.assert_array_equal(next(fresh_iter)["tokens"], next(batches)["tokens"])


def test_a_checkpoint_of_another_model_shape_is_a_clear_error(dataset, tmp_path):
  trainer = train.Trainer(tiny_config(), dataset.layout)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1)
  checkpointer.save(1, trainer.init_state(0))
  checkpointer.wait()
  wider = tiny_config()
  with wider.unlocked():
    wider.model.d_model = 48
  with pytest.raises(ValueError, match="does not match this model: .* is"):
    checkpointer.restore(train.Trainer(wider, dataset.layout).abstract_state())
  checkpointer.close()


class InterruptedDataset:
  """The dataset, but its training iterator dies (like a killed job) when asked for batch ``stop``."""

  def __init__(self, dataset, stop):
    self.dataset, self.stop = dataset, stop

  def __getattr__(self, name):
    return getattr(self.dataset, name)

  def train_iterator(self, batch_size, seed):
    inner, stop = self.dataset.train_iterator(batch_size, seed), self.stop

    class Dying:
      fetched = 0

      def __next__(self):
        if self.fetched + 1 == stop:
          raise KeyboardInterrupt("simulated kill")
        self.fetched += 1
        return next(inner)

      def __getattr__(self, name):
        return getattr(inner, name)

    return Dying()


def test_resume_on_shard_data_replays_the_same_batches(tmp_path):
  """The grain iterator's position travels in the checkpoint: resume == uninterrupted."""
  from medim_jax.data import pipeline, tokenize
  from tests.test_shards_and_pipeline import folders_config, make_folder
  for name, count in (("a_train", 40), ("a_test", 4), ("b_train", 30), ("b_val", 6)):
    make_folder(tmp_path / name, count, len(name) + count)
  config = folders_config(tmp_path, str(tmp_path / "shards"))
  config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = 5, 2, 5
  tokenize.tokenize(config, "unused", progress=False)
  straight = train.train_and_evaluate(config, str(tmp_path / "a"),
                                      pipeline.ShardDataset([str(tmp_path / "shards")]),
                                      progress=False)
  with pytest.raises(KeyboardInterrupt):  # dies fetching batch 4; step 2 was checkpointed
    train.train_and_evaluate(config, str(tmp_path / "b"), InterruptedDataset(
        pipeline.ShardDataset([str(tmp_path / "shards")]), stop=4), progress=False)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2"]
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"),
                                     pipeline.ShardDataset([str(tmp_path / "shards")]),
                                     progress=False)
  assert int(resumed.step) == 5
  assert_trees_equal(straight, resumed)
