"""MIMIC-CXR-JPG as PhysioNet distributes it -> the paired folders every other stage reads.

Input: the MIMIC-CXR-JPG tree (``files/pXX/pXXXXXXXX/sYYYYYYYY/DICOM_ID.jpg`` with
``mimic-cxr-2.0.0-split.csv(.gz)``, ``-metadata.csv(.gz)`` and ``-chexpert.csv(.gz)`` at its top) and
the MIMIC-CXR reports (``files/pXX/pXXXXXXXX/sYYYYYYYY.txt``). Output: ``OUT/train``, ``OUT/val`` and
``OUT/test`` of ``NAME.jpg`` (a symbolic link to the original, or a copy) + ``NAME.txt`` (the chosen
report section), and ``OUT/labels.jsonl`` (the CheXpert labels of each study, as the finding loss and
the clinical metrics read them), then ``--mode tokenize`` with ``data.name=folders``:

``python -m medim_jax.data.mimic_cxr --jpg_root /data/mimic-cxr-jpg/2.1.0 --reports_root /data/mimic-cxr-reports --out /data/mimic-folders``

Choices, each a flag: frontal views only (``--views PA,AP``, as the paper), one image per study (PA
before AP, then by DICOM id), the FINDINGS section (``--section findings|impression|both``; a study
whose report lacks it is skipped and counted), uncertain CheXpert labels (-1) read as negative
(``--uncertain negative|positive``). Report sections are found as the MIMIC-CXR ``section_parser``
finds them: a line starting with an upper-case heading and a colon.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import json
import os
import re
import shutil

from medim_jax import errors

SPLITS = {"train": "train", "validate": "val", "test": "test"}
CHEXPERT_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
                    "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
                    "Support Devices")
SECTIONS = ("findings", "impression", "both")
# A heading at the start of a line: "FINDINGS:", "IMPRESSION:", "PA AND LATERAL VIEWS OF THE CHEST:".
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]*[A-Z)]):", re.MULTILINE)


def finding_name(column: str) -> str:
  return column.lower().replace(" ", "_")


def sections(report: str) -> dict[str, str]:
  """{lower-case heading: its text, whitespace collapsed} of a MIMIC-CXR report."""
  found = {}
  matches = list(_HEADING.finditer(report))
  for m, following in zip(matches, matches[1:] + [None]):
    text = report[m.end():following.start() if following else len(report)]
    found[m.group(1).strip().lower()] = " ".join(text.split())
  return found


def report_text(report: str, section: str) -> str | None:
  """The chosen section's text (both: findings then impression), or None when it is missing."""
  parts = sections(report)
  wanted = ("findings", "impression") if section == "both" else (section,)
  texts = [parts[s] for s in wanted if parts.get(s)]
  if section == "both":
    return " ".join(texts) or None
  return texts[0] if texts else None


def read_csv(path: str) -> list[dict]:
  """Rows of ``path`` or ``path.gz``, whichever exists."""
  for candidate in (path + ".gz", path):
    if os.path.exists(candidate):
      opener = gzip.open if candidate.endswith(".gz") else open
      with opener(candidate, "rt", newline="") as f:
        return list(csv.DictReader(f))
  raise errors.InputError(f"{path}(.gz) is missing: the MIMIC-CXR-JPG folder (--jpg_root, or "
                          "config.data.mimic_cxr.root) must hold files/ and the "
                          "mimic-cxr-2.0.0-*.csv.gz tables as PhysioNet ships them")


@dataclasses.dataclass
class Summary:
  written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  missing: list = dataclasses.field(default_factory=list)  # images the metadata lists, not on disk

  def __str__(self) -> str:
    lines = ", ".join(f"{split} {n}" for split, n in sorted(self.written.items()))
    skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
    first = f" (first missing: {self.missing[0]})" if self.missing else ""
    return f"studies written: {lines or 'none'}; skipped: {skipped}{first}"


def convert(jpg_root: str, reports_root: str, out: str, section: str = "findings",
            views: tuple[str, ...] = ("PA", "AP"), one_per_study: bool = True,
            uncertain: str = "negative", copy: bool = False, progress: bool = True) -> Summary:
  """Write OUT/{train,val,test}/NAME.jpg + NAME.txt and OUT/labels.jsonl; returns what was written
  and why the rest was skipped."""
  from medim_jax import progress as progress_bars
  if section not in SECTIONS:
    raise errors.InputError(f"section must be one of {SECTIONS}, got {section!r}")
  if uncertain not in ("negative", "positive"):
    raise errors.InputError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
  prefix = os.path.join(jpg_root, "mimic-cxr-2.0.0-")
  split_of = {r["dicom_id"]: r["split"] for r in read_csv(prefix + "split.csv")}
  metadata = read_csv(prefix + "metadata.csv")
  view_of = {r["dicom_id"]: r.get("ViewPosition", "") for r in metadata}
  labels_of = {(r["subject_id"], r["study_id"]): r for r in read_csv(prefix + "chexpert.csv")}

  images = collections.defaultdict(list)  # (subject, study) -> [(view rank, dicom id, path)]
  summary = Summary()
  files = os.path.join(jpg_root, "files")
  if not os.path.isdir(files):
    raise errors.InputError(f"{files} is missing: --jpg_root must hold the files/pXX/... tree")
  for base, _, names in os.walk(files):
    for name in names:
      if not name.endswith(".jpg"):
        continue
      dicom, study, subject = name[:-4], os.path.basename(base), os.path.basename(os.path.dirname(base))
      view = view_of.get(dicom, "")
      if view not in views:
        summary.skipped[f"view not in {','.join(views)}"] += 1
        continue
      images[(subject, study)].append((views.index(view), dicom, os.path.join(base, name)))

  found_ids = {dicom for entries in images.values() for _, dicom, _ in entries}
  for row in metadata:
    if row.get("ViewPosition", "") in views and row["dicom_id"] not in found_ids:
      subject, study = "p" + row["subject_id"], "s" + row["study_id"]
      summary.missing.append(os.path.join(files, subject[:3], subject, study, row["dicom_id"] + ".jpg"))
  if summary.missing:
    summary.skipped["listed in the metadata, not on disk"] += len(summary.missing)

  rows_by_split = collections.defaultdict(list)
  bar = progress_bars.bar(len(images), "MIMIC-CXR studies", "study", progress)
  for (subject, study), found in sorted(images.items()):
    bar.update(1)
    report_path = os.path.join(reports_root, "files", subject[:3], subject, study + ".txt")
    if not os.path.exists(report_path):
      summary.skipped["no report file"] += 1
      continue
    with open(report_path, encoding="utf-8", errors="replace") as f:
      text = report_text(f.read(), section)
    if not text:
      summary.skipped[f"no {section} section"] += 1
      continue
    for _, dicom, path in sorted(found)[:1] if one_per_study else sorted(found):
      split = SPLITS.get(split_of.get(dicom, ""))
      if split is None:
        summary.skipped["not in the split table"] += 1
        continue
      name = f"{subject}_{study}_{dicom}"
      folder = os.path.join(out, split)
      os.makedirs(folder, exist_ok=True)
      target = os.path.join(folder, name + ".jpg")
      if os.path.lexists(target):
        os.remove(target)
      (shutil.copyfile if copy else os.symlink)(os.path.abspath(path), target)
      with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
      row = labels_of.get((subject[1:], study[1:]), {})
      positive = {"1.0", "1"} | ({"-1.0", "-1"} if uncertain == "positive" else set())
      rows_by_split[split].append({"name": name, "labels": {
          finding_name(c): row.get(c, "") in positive for c in CHEXPERT_COLUMNS}})
      summary.written[split] += 1
  bar.close()
  with open(os.path.join(out, "labels.jsonl"), "w", encoding="utf-8") as f:
    for split in sorted(rows_by_split):
      for row in rows_by_split[split]:
        f.write(json.dumps(row) + "\n")
  return summary


def main(argv=None) -> Summary:
  import argparse
  import sys
  parser = argparse.ArgumentParser(prog="python -m medim_jax.data.mimic_cxr", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--jpg_root", required=True, help="MIMIC-CXR-JPG: files/ and the csv tables")
  parser.add_argument("--reports_root", required=True, help="MIMIC-CXR reports: files/pXX/...txt")
  parser.add_argument("--out", required=True)
  parser.add_argument("--section", default="findings", choices=SECTIONS)
  parser.add_argument("--views", default="PA,AP", help="ViewPosition values to keep")
  parser.add_argument("--all_images", action="store_true", help="every kept image of a study")
  parser.add_argument("--uncertain", default="negative", choices=("negative", "positive"))
  parser.add_argument("--copy", action="store_true", help="copy the JPEGs instead of linking")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.jpg_root, args.reports_root, args.out, args.section,
                      tuple(v.strip() for v in args.views.split(",") if v.strip()),
                      not args.all_images, args.uncertain, args.copy)
  except errors.InputError as e:
    sys.exit(f"error: {e}")
  print(summary)
  return summary


if __name__ == "__main__":
  main()
