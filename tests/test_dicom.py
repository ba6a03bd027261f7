"""DICOM in (modality LUT, the file's window, MONOCHROME1) and out (marked synthetic)."""

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medim_jax import errors  # noqa: E402
from medim_jax.data import dicom, folders  # noqa: E402


def write_radiograph(path, stored, photometric="MONOCHROME2", window=None, slope=1.0, intercept=0.0):
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, photometric
  ds.Rows, ds.Columns = stored.shape
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if window:
    ds.WindowCenter, ds.WindowWidth = window
  ds.PixelData = stored.astype(np.uint16).tobytes()
  ds.save_as(str(path), enforce_file_format=True)


def test_the_file_s_window_after_the_modality_lut_and_monochrome1_inverted(tmp_path):
  stored = np.array([[0, 100], [200, 4000]])
  path = tmp_path / "film.dcm"
  # Modality values 2 * stored - 100: -100, 100, 300, 7900; window 200 +- 200 -> [0, 400].
  write_radiograph(path, stored, "MONOCHROME1", window=(200, 400), slope=2.0, intercept=-100.0)
  pixels, how = dicom.read(str(path))
  assert how["inverted"] and how["window"].startswith("file window C=200 W=400")
  # pydicom's linear VOI function (PS3.3 C.11.2.1.2) then min-max, then inverted: 255 - ...
  values = dicom.read(str(path), window=(200, 400))[0]
  np.testing.assert_array_equal(values, 255 - np.round(np.clip([[-100, 100], [300, 7900]], 0, 400)
                                                       / 400 * 255).astype(np.uint8))
  assert pixels[0, 0] > pixels[1, 0] > pixels[1, 1]  # brighter where the value is lower
  assert pixels[1, 1] == 0 and pixels[0, 0] == 255


def test_without_a_window_the_full_range_is_used(tmp_path):
  path = tmp_path / "film.dcm"
  write_radiograph(path, np.array([[10, 20], [30, 50]]))
  pixels, how = dicom.read(str(path))
  assert "full range" in how["window"] and not how["inverted"]
  np.testing.assert_array_equal(pixels, np.round(np.array([[0, 10], [20, 40]]) / 40 * 255))


def test_a_dicom_pair_is_read_like_a_png_and_a_bad_one_is_named(tmp_path):
  write_radiograph(tmp_path / "case1.dcm", np.arange(64).reshape(8, 8) * 10)
  (tmp_path / "case1.txt").write_text("no acute findings.")
  (tmp_path / "case2.dcm").write_bytes(b"not a dicom file at all")
  (tmp_path / "case2.txt").write_text("clear lungs.")
  data = folders.load(str(tmp_path), 16)
  assert data.names == ["case1"] and data.images.shape == (1, 16, 16, 3)
  assert "case2.dcm: not a readable DICOM image" in str(data.skipped[0])


def test_a_generated_image_is_written_as_a_dicom_that_says_it_is_synthetic(tmp_path):
  image = np.zeros((8, 8, 3), np.uint8)
  image[2:6, 2:6] = 255
  path = tmp_path / "generated.dcm"
  dicom.write_synthetic(str(path), image, "report->image from 'cardiomegaly.'")
  ds = pydicom.dcmread(str(path))
  assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
  assert "SYNTHETIC" in ds.SeriesDescription and "not a patient image" in ds.ImageComments
  assert "cardiomegaly" in ds.DerivationDescription and str(ds.PatientName) == "SYNTHETIC^MEDIM_JAX"
  np.testing.assert_array_equal(dicom.read(str(path))[0], image[..., 0])


def test_a_missing_pydicom_is_one_clear_error(monkeypatch, tmp_path):
  import builtins
  real_import = builtins.__import__
  monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
      (_ for _ in ()).throw(ImportError(name)) if name == "pydicom" else real_import(name, *a, **k)))
  with pytest.raises(errors.InputError, match="pip install 'medim_jax\\[dicom\\]'"):
    dicom.read(str(tmp_path / "x.dcm"))


def test_a_config_window_replaces_each_file_s_and_the_manifest_records_every_dicom_display(tmp_path):
  import json
  from test_shards_and_pipeline import folders_config, make_folder

  from medim_jax.data import tokenize
  for name, count, seed in (("a_train", 60, 0), ("a_test", 10, 1), ("b_train", 40, 2), ("b_val", 10, 3)):
    make_folder(tmp_path / name, count, seed)
  stored = np.arange(64).reshape(8, 8) * 10
  write_radiograph(tmp_path / "a_train" / "film1.dcm", stored, "MONOCHROME1", window=(200, 400))
  write_radiograph(tmp_path / "a_train" / "film2.dcm", stored)
  for name in ("film1", "film2"):
    (tmp_path / "a_train" / f"{name}.txt").write_text("upper left finding. clear.")

  data = folders.load(str(tmp_path / "a_train"), 16, dicom_window=(100.0, 200.0))
  assert data.dicom_display == {"config window C=100 W=200, MONOCHROME1 inverted": 1,
                                "config window C=100 W=200": 1}
  film2 = data.images[data.names.index("film2")]
  expected = folders.square_and_resize(as_rgb_image(dicom.read(str(tmp_path / "a_train" / "film2.dcm"),
                                                          window=(100.0, 200.0))[0]), 16)
  np.testing.assert_array_equal(film2, expected)

  manifests = {}
  for window, directory in (("", "own_windows"), ("100,200", "config_window")):
    config = folders_config(tmp_path, str(tmp_path / directory))
    config.data.dicom_window = window
    tokenize.tokenize(config, "unused", progress=False)
    manifests[window] = json.loads((tmp_path / directory / "manifest.json").read_text())
  assert manifests[""]["dicom_display"] == {"file window C=200 W=400, MONOCHROME1 inverted": 1,
                                            "full range (the file has no window)": 1}
  assert "dicom_window" not in manifests[""]["settings"]
  assert manifests["100,200"]["settings"]["dicom_window"] == "100,200"
  assert sum(manifests["100,200"]["dicom_display"].values()) == 2

  for bad, message in (("bright", "expected 'center,width'"), ("40,0", "width must be positive")):
    with pytest.raises(errors.InputError, match=message):
      dicom.parse_window(bad)


def as_rgb_image(pixels):
  from PIL import Image
  return Image.fromarray(pixels).convert("RGB")


def test_every_reader_of_a_run_s_images_applies_the_config_window(tmp_path):
  # Tokenizing, VQ training and evaluation must see the same pixels of a DICOM.
  from configs import demo
  from medim_jax.evaluation import ground_truth
  from medim_jax.training import train_vq
  folder = tmp_path / "train"
  folder.mkdir()
  write_radiograph(folder / "film.dcm", np.arange(64).reshape(8, 8) * 10)
  (folder / "film.txt").write_text("clear lungs.")
  config = demo.get_config("tiny")
  config.data.name, config.data.image_size, config.data.dicom_window = "folders", 16, "100,200"
  config.data.datasets.chest.train = str(folder)
  config.data.datasets.pathology.train = ""
  windowed = folders.load(str(folder), 16, dicom_window=(100.0, 200.0)).images
  assert not np.array_equal(windowed, folders.load(str(folder), 16).images)  # the window matters
  np.testing.assert_array_equal(
      ground_truth.load_split(str(folder), 16, "pad", dicom.config_window(config.data)).images, windowed)
  np.testing.assert_array_equal(train_vq.load_split_images(config, "train")[0], windowed)
  assert dicom.config_window(demo.get_config("tiny").data) is None
