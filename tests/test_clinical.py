"""Clinical agreement (report finding extractor, image finding classifier, F1, baselines) and the
memorisation checks. All report text here is made up for the tests."""

import numpy as np
import pytest

from medim_jax.data.iu_reports import FINDINGS
from medim_jax.evaluation import memorisation
from medim_jax.evaluation.demo import clinical


def found(report: str) -> set[str]:
  return {f for f, present in clinical.extract_findings(report).items() if present}


@pytest.mark.parametrize("report, expected", [
    ("No pleural effusion.", set()),
    ("Small left pleural effusion.", {"pleural_effusion"}),
    ("No pneumothorax or effusion.", set()),
    ("No effusion but there is a nodule in the right upper zone.", {"nodule"}),
    ("Heart size is normal.", set()),
    ("The heart is enlarged.", {"cardiomegaly"}),
    ("Normal cardiomediastinal silhouette. Lungs clear.", set()),
    ("There is no pneumothorax, effusion, or focal consolidation.", set()),
    ("The heart is not enlarged.", set()),
    ("Moderate cardiomegaly; negative for pneumothorax.", {"cardiomegaly"}),
    ("Without focal airspace disease. Enlarged cardiac silhouette.", {"cardiomegaly"}),
    ("The earlier effusion has resolved.", set()),
    ("A pneumothorax is not seen.", set()),
    ("Lungs free of infiltrate, however a 1 cm mass projects over the left base.", {"nodule"}),
    ("No evidence of consolidation. Patchy atelectasis at the right base.", {"opacity"}),
    ("No change in the calcified granuloma of the left apex.", {"calcified_granuloma"}),
    ("Right apical pneumothorax with a small effusion.", {"pneumothorax", "pleural_effusion"}),
    ("No pericardial effusion.", set()),
    ("Pericardial effusion.", set()),
    ("Possible tiny nodule, follow-up suggested.", set()),
])
def test_extract_findings_handles_negation_scope(report, expected):
  assert found(report) == expected


def test_hedged_mentions_count_only_when_asked():
  report = "Opacity at the left base may represent pneumonia or a mass."
  assert clinical.extract_findings(report)["nodule"] is False
  assert clinical.extract_findings(report, count_hedged=True)["nodule"] is True
  matrix = clinical.extract_matrix([report, "Cardiomegaly."])
  assert matrix.shape == (2, len(FINDINGS)) and matrix.dtype == bool
  np.testing.assert_array_equal(matrix[1], [f == "cardiomegaly" for f in FINDINGS])
  chosen = clinical.extract_matrix([report, "Cardiomegaly."], findings=("opacity", "cardiomegaly"))
  np.testing.assert_array_equal(chosen, [[True, False], [False, True]])


def test_f1_table_exact_values_and_zero_support_convention():
  true = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
  pred = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 0]], bool)
  table = clinical.f1_table(pred, true, ("a", "b", "c"))
  # a: tp 1, fp 0, fn 1 -> P 1, R 1/2, F1 2/3.  b: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 4/5.
  assert table["a"]["precision"] == 1.0 and table["a"]["recall"] == 0.5
  assert table["a"]["f1"] == pytest.approx(2 / 3)
  assert table["b"]["precision"] == pytest.approx(2 / 3) and table["b"]["recall"] == 1.0
  assert table["b"]["f1"] == pytest.approx(4 / 5) and table["b"]["accuracy"] == 0.75
  # c: no true positives anywhere, one false alarm: F1 undefined, left out of the macro average.
  assert table["c"]["support"] == 0 and table["c"]["predicted"] == 1
  assert np.isnan(table["c"]["f1"]) and np.isnan(table["c"]["recall"])
  assert table["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
  # micro: tp 3, predicted 5, support 4 -> 6 / 9.
  assert table["micro_f1"] == pytest.approx(6 / 9)
  assert table["exact_match"] == 0.25
  # With positives but no predictions the scores are 0, not undefined.
  silent = clinical.f1_table(np.zeros_like(true), true, ("a", "b", "c"))
  assert silent["a"]["precision"] == silent["a"]["f1"] == 0.0 and silent["macro_f1"] == 0.0


def test_majority_and_retrieval_baselines():
  train = np.array([[0, 1], [1, 0], [0, 1], [0, 0], [1, 0], [0, 1]], bool)
  np.testing.assert_array_equal(clinical.majority_baseline(train, 3), [[False, True]] * 3)
  keys = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
  queries = np.array([[5.0, 0.5], [0.1, 0.3], [-0.5, -0.5]])
  indices, reports = clinical.retrieval_baseline(queries, keys, ["right", "up", "down"])
  assert indices.tolist() == [0, 1, 2] and reports == ["right", "up", "down"]
  # By L2 the first query (far along x) is still nearest to key 0; [0.1, 0.3] is nearest key 0.
  assert clinical.retrieval_baseline(queries, keys, metric="l2").tolist() == [0, 0, 2]


def test_nearest_images_exact_rmse_and_index():
  train = np.zeros((3, 2, 2, 1), np.uint8)
  train[1] += 10
  train[2, 0, 0, 0] = 200
  generated = np.stack([np.full((2, 2, 1), 9, np.uint8), train[2]])
  result = memorisation.nearest_images(generated, train, chunk=2)
  assert result.index.tolist() == [1, 2]
  assert result.distance.tolist() == [1.0, 0.0]   # every pixel off by 1; an exact copy
  assert result.most_suspicious(1) == [{"generated": 1, "train": 2, "distance": 0.0}]
  assert result.summary()["max"] == 1.0
  features = memorisation.nearest_features(np.array([[3.0, 4.0]]), np.array([[0.0, 0.0],
                                                                            [3.0, 0.0]]))
  assert features.index.tolist() == [1] and features.distance.tolist() == [4.0]


def test_longest_shared_ngram_exact_lengths():
  train = ["The red kite circled over the quiet valley at dawn.",
           "A small boat drifted past the harbour wall, then the quiet valley slept."]
  generated = ["Over the quiet valley at dawn, bells rang.",       # 6 words from report 0
               "Boats drifted past the harbour.",                  # 'drifted past the harbour'
               "Nothing here matches.",
               "A small boat drifted past the harbour wall",       # whole report copied
               "dawn a small boat"]                                # must not join two reports
  result = memorisation.longest_shared_ngrams(generated, train)
  assert result.length.tolist() == [6, 4, 0, 8, 3]
  assert result.index.tolist() == [0, 1, -1, 1, 1]
  assert result.ngram[0] == "over the quiet valley at dawn" and result.ngram[2] == ""
  assert result.most_suspicious(1)[0]["generated"] == 3
  assert result.summary()["copied_whole"] == pytest.approx(1 / 5)


def bright_square_data(count: int, seed: int):
  """16 px noise images; finding 0 is a bright 5x5 square somewhere, finding 1 never occurs."""
  rng = np.random.default_rng(seed)
  images = rng.integers(40, 90, (count, 16, 16, 3)).astype(np.uint8)
  labels = np.zeros((count, 2), bool)
  labels[: count // 2, 0] = True
  for i in range(count // 2):
    y, x = rng.integers(0, 11, 2)
    images[i, y:y + 5, x:x + 5] = 230
  return images, labels


def test_classifier_learns_a_bright_square_and_round_trips(tmp_path):
  images, labels = bright_square_data(64, 0)
  kwargs = dict(steps=40, seed=3, batch_size=32, channels=(8, 16), findings=("square", "never"),
                progress_bar=False)
  classifier = clinical.train_finding_classifier(images, labels, **kwargs)
  held_out, held_labels = bright_square_data(32, 1)
  thresholds = classifier.calibrate(held_out, held_labels)
  assert thresholds[1] == 0.5            # no positives to tune on: the default stays
  probabilities = classifier.predict(held_out)
  assert probabilities.shape == (32, 2)
  assert probabilities[held_labels[:, 0], 0].min() > probabilities[~held_labels[:, 0], 0].max()
  assert (classifier.predict_labels(held_out)[:, 0] == held_labels[:, 0]).all()

  again = clinical.train_finding_classifier(images, labels, **kwargs)
  np.testing.assert_array_equal(again.predict(held_out), probabilities)

  classifier.save(str(tmp_path / "classifier.npz"))
  loaded = clinical.FindingClassifier.load(str(tmp_path / "classifier.npz"))
  np.testing.assert_array_equal(loaded.predict(held_out), probabilities)
  np.testing.assert_array_equal(loaded.thresholds, thresholds)


def test_an_evaluation_scores_images_with_a_classifier_of_its_own_seed_not_the_runs(tmp_path):
  """Two runs that differ only in config.seed get the same report->image yardstick."""
  from configs import demo
  from medim_jax import evaluate
  from medim_jax.evaluation import ground_truth
  images, labels = bright_square_data(16, 0)
  training = ground_truth.Reference([f"case{i}" for i in range(16)], images, [""] * 16, labels,
                                    ("square", "never"))

  def probabilities(seed, classifier_seed):
    config = demo.get_config("tiny")
    config.seed, config.eval.classifier_seed, config.eval.classifier_steps = seed, classifier_seed, 3
    folder = tmp_path / f"run_{seed}_{classifier_seed}"
    folder.mkdir(exist_ok=True)
    classifier, _ = evaluate.cached_classifier(config, "chest", {}, training, str(folder))
    return classifier.predict(images)

  np.testing.assert_array_equal(probabilities(42, 7), probabilities(43, 7))
  assert not np.array_equal(probabilities(42, 7), probabilities(42, 8))


def test_best_f1_thresholds_cut_halfway_below_the_best_point():
  probabilities = np.array([[0.9], [0.8], [0.6], [0.3], [0.1]])
  labels = np.array([[1], [1], [0], [1], [0]], bool)
  # Accepting the top 4 (tp 3, predicted 4) gives F1 6/7, the best: cut between 0.3 and 0.1.
  assert clinical.best_f1_thresholds(probabilities, labels)[0] == pytest.approx(0.2)


def test_auc_per_finding_closed_forms():
  probabilities = np.array([[0.1, 0.1, 0.3], [0.4, 0.5, 0.3], [0.35, 0.2, 0.3], [0.8, 0.9, 0.3]])
  labels = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
  auc = clinical.auc_per_finding(probabilities, labels)
  assert auc[0] == 1.0    # both positives above both negatives
  assert auc[1] == 0.5    # positives 0.1, 0.9 vs negatives 0.5, 0.2: 2 of 4 pairs in order
  assert np.isnan(auc[2])  # no positives
  tied = clinical.auc_per_finding(np.array([[0.5], [0.5]]), np.array([[1], [0]], bool))
  assert tied[0] == 0.5    # a tie counts half
