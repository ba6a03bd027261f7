"""IU X-ray (Open-i) as distributed -> the paired folders every other stage reads.

Input: the PNG images (``NLMCXR_png/CXR1_1_IM-0001-3001.png``) and the reports
(``ecgen-radiology/*.xml``, a folder or the ``NLMCXR_reports.tgz`` archive). Each report's XML
names its images (``<parentImage id=...>``), its FINDINGS and IMPRESSION, and its MeSH major terms.
Output: ``OUT/{train,val,test}/NAME.png`` (a symbolic link to the original, or a copy) + ``NAME.txt``
(the chosen sections, de-identification placeholders removed), and ``OUT/labels.jsonl`` with the six
findings medim-demo scores (from the MeSH terms, ``iu_reports.FINDING_OF_TERM``):

``python -m medim_jax.data.iu_xray --png_root /data/NLMCXR_png --reports /data/ecgen-radiology --out /data/iu-folders``

IU X-ray records no view position. ``--images first`` (default) keeps each report's first figure,
which is the frontal view in most reports but not all; ``--images all`` keeps every image (the
lateral ones too). There is no official split: reports go to train / val / test by a hash of their
id (``--split 0.7,0.1,0.2``), so the images of one report stay together and the split is the same
on every machine. A report without the chosen section, or whose images are missing, is skipped and
counted.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tarfile
import xml.etree.ElementTree as ET

from medim_jax import errors
from medim_jax.data import iu_reports

SECTIONS = ("findings", "impression", "both")


def parse(xml_bytes: bytes, name: str = "report") -> dict:
  """{id, sections: {FINDINGS: ..., IMPRESSION: ...}, images: [ids in figure order], terms}."""
  try:
    root = ET.fromstring(xml_bytes)
  except ET.ParseError as e:
    raise errors.InputError(f"{name} is not readable XML ({e})") from None
  uid = root.find("uId")
  return {"id": uid.get("id") if uid is not None else os.path.basename(name),
          "sections": {e.get("Label"): iu_reports.clean_text(e.text or "")
                       for e in root.iter("AbstractText")},
          "images": [e.get("id") for e in root.iter("parentImage") if e.get("id")],
          "terms": [e.text.strip() for e in root.iter("major") if e.text and e.text.strip()]}


def read_reports(path: str) -> list[dict]:
  """Every report of a folder of XML files or of a .tgz holding them."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".xml"))
    reports = []
    for n in names:
      with open(os.path.join(path, n), "rb") as f:
        reports.append(parse(f.read(), os.path.join(path, n)))
  elif os.path.isfile(path) and tarfile.is_tarfile(path):
    with tarfile.open(path) as archive:
      reports = [parse(archive.extractfile(m).read(), f"{path}:{m.name}")
                 for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")]
  else:
    raise errors.InputError(f"{path}: expected the ecgen-radiology folder of XML reports or "
                            "NLMCXR_reports.tgz")
  if not reports:
    raise errors.InputError(f"{path}: no .xml reports in it")
  return reports


def split_of(report_id: str, fractions: tuple[float, float, float]) -> str:
  """train / val / test by a hash of the report id: the same on every machine."""
  u = int(hashlib.sha256(report_id.encode()).hexdigest()[:8], 16) / 16 ** 8
  return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def labels_of(terms: list[str]) -> dict[str, bool]:
  present = {iu_reports.FINDING_OF_TERM.get(t.split("/")[0]) for t in terms}
  return {finding: finding in present for finding in iu_reports.FINDINGS}


def convert(png_root: str, reports: str, out: str, section: str = "findings",
            images: str = "first", fractions=(0.7, 0.1, 0.2), copy: bool = False) -> dict:
  """Write the folders and labels.jsonl; returns {"written": {split: n}, "skipped": {why: n}}."""
  if section not in SECTIONS:
    raise errors.InputError(f"section must be one of {SECTIONS}, got {section!r}")
  if images not in ("first", "all"):
    raise errors.InputError(f"images must be 'first' or 'all', got {images!r}")
  if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
    raise errors.InputError(f"split fractions must be three numbers >= 0 adding up to 1, got {fractions}")
  if not os.path.isdir(png_root):
    raise errors.InputError(f"{png_root} is not a folder (expected NLMCXR_png)")
  written, skipped, rows = collections.Counter(), collections.Counter(), []
  wanted = ("FINDINGS", "IMPRESSION") if section == "both" else (section.upper(),)
  for report in sorted(read_reports(reports), key=lambda r: r["id"]):
    text = " ".join(report["sections"].get(s, "") for s in wanted).strip()
    if not text:
      skipped[f"no {section} section"] += 1
      continue
    ids = report["images"][:1] if images == "first" else report["images"]
    found = [i for i in ids if os.path.exists(os.path.join(png_root, i + ".png"))]
    if not found:
      skipped["no image"] += 1
      continue
    split = split_of(report["id"], fractions)
    folder = os.path.join(out, split)
    os.makedirs(folder, exist_ok=True)
    for image_id in found:
      target = os.path.join(folder, image_id + ".png")
      if os.path.lexists(target):
        os.remove(target)
      (shutil.copyfile if copy else os.symlink)(os.path.abspath(os.path.join(png_root, image_id + ".png")),
                                                target)
      with open(os.path.join(folder, image_id + ".txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
      rows.append({"name": image_id, "labels": labels_of(report["terms"])})
      written[split] += 1
  with open(os.path.join(out, "labels.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return {"written": dict(written), "skipped": dict(skipped)}


def main(argv=None) -> dict:
  import argparse
  import sys
  parser = argparse.ArgumentParser(prog="python -m medim_jax.data.iu_xray", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--png_root", required=True, help="NLMCXR_png")
  parser.add_argument("--reports", required=True, help="ecgen-radiology/ or NLMCXR_reports.tgz")
  parser.add_argument("--out", required=True)
  parser.add_argument("--section", default="findings", choices=SECTIONS)
  parser.add_argument("--images", default="first", choices=("first", "all"))
  parser.add_argument("--split", default="0.7,0.1,0.2", help="train,val,test fractions")
  parser.add_argument("--copy", action="store_true", help="copy the PNGs instead of linking")
  args = parser.parse_args(argv)
  try:
    fractions = tuple(float(x) for x in args.split.split(","))
    summary = convert(args.png_root, args.reports, args.out, args.section, args.images, fractions,
                      args.copy)
  except ValueError as e:  # InputError too
    sys.exit(f"error: {e}")
  print(f"studies written: {summary['written']}; skipped: {summary['skipped'] or 'none'}")
  return summary


if __name__ == "__main__":
  main()
