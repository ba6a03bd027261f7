"""The medim-demo pieces on inputs made here (the packages holding the real material are not
needed): report parsing, the finding renderers on a synthetic phantom, the PA image convention,
and the pathology measurements."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from medim_jax.data import demo, demo_chest, demo_pathology, iu_reports
from medim_jax.data.iu_reports import Finding

NX, NZ, MM = 64, 60, 5.0  # grid points along x (patient right -> left) and z (feet -> head)


def box(x0, x1, z0, z1, value):
  out = np.zeros((NX, NZ), np.float32)
  out[x0:x1, z0:z1] = value
  return out


@pytest.fixture
def phantom():
  """Two lungs of upper/lower lobes 100 mm deep (right also a middle lobe), a heart between."""
  lobes = {("right", "upper"): box(6, 28, 30, 55, 100), ("right", "middle"): box(6, 28, 25, 30, 100),
           ("right", "lower"): box(6, 28, 5, 25, 100), ("left", "upper"): box(36, 58, 30, 55, 100),
           ("left", "lower"): box(36, 58, 5, 30, 100)}
  heart = box(26, 40, 8, 26, 80)
  base = sum(lobes.values()) * 0.15 + heart + 40.0
  return demo_chest.ChestPhantom(base=base, lobe_thickness=lobes,
                                 lobe_density={k: v * 0.15 for k, v in lobes.items()},
                                 heart_thickness=heart, dx=MM, dz=MM, lung_density=0.15)


def finding(kind, term, side=None, zone=None, severity="small", multiple=False):
  return Finding(kind, term, side, zone, severity, multiple)


def test_effusion_fills_the_base_of_its_own_side(phantom):
  delta = demo_chest.pleural_effusion(phantom, finding("pleural_effusion", "Pleural Effusion", "right"),
                                      np.random.default_rng(0))
  assert np.abs(delta[32:]).max() == 0  # nothing in the left lung
  right = delta[6:28]
  assert right[:, 5:10].mean() > 10 * max(right[:, 40:55].mean(), 1e-3)  # fluid at the base
  assert delta.max() <= 100 * (1.0 - 0.15) + 1e-3  # at most the lobe turned to water


def test_cardiomegaly_widens_the_heart_into_the_lungs(phantom):
  rng = np.random.default_rng(0)
  small = demo_chest.cardiomegaly(phantom, finding("cardiomegaly", "Cardiomegaly"), rng)
  large = demo_chest.cardiomegaly(phantom, finding("cardiomegaly", "Cardiomegaly", severity="large"),
                                  rng)
  assert small.min() >= 0 and small[20:26, 8:26].sum() > 0 and small[40:46, 8:26].sum() > 0
  assert small[:, 30:].sum() == 0 and small[:15].sum() == 0  # sideways only, next to the heart
  assert large.sum() > small.sum()


def test_pneumothorax_removes_lung_density_at_the_apex_of_its_side(phantom):
  delta = demo_chest.pneumothorax(phantom, finding("pneumothorax", "Pneumothorax", "left"),
                                  np.random.default_rng(0))
  assert np.abs(delta[:32]).max() == 0
  left = delta[36:58]
  assert left[:, 45:55].min() < -10 and left[:, 5:15].min() == 0  # apex and upper wall only


def test_nodule_is_a_sphere_in_the_requested_zone(phantom):
  delta = demo_chest.nodule(phantom, finding("nodule", "Nodule", "right", "upper", "moderate"),
                            np.random.default_rng(1))
  peak_x, peak_z = np.unravel_index(delta.argmax(), delta.shape)
  assert 6 <= peak_x < 28 and 30 <= peak_z < 55
  radius = delta.max() / 2 / (demo_chest.SOFT_TISSUE - 0.15)
  assert 9.0 - 5.0 <= radius <= 12.0  # the chord through the centre; grid points may miss it


def test_render_uses_the_pa_convention(phantom):
  """The patient's right appears on the image's left, the head at the top."""
  marked = demo_chest.ChestPhantom(**{**vars(phantom), "base": phantom.base + box(10, 16, 40, 48, 200)})
  image = demo_chest.render(marked, [], 32, np.random.default_rng(0)).astype(float)[..., 0]
  plain = demo_chest.render(phantom, [], 32, np.random.default_rng(0)).astype(float)[..., 0]
  difference = image - plain
  rows, cols = np.unravel_index(difference.argmax(), difference.shape)
  assert cols < 16 and rows < 16
  assert image.shape == (32, 32)


def write_reports_archive(path, reports):
  """An Open-i style .tgz of XML reports: (uid, findings, impression, MeSH major terms) each."""
  def xml(uid, findings, impression, terms):
    majors = "".join(f"<major>{t}</major>" for t in terms)
    return (f'<eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
            f"</Abstract></Article></MedlineCitation><MeSH>{majors}</MeSH></eCitation>").encode()
  with tarfile.open(path, "w:gz") as tar:
    for i, report in enumerate(reports):
      content = xml(*report)
      info = tarfile.TarInfo(f"ecgen-radiology/{i}.xml")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return str(path)


def test_report_parsing_and_cleaning(tmp_path):
  assert iu_reports.parse_finding("normal") is None
  f = iu_reports.parse_finding("Pleural Effusion/right/small")
  assert (f.kind, f.side, f.zone, f.severity) == ("pleural_effusion", "right", None, "small")
  f = iu_reports.parse_finding("Calcified Granuloma/lung/upper lobe/left/multiple")
  assert (f.kind, f.side, f.zone, f.multiple) == ("calcified_granuloma", "left", "upper", True)
  assert iu_reports.parse_finding("Cardiomegaly/severe").severity == "large"
  assert iu_reports.clean_text("Normal chest x-XXXX. Heart  XXXX normal .") == "normal chest. heart normal."

  archive = write_reports_archive(tmp_path / "reports.tgz", [
      ("CXR10", "Small right effusion.", "Effusion.", ["Pleural Effusion/right/small"]),
      ("CXR2", "Clear lungs.", "Normal.", ["normal"]),
      ("CXR3", "Hardware.", "Fracture.", ["Fractures, Bone"]),
      ("CXR4", "", "", ["normal"]),
      ("CXR11", "Port catheter. Small effusion.", "No acute disease.",
       ["Catheters, Indwelling", "Pleural Effusion/small"])])
  reports = iu_reports.load_reports(archive)
  assert [r.report_id for r in reports] == ["CXR2", "CXR10"]  # unrenderable and empty left out
  assert reports[1].text == "small right effusion. effusion."
  assert reports[1].labels["pleural_effusion"] and not any(reports[0].labels.values())
  # The text-only part gets exactly the reports left out for an unrenderable term (not the empty one).
  assert iu_reports.load_unrenderable_texts(archive) == [
      ("CXR3", "hardware. fracture."), ("CXR11", "port catheter. small effusion. no acute disease.")]


def test_the_text_only_part_writes_the_other_reports_and_the_text_profile_mixes_them_in(
    tmp_path, monkeypatch):
  from configs import demo as demo_config
  archive = write_reports_archive(tmp_path / "reports.tgz", [
      ("CXR1", "Clear.", "Normal.", ["normal"]), ("CXR5", "Scoliosis.", "No acute.", ["Scoliosis"])])
  monkeypatch.setattr(iu_reports, "reports_archive", lambda: archive)
  info, samples = demo._build_chest_text(str(tmp_path / "chest_text"), {}, False)
  assert info["counts"] == {"train": 1} and samples == []
  assert os.listdir(tmp_path / "chest_text" / "train") == ["CXR5.txt"]
  assert (tmp_path / "chest_text" / "train" / "CXR5.txt").read_text() == "scoliosis. no acute.\n"

  plain, text = demo_config.get_config(), demo_config.get_config("long,text")
  assert demo.settings(text.data)["parts"] == ["chest", "pathology", "chest_text"]
  assert text.diffusion.whole_target_prob == 0.5 and plain.data.demo_parts == "chest,pathology"
  weights = {n: d.weight for n, d in text.data.datasets.items()}
  assert weights == {"chest": 2.0, "pathology": 0.5, "chest_text": 0.5}  # chest keeps its 2/3
  for bad in ("long,tiny", "text,wide"):
    with pytest.raises(ValueError, match="some of 'long', 'text' and 'tiny'"):
      demo_config.get_config(bad)


def test_extra_training_renders_are_new_films_of_the_same_report(tmp_path, phantom, monkeypatch):
  archive = write_reports_archive(tmp_path / "reports.tgz", [
      (f"CXR{i}", f"Report {i}.", "Normal." if i % 2 else "Small right effusion.",
       ["normal"] if i % 2 else ["Pleural Effusion/right/small"]) for i in range(1, 21)])
  load_reports = iu_reports.load_reports
  monkeypatch.setattr(iu_reports, "load_reports", lambda: load_reports(archive))
  monkeypatch.setattr(demo_chest, "ct_paths", lambda: ("ct", "labels"))
  monkeypatch.setattr(demo_chest.ChestPhantom, "from_ct", classmethod(lambda cls, *a: phantom))

  def build(renders):
    spec = {"seed": 0, "image_size": 16, "chest_train_renders": renders}
    folder = tmp_path / f"renders{renders}"
    folder.mkdir()
    info, _ = demo._build_chest(str(folder), spec, progress=False)
    return folder, info

  one, info_one = build(1)
  three, info_three = build(3)
  assert info_three["counts"] == info_one["counts"] and info_three["label_counts"] == info_one["label_counts"]
  train_reports = sorted(p.stem for p in (one / "train").glob("*.txt"))
  assert sorted(p.stem for p in (three / "train").glob("*.txt")) == sorted(
      name + suffix for name in train_reports for suffix in ("", "-r1", "-r2"))
  for split in ("val", "test"):  # evaluation keeps one film per report
    names = sorted(p.name for p in (one / split).iterdir())
    assert names and sorted(p.name for p in (three / split).iterdir()) == names
  labels = {row["name"]: row for row in map(json.loads, (three / "labels.jsonl").read_text().splitlines())}
  for name in train_reports:
    first = np.asarray(Image.open(three / "train" / f"{name}.png"))
    # The first film is the one a single-render build makes, so existing results stay comparable.
    np.testing.assert_array_equal(first, np.asarray(Image.open(one / "train" / f"{name}.png")))
    for copy in ("-r1", "-r2"):
      assert (three / "train" / f"{name}{copy}.txt").read_text() == (three / "train" / f"{name}.txt").read_text()
      assert labels[name + copy]["labels"] == labels[name]["labels"]
      assert np.abs(np.asarray(Image.open(three / "train" / f"{name}{copy}.png"), float) - first).mean() > 1


def test_pathology_measurements_on_flat_colours():
  white = np.full((16, 16, 3), 245, np.uint8)
  purple = np.tile(np.array([90, 40, 140], np.uint8), (16, 16, 1))
  pink = np.tile(np.array([235, 140, 185], np.uint8), (16, 16, 1))
  assert demo_pathology.measure(white).tissue_fraction == 0
  half = white.copy()
  half[:8] = purple[:8]
  assert demo_pathology.measure(half).tissue_fraction == 0.5
  assert demo_pathology.measure(purple).stain_ratio > demo_pathology.measure(pink).stain_ratio
  assert demo_pathology.measure(purple).nuclear_fraction > demo_pathology.measure(pink).nuclear_fraction
  cuts = {"nuclear_fraction": (0.2, 0.6), "stain_ratio": (1.0, 2.0)}
  attrs = demo_pathology.attributes(demo_pathology.measure(purple), 10, cuts)
  assert attrs["coverage"] == "full" and attrs["magnification"] == 10
  caption = demo_pathology.caption(attrs, np.random.default_rng(0))
  assert caption.startswith("h&e stained skin at 10x.") and caption.endswith(".")


class Identity:
  def encode(self, images):
    return images

  def decode(self, codes):
    return codes


class Blank:
  def encode(self, images):
    return images

  def decode(self, codes):
    return np.zeros_like(codes)


def test_finding_visibility_is_one_for_a_lossless_tokenizer_and_zero_for_a_blind_one(phantom):
  from medim_jax.evaluation.demo import finding_visibility
  with_finding, without = finding_visibility.paired_renders(phantom, "pleural_effusion", 3, 32, 0)
  assert (with_finding != without).any()
  difference = np.abs(with_finding.astype(int) - without).sum(axis=(1, 2, 3))
  assert (difference > 0).all()  # same pose and film: only the finding differs, in every pair
  assert finding_visibility.retained_fraction(Identity(), with_finding, without) == 1.0
  assert finding_visibility.retained_fraction(Blank(), with_finding, without) == 0.0


def test_difference_sheet_shows_what_each_tokenizer_passes_on(phantom, tmp_path):
  from PIL import Image
  from medim_jax.evaluation.demo import finding_visibility
  path = str(tmp_path / "sheet.png")
  finding_visibility.difference_sheet({"lossless": Identity(), "blind": Blank()}, 32, path, phantom)
  sheet = np.asarray(Image.open(path).convert("RGB"))
  tile, pad, header = 128, 4, 18
  margin = 6 * len("calcified granuloma") + pad  # the longest row label
  assert sheet.shape == (header + 6 * (tile + pad), margin + 6 * (tile + pad) + pad, 3)

  def column(c):  # columns: with finding, lossless, blind, finding, lossless: ..., blind: ...
    x = margin + pad + c * (tile + pad)
    return np.stack([sheet[header + r * (tile + pad):header + r * (tile + pad) + tile, x:x + tile]
                     for r in range(6)])
  np.testing.assert_array_equal(column(1), column(0))   # lossless reconstruction
  np.testing.assert_array_equal(column(4), column(3))   # passes every finding on
  assert (column(3) != 127).any()                       # and there is a finding to pass on
  assert (column(5) == 127).all()                       # the blind one: grey, nothing changed
