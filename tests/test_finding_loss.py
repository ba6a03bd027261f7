"""The auxiliary finding loss: its closed form, the labels it reads, and a head that learns to read."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medim_jax import errors
from medim_jax.diffusion import loss as loss_lib
from medim_jax.diffusion.corruption import Corruption
from medim_jax.tokenizers.vocab import TokenLayout


def test_finding_loss_is_the_weighted_bce_over_masked_report_positions_of_whole_labelled_images():
  layout = TokenLayout(text_vocab_size=4, image_vocab_size=4, text_length=2, image_length=2)
  z = np.array([[[1.0, -2.0]] * 4, [[0.5, 0.5]] * 4, [[3.0, 3.0]] * 4], np.float32)  # (B=3, L=4, K=2)
  labels = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  known = np.array([True, True, False])
  #               report    image
  is_masked = np.array([[True, False, False, False],   # row 0: one masked report position, image whole
                        [True, True, True, False],     # row 1: its image is partly masked -> no loss
                        [True, True, False, False]])   # row 2: labels unknown -> no loss
  corruption = Corruption(noisy=jnp.zeros((3, 4), jnp.int32), is_masked=jnp.asarray(is_masked),
                          noised=jnp.asarray(is_masked), loss_mask=jnp.asarray(is_masked),
                          t=jnp.ones((3,)))
  weight = np.array([4.0, 1.0], np.float32)
  loss, metrics = loss_lib.finding_loss(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(known),
                                        corruption, layout, jnp.asarray(weight))
  log_sigmoid = lambda x: -np.log1p(np.exp(-x))
  expected = (-(4.0 * log_sigmoid(1.0)) - log_sigmoid(2.0)) / 2  # row 0, position 0, mean over K
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(metrics["finding_positions"]) == 1


def test_finding_labels_are_looked_up_by_example_id_and_unlabelled_datasets_are_unknown(tmp_path):
  from medim_jax.data import finding_labels, pipeline, tokenize
  from tests.test_shards_and_pipeline import folders_config, make_folder
  make_folder(tmp_path / "a_train", 12, 0)
  make_folder(tmp_path / "a_test", 4, 1)
  make_folder(tmp_path / "b_train", 6, 2)
  make_folder(tmp_path / "b_val", 3, 3)
  truth = {}
  for folder, count in (("a_train", 12), ("a_test", 4)):
    with open(tmp_path / folder / "labels.jsonl", "w") as f:
      for i in range(count):
        truth[(folder, f"case{i:03d}")] = row = {"nodule": i % 3 == 0, "effusion": i == 1}
        f.write(json.dumps({"name": f"case{i:03d}", "labels": row}) + "\n")
  config = folders_config(tmp_path, str(tmp_path / "shards"))
  tokenize.tokenize(config, "unused", progress=False)
  dataset = pipeline.ShardDataset([str(tmp_path / "shards")])

  labels = dataset.finding_labels(["effusion", "nodule"])
  index = [json.loads(line) for line in open(tmp_path / "shards" / "index.jsonl")]
  ids = np.array([e["example_id"] for e in index] + [10_000])  # the last: not in the shards
  batch = labels({"example_id": ids, "tokens": np.zeros((len(ids), 3))})
  assert batch["finding_labels"].dtype == np.float32 and batch["finding_known"].dtype == bool
  for row, entry in enumerate(index):
    folder = {"chest": "a_", "pathology": "b_"}[entry["dataset"]] + entry["split"]
    folder = "a_train" if folder == "a_val" else folder  # chest's val is carved from its train
    if entry["dataset"] == "chest":
      want = truth[(folder, entry["name"])]
      assert batch["finding_known"][row]
      assert batch["finding_labels"][row].tolist() == [want["effusion"], want["nodule"]]
    else:
      assert not batch["finding_known"][row] and not batch["finding_labels"][row].any()
  assert not batch["finding_known"][-1]
  train_rows = [truth[("a_train", e["name"])] for e in index
                if e["dataset"] == "chest" and e["split"] == "train"]
  positives = np.array([[r["effusion"], r["nodule"]] for r in train_rows]).sum(axis=0)
  assert positives.min() >= 1 and len(train_rows) == 9  # negatives / positives per finding:
  np.testing.assert_allclose(labels.positive_weight, (9 - positives) / positives)
  assert isinstance(labels, finding_labels.FindingLabels)

  with pytest.raises(errors.InputError, match="granuloma"):
    dataset.finding_labels(["effusion", "granuloma"])


def test_without_finding_names_the_model_is_unchanged_and_with_them_only_the_head_is_added():
  from configs import demo
  from medim_jax.training import train
  layout = TokenLayout(text_vocab_size=16, image_vocab_size=8, text_length=6, image_length=16)
  config = demo.get_config("tiny")
  config.model.image_embedding_init = "random"
  plain = train.Model(config, layout).init(0)
  config.model.finding_names = "a, b,c"
  with_head = train.Model(config, layout).init(0)
  assert with_head["finding_head"].shape == (config.model.d_model, 3)
  rest = {k: v for k, v in with_head.items() if k != "finding_head"}
  jax.tree.map(np.testing.assert_array_equal, rest, plain)


def test_the_finding_loss_teaches_the_head_to_read_a_finding_carried_by_one_image_token():
  from configs import demo
  from medim_jax.diffusion import sampler as sampler_lib
  from medim_jax.evaluation.demo import clinical
  from medim_jax.training import train

  config = demo.get_config("tiny")
  config.model.image_embedding_init = "random"
  config.model.finding_names = "finding"
  config.diffusion.task_probs = dict(joint=0.0, report_to_image=0.0, image_to_report=1.0,
                                     drop_report=0.0, drop_image=0.0)
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 5
  config.train.num_steps = steps = 80
  layout = TokenLayout(text_vocab_size=16, image_vocab_size=8, text_length=6, image_length=16)
  rng = np.random.default_rng(0)

  def rows(n):
    tokens = layout.join(rng.integers(0, 16, (n, 6)), rng.integers(0, 8, (n, 16)))
    finding = (tokens[:, layout.image_slice][:, 5] - layout.image_offset) < 4
    return tokens, finding

  (tokens, finding), (val_tokens, val_finding) = rows(512), rows(64)
  trainer = train.Trainer(config, layout, finding_positive_weight=[1.0])
  state = trainer.init_state(0)
  for step in range(steps):
    pick = np.random.default_rng([1, step]).integers(0, len(tokens), 32)
    batch = {"tokens": tokens[pick], "valid": np.ones_like(tokens[pick], bool),
             "prompt_length": np.zeros(32, np.int32), "example_id": pick.astype(np.int32),
             "finding_labels": finding[pick, None].astype(np.float32),
             "finding_known": np.ones(32, bool)}
    state, metrics = trainer.train_step(state, batch)
    if step == 0:
      first = float(metrics["finding_loss"])
  assert float(metrics["finding_loss"]) < 0.5 * first
  masked = sampler_lib.task_inputs("image_to_report", val_tokens, np.zeros(64, np.int32), layout)
  sigma = jnp.full((64,), trainer.schedule.sigma(jnp.float32(1.0)))
  with jax.set_mesh(trainer.mesh):
    _, finding_logits = jax.jit(trainer.model.apply_with_findings)(state.params, masked, sigma)
  scores = np.asarray(finding_logits[:, layout.text_slice]).mean(axis=1)
  assert clinical.auc_per_finding(scores, val_finding[:, None])[0] > 0.95
