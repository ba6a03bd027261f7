"""The reading probe's scores: closed forms, and a reader told apart from a blind model."""

import numpy as np

from medim_jax.evaluation.demo import clinical, reading_probe


def test_report_scores_sum_each_candidates_log_probs_over_positions():
  log_probs = np.log(np.array([[[0.5, 0.5, 0.0 + 1e-300], [0.1, 0.2, 0.7]]]))  # 1 image, T=2, V=3
  candidates = np.array([[0, 2], [1, 1], [2, 0]])
  expected = [[np.log(0.5) + np.log(0.7), np.log(0.5) + np.log(0.2), np.log(1e-300) + np.log(0.1)]]
  np.testing.assert_allclose(reading_probe.report_scores(log_probs, candidates), expected)


def test_finding_reading_scores_are_differences_of_means_and_nan_without_contrast():
  scores = np.array([[1.0, 2.0, 4.0, 8.0]])
  labels = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]], bool)
  reading = reading_probe.finding_reading_scores(scores, labels)
  assert reading[0, 0] == 1.5 - 6.0
  assert np.isnan(reading[0, 1])  # no candidate has it
  assert reading[0, 2] == 1.0 - 14.0 / 3


def test_ranked_retrieval_picks_the_report_the_image_raises_most_not_the_likeliest():
  # Candidate 0 is the generic report: likeliest under every image, and as likely with none.
  unconditional = np.array([-1.0, -9.0, -9.0])
  scores = np.array([[-1.0, -3.0, -8.0],    # raises candidate 1 by 6 nats
                     [-1.0, -8.5, -2.0],    # raises candidate 2 by 7
                     [-0.5, -9.0, -9.0]])   # raises nothing but the generic one
  assert reading_probe.ranked_retrieval(scores, unconditional).tolist() == [1, 2, 0]
  assert scores.argmax(axis=1).tolist() == [0, 0, 0]


def test_a_reader_scores_auc_one_and_a_blind_model_one_half():
  rng = np.random.default_rng(0)
  vocab, length = 4, 3
  normal, abnormal = np.array([0, 1, 3]), np.array([0, 2, 3])  # one word differs
  candidates = np.stack([normal] * 6 + [abnormal] * 4)
  candidate_labels = np.array([[False]] * 6 + [[True]] * 4)
  image_has_finding = np.array([False, True] * 10)

  def distribution(p_abnormal):
    probs = np.full((length, vocab), 1e-3)
    probs[np.arange(length), normal] = 1.0
    probs[1, 1], probs[1, 2] = 1.0 - p_abnormal, p_abnormal
    return np.log(probs / probs.sum(axis=1, keepdims=True))

  reader = np.stack([distribution(0.8 if f else 0.2) + 0.01 * rng.normal(size=(length, vocab))
                     for f in image_has_finding])
  blind = np.stack([distribution(0.3)] * len(image_has_finding))
  for log_probs, auc in ((reader, 1.0), (blind, 0.5)):
    reading = reading_probe.finding_reading_scores(
        reading_probe.report_scores(log_probs, candidates), candidate_labels)
    assert clinical.auc_per_finding(reading, image_has_finding[:, None])[0] == auc


def test_the_architecture_trained_on_labels_learns_a_finding_carried_by_one_image_token():
  from configs import demo
  from medim_jax.diffusion import sampler as sampler_lib
  from medim_jax.tokenizers.vocab import TokenLayout
  from medim_jax.training import train

  config = demo.get_config("tiny")
  config.model.image_embedding_init = "random"
  layout = TokenLayout(text_vocab_size=16, image_vocab_size=8, text_length=6, image_length=16)
  trainer = train.Trainer(config, layout)
  rng = np.random.default_rng(0)

  def rows(n):
    tokens = layout.join(rng.integers(0, 16, (n, 6)), rng.integers(0, 8, (n, 16)))
    finding = (tokens[:, layout.image_slice][:, 5] - layout.image_offset) < 4
    masked = sampler_lib.task_inputs("image_to_report", tokens, np.zeros(n, np.int32), layout)
    return masked, np.stack([finding, ~finding], axis=1)

  (inputs, labels), (val_inputs, val_labels) = rows(256), rows(64)
  logits = reading_probe.train_on_labels(trainer, None, inputs, labels, val_inputs, steps=60)
  assert logits.shape == (64, 2)
  np.testing.assert_array_less(0.95, clinical.auc_per_finding(logits, val_labels))
