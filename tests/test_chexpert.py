"""Rule-based CheXpert-14 labels and the clinical efficacy metrics, on hand-labelled reports."""

import numpy as np
import pytest

from medim_jax.evaluation import chexpert

LABELLED = [
    ("The heart size is normal. No pleural effusion or pneumothorax.",
     {"No Finding": 1, "Cardiomegaly": 0, "Pneumothorax": 0, "Pleural Effusion": 0}),
    ("Heart size is enlarged. Small left pleural effusion.",
     {"Cardiomegaly": 1, "Pleural Effusion": 1}),
    ("Possible right lower lobe pneumonia. Pneumothorax cannot be excluded.",
     {"Pneumonia": -1, "Pneumothorax": -1}),
    ("Heart size is stable.", {"No Finding": 1}),  # a structure named, neither normal nor abnormal
    ("Calcified granuloma in the right upper lobe. Right PICC line tip in the SVC.",
     {"No Finding": 1, "Support Devices": 1}),  # old granulomas are not lesions; devices not findings
    ("Mediastinum is widened. There is a 2 cm nodule in the left lung.",
     {"Enlarged Cardiomediastinum": 1, "Lung Lesion": 1}),
    # Negative and uncertain mentions of one observation: uncertain, as the labeler aggregates.
    ("Mild pulmonary edema. No focal consolidation. Left basilar atelectasis versus consolidation.",
     {"Edema": 1, "Consolidation": -1, "Atelectasis": -1}),
    # Negative and positive: positive.
    ("No effusion on the left. Small right pleural effusion.", {"Pleural Effusion": 1}),
    ("Unremarkable mediastinal contours. Healed rib fracture.",
     {"Enlarged Cardiomediastinum": 0, "Fracture": 1}),
]


@pytest.mark.parametrize("report,expected", LABELLED)
def test_reports_get_the_labels_a_reader_would_give(report, expected):
  labels = chexpert.label_report(report)
  assert list(labels) == list(chexpert.OBSERVATIONS)
  assert labels == {**{name: None for name in chexpert.OBSERVATIONS}, **expected}


def test_ce_metrics_are_the_closed_form_counts():
  nan = np.nan
  columns = {name: k for k, name in enumerate(chexpert.OBSERVATIONS)}
  reference = np.full((3, 14), nan)
  generated = np.full((3, 14), nan)
  edema, effusion, device = columns["Edema"], columns["Pleural Effusion"], columns["Support Devices"]
  reference[:, edema] = [1, 1, 0]
  generated[:, edema] = [1, -1, 1]      # tp 1, fn 1 (uncertain counted negative), fp 1
  reference[:, effusion] = [1, -1, nan]
  generated[:, effusion] = [nan, -1, 1]  # fn 1, fp 1
  generated[:, device] = [1, nan, nan]   # fp 1, no reference positives
  table = chexpert.ce_metrics(generated, reference)
  assert table["Edema"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
  assert table["Pleural Effusion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
  assert table["Support Devices"]["support"] == 0 and table["Support Devices"]["precision"] == 0.0
  # Pooled: tp 1, fp 3, fn 2.
  assert table["micro"]["precision"] == pytest.approx(1 / 4)
  assert table["micro"]["recall"] == pytest.approx(1 / 3)
  assert table["micro"]["f1"] == pytest.approx(2 / 7)
  assert table["macro"]["f1"] == pytest.approx(0.25)  # edema and effusion have positives
  # Uncertain as positive: edema tp 2, fp 1 (row 3); effusion row 2 becomes a true positive.
  positive = chexpert.ce_metrics(generated, reference, uncertain="positive")
  assert positive["Edema"]["precision"] == pytest.approx(2 / 3) and positive["Edema"]["recall"] == 1.0
  assert positive["Pleural Effusion"]["recall"] == pytest.approx(1 / 2)
  with pytest.raises(ValueError, match="uncertain"):
    chexpert.ce_metrics(generated, reference, uncertain="ignore")


def test_label_matrix_marks_unmentioned_observations_nan():
  matrix = chexpert.label_matrix([r for r, _ in LABELLED[:2]])
  assert matrix.shape == (2, 14)
  assert matrix[1, chexpert.OBSERVATIONS.index("Cardiomegaly")] == 1
  assert np.isnan(matrix[1, chexpert.OBSERVATIONS.index("Fracture")])


def test_agreement_with_the_demo_labels_counts_each_finding_and_reads_uncertain_both_ways():
  from medim_jax.evaluation.demo import chexpert_agreement, clinical
  reports = ["the heart is enlarged.", "no pleural effusion.", "possible pneumothorax.",
             "a nodule in the left lung.", "normal chest."]
  labels = np.zeros((5, len(clinical.FINDINGS)), bool)
  for row, finding in ((0, "cardiomegaly"), (2, "pneumothorax"), (3, "nodule"), (4, "opacity")):
    labels[row, clinical.FINDINGS.index(finding)] = True
  np.testing.assert_array_equal(chexpert_agreement.labeler_findings(reports, "negative"),
                                [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                                 [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
  tables = chexpert_agreement.agreement_tables(reports, labels)
  strict = tables["labeler (uncertain negative) vs demo labels"]
  assert strict["cardiomegaly"]["f1"] == 1.0 and strict["pneumothorax"]["recall"] == 0.0
  assert strict["opacity"]["support"] == 1 and strict["opacity"]["predicted"] == 0
  assert tables["labeler (uncertain positive) vs demo labels"]["pneumothorax"]["f1"] == 1.0
