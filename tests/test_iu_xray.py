"""IU X-ray (Open-i) as distributed -> paired folders, on XML reports the test writes."""

import json
import os
import tarfile

import pytest
from PIL import Image

from medim_jax import errors
from medim_jax.data import folders, iu_xray

XML = """<eCitation><uId id="{id}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
{sections}
</Abstract></Article></MedlineCitation>
<MeSH>{terms}</MeSH>
{images}
</eCitation>"""


def report_xml(report_id, sections, terms, images):
  return XML.format(
      id=report_id,
      sections="".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in sections.items()),
      terms="".join(f"<major>{t}</major>" for t in terms),
      images="".join(f'<parentImage id="{i}"><figureId>F{n + 1}</figureId></parentImage>'
                     for n, i in enumerate(images)))


@pytest.fixture
def download(tmp_path):
  png, xml = tmp_path / "NLMCXR_png", tmp_path / "ecgen-radiology"
  png.mkdir()
  xml.mkdir()
  reports = [
      ("CXR1", {"FINDINGS": "The heart is XXXX enlarged.", "IMPRESSION": "Cardiomegaly."},
       ["Cardiomegaly/mild", "Opacity/lung/base/left"], ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
      ("CXR2", {"IMPRESSION": "No acute disease."}, ["normal"], ["CXR2_IM-0652-1001"]),
      ("CXR3", {"FINDINGS": "Lungs are clear."}, ["normal"], ["CXR3_IM-9999-1001"]),  # no PNG
  ]
  for report_id, sections, terms, images in reports:
    (xml / f"{report_id[3:]}.xml").write_text(report_xml(report_id, sections, terms, images))
    for image in images:
      if report_id != "CXR3":
        Image.new("L", (30, 24), 100).save(png / f"{image}.png")
  return png, xml, tmp_path / "out"


def test_first_figures_with_their_findings_become_folder_pairs_with_mesh_labels(download):
  png, xml, out = download
  summary = iu_xray.convert(str(png), str(xml), str(out))
  split = iu_xray.split_of("CXR1", (0.7, 0.1, 0.2))
  assert summary == {"written": {split: 1}, "skipped": {"no findings section": 1, "no image": 1}}
  pairs, missing = folders.scan(str(out / split))
  assert [name for name, _, _ in pairs] == ["CXR1_1_IM-0001-3001"] and not missing  # F1 only
  assert (out / split / "CXR1_1_IM-0001-3001.txt").read_text() == "the heart is enlarged.\n"
  row = json.loads((out / "labels.jsonl").read_text())
  assert row["labels"]["cardiomegaly"] and row["labels"]["opacity"] and not row["labels"]["nodule"]


def test_every_image_both_sections_and_an_archive(download, tmp_path):
  png, xml, out = download
  archive = tmp_path / "NLMCXR_reports.tgz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(xml, arcname="ecgen-radiology")
  summary = iu_xray.convert(str(png), str(archive), str(out), section="both", images="all",
                            copy=True)
  assert sum(summary["written"].values()) == 3 and summary["skipped"] == {"no image": 1}
  split = iu_xray.split_of("CXR1", (0.7, 0.1, 0.2))
  assert not os.path.islink(out / split / "CXR1_1_IM-0001-4001.png")
  assert (out / split / "CXR1_1_IM-0001-4001.txt").read_text() == "the heart is enlarged. cardiomegaly.\n"


def test_bad_inputs_are_named(download, tmp_path):
  png, xml, out = download
  (xml / "9.xml").write_text("<eCitation><unclosed>")
  with pytest.raises(errors.InputError, match="9.xml is not readable XML"):
    iu_xray.convert(str(png), str(xml), str(out))
  with pytest.raises(errors.InputError, match="adding up to 1"):
    iu_xray.convert(str(png), str(xml), str(out), fractions=(0.5, 0.1, 0.1))
