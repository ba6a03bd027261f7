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


def big_tree(root, corrupt: str = ""):
  """30 studies in the distributed layout: 22 train, 4 validate, 4 test, one frontal JPEG each."""
  import numpy as np
  rng = np.random.default_rng(0)
  words = ("heart", "size", "normal", "enlarged", "lungs", "clear", "no", "effusion", "opacity",
           "left", "right", "base", "mild", "stable")
  jpg, rows = root / "mimic-cxr-jpg", []
  for i in range(30):
    subject, study, dicom = f"p1{i:07d}", f"s5{i:07d}", f"d{i:03d}"
    split = "train" if i < 22 else ("validate" if i < 26 else "test")
    folder = jpg / "files" / subject[:3] / subject / study
    folder.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(folder / f"{dicom}.jpg")
    report = " ".join(rng.choice(words, 8)) + ". " + " ".join(rng.choice(words, 6)) + "."
    (jpg / "files" / subject[:3] / subject / f"{study}.txt").write_text(f"FINDINGS: {report}\n")
    rows.append((subject, study, dicom, split))
  if corrupt:
    subject, study, dicom, _ = rows[int(corrupt)]
    (jpg / "files" / subject[:3] / subject / study / f"{dicom}.jpg").write_bytes(b"not a jpeg")
  prefix = str(jpg / "mimic-cxr-2.0.0-")
  write_csv_gz(prefix + "split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
               [(d, s[1:], p[1:], split) for p, s, d, split in rows])
  write_csv_gz(prefix + "metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
               [(d, p[1:], s[1:], "PA") for p, s, d, _ in rows])
  write_csv_gz(prefix + "chexpert.csv.gz", ["subject_id", "study_id", "Cardiomegaly"],
               [(p[1:], s[1:], "1.0" if i % 3 == 0 else "0.0") for i, (p, s, _, _) in enumerate(rows)])
  return jpg, rows


def mimic_config(root):
  from configs import demo
  config = demo.get_config("tiny")
  config.data.name = "mimic_cxr"
  config.data.mimic_cxr.root = str(root)  # the reports are in the same tree (reports_root unset)
  config.data.image_size, config.data.patch_pixels, config.data.image_codebook_size = 16, 4, 8
  config.data.text_vocab_size, config.data.text_length = 40, 24
  return config


def test_data_name_mimic_cxr_tokenizes_the_distributed_tree(tmp_path):
  from medim_jax import jobs
  jpg, _ = big_tree(tmp_path, corrupt="3")
  workdir = tmp_path / "work"
  jobs.run(mimic_config(jpg), str(workdir), "tokenize")
  manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
  # 22 train studies, one a corrupt JPEG (skipped, and named in the manifest); 4 validate, 4 test.
  assert manifest["counts"]["chest"] == {"train": 21, "val": 4, "test": 4}
  original = str(jpg / "files" / "p10" / "p10000003" / "s50000003" / "d003.jpg")
  assert any(f"a link to {original}" in skipped and "cannot be read" in skipped
             for skipped in manifest["skipped"])
  assert manifest["settings"]["mimic_cxr"]["views"] == "PA,AP"
  labels = {row["name"].split("_")[-1]: row["labels"] for row in map(
      json.loads, (workdir / "mimic_cxr_folders" / "labels.jsonl").read_text().splitlines())}
  assert len(labels) == 30 and labels["d000"]["cardiomegaly"] and not labels["d001"]["cardiomegaly"]


@pytest.mark.parametrize("damage, message", [
    ("csv", "mimic-cxr-2.0.0-split.csv(.gz) is missing"),
    ("image", "d005.jpg: listed in mimic-cxr-2.0.0-metadata.csv but not on disk"),
    ("root", "needs the MIMIC-CXR-JPG folder"),
])
def test_data_name_mimic_cxr_errors_name_the_file_and_the_fix(tmp_path, damage, message):
  from medim_jax import jobs
  jpg, rows = big_tree(tmp_path)
  config = mimic_config(jpg)
  if damage == "csv":
    os.remove(jpg / "mimic-cxr-2.0.0-split.csv.gz")
  elif damage == "image":
    subject, study, dicom, _ = rows[5]
    os.remove(jpg / "files" / subject[:3] / subject / study / f"{dicom}.jpg")
    config.data.on_bad_pair = "error"
  else:
    config.data.mimic_cxr.root = ""
  with pytest.raises(errors.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
    jobs.run(config, str(tmp_path / "work"), "tokenize")
