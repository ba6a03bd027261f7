"""MIMIC-CXR-JPG as distributed -> paired folders, on a tiny tree with the real layout."""

import csv
import gzip
import json
import os

import pytest
from PIL import Image

from medim_jax import errors
from medim_jax.data import folders, mimic_cxr

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 The heart is mildly enlarged.  There is no pleural
 effusion or pneumothorax.

 IMPRESSION:
 Mild cardiomegaly.
"""

# (subject, study, dicom, view, split, report: None = no file, or its text)
STUDIES = [("p10000032", "s50414267", "aaa", "PA", "train", REPORT),
           ("p10000032", "s50414267", "aab", "LATERAL", "train", REPORT),
           ("p10000032", "s50414267", "aac", "AP", "train", REPORT),   # one image per study: PA wins
           ("p10000033", "s50000001", "ccc", "AP", "test", "IMPRESSION: No acute process.\n"),
           ("p11000001", "s51000001", "ddd", "PA", "validate", "FINDINGS: Lungs are clear.\n"),
           ("p11000002", "s51000002", "eee", "PA", "train", None)]


def write_csv_gz(path, header, rows):
  with gzip.open(path, "wt", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


@pytest.fixture
def tree(tmp_path):
  jpg, reports = tmp_path / "jpg", tmp_path / "reports"
  for subject, study, dicom, _, _, report in STUDIES:
    folder = jpg / "files" / subject[:3] / subject / study
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (20, 24), 128).save(folder / f"{dicom}.jpg")
    if report is not None:
      (reports / "files" / subject[:3] / subject).mkdir(parents=True, exist_ok=True)
      (reports / "files" / subject[:3] / subject / f"{study}.txt").write_text(report)
  prefix = str(jpg / "mimic-cxr-2.0.0-")
  write_csv_gz(prefix + "split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
               [(d, s[1:], p[1:], split) for p, s, d, _, split, _ in STUDIES])
  write_csv_gz(prefix + "metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
               [(d, p[1:], s[1:], view) for p, s, d, view, _, _ in STUDIES])
  columns = list(mimic_cxr.CHEXPERT_COLUMNS)
  labels = {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pneumothorax": "0.0"}
  write_csv_gz(prefix + "chexpert.csv.gz", ["subject_id", "study_id"] + columns,
               [("10000032", "50414267", *[labels.get(c, "") for c in columns])])
  return jpg, reports, tmp_path / "out"


def test_frontal_images_with_their_findings_become_folder_pairs_with_labels(tree):
  jpg, reports, out = tree
  summary = mimic_cxr.convert(str(jpg), str(reports), str(out), progress=False)
  assert summary.written == {"train": 1, "val": 1}
  assert summary.skipped == {"view not in PA,AP": 1, "no findings section": 1, "no report file": 1}
  pairs, missing = folders.scan(str(out / "train"))
  assert [name for name, _, _ in pairs] == ["p10000032_s50414267_aaa"] and not missing
  assert os.path.realpath(pairs[0][1]).endswith("files/p10/p10000032/s50414267/aaa.jpg")
  assert (out / "train" / "p10000032_s50414267_aaa.txt").read_text() == (
      "The heart is mildly enlarged. There is no pleural effusion or pneumothorax.\n")
  rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
  first = next(r for r in rows if r["name"] == "p10000032_s50414267_aaa")["labels"]
  assert first["cardiomegaly"] and not first["edema"] and not first["pneumothorax"]
  assert set(first) == {mimic_cxr.finding_name(c) for c in mimic_cxr.CHEXPERT_COLUMNS}


def test_section_and_uncertainty_choices(tree):
  jpg, reports, out = tree
  summary = mimic_cxr.convert(str(jpg), str(reports), str(out), section="impression",
                              uncertain="positive", progress=False)
  assert summary.written == {"train": 1, "test": 1}  # the AP study has only an impression
  assert (out / "train" / "p10000032_s50414267_aaa.txt").read_text() == "Mild cardiomegaly.\n"
  rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
  assert next(r for r in rows if r["name"].endswith("_aaa"))["labels"]["edema"]  # -1 -> positive
  assert mimic_cxr.report_text(REPORT, "both") == (
      "The heart is mildly enlarged. There is no pleural effusion or pneumothorax. Mild cardiomegaly.")


def test_a_missing_table_names_the_file(tree):
  jpg, reports, out = tree
  os.remove(jpg / "mimic-cxr-2.0.0-metadata.csv.gz")
  with pytest.raises(errors.InputError, match="mimic-cxr-2.0.0-metadata.csv"):
    mimic_cxr.convert(str(jpg), str(reports), str(out), progress=False)
