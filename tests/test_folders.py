"""The paired-folder loader: what it reads, and a clear message for every kind of bad pair."""

import numpy as np
import pytest
from PIL import Image

from medim_jax.data import folders


def write_pair(folder, name, text="a small round opacity.", size=(20, 10), colour=(200, 30, 30),
               ext=".png"):
  folder.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(folder / f"{name}{ext}")
  if text is not None:
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def test_reads_pairs_padded_to_square_and_resized(tmp_path):
  write_pair(tmp_path, "b", "second  report\n", size=(20, 10))
  write_pair(tmp_path, "a", "first report", size=(10, 10), ext=".jpg")
  data = folders.load(str(tmp_path), image_size=8)
  assert data.names == ["a", "b"] and data.texts == ["first report", "second report"]
  assert data.images.shape == (2, 8, 8, 3) and data.images.dtype == np.uint8
  wide = data.images[1]
  assert wide[0].max() < 40 and wide[4, 4, 0] > 150  # black padding above, the picture in the middle
  assert data.skipped == []
  cropped = folders.load(str(tmp_path), image_size=8, square="crop")
  assert cropped.images[1].min(axis=(0, 1))[0] > 150  # crop keeps only the picture


def test_bad_pairs_are_skipped_with_named_reasons(tmp_path):
  write_pair(tmp_path, "good")
  write_pair(tmp_path, "no_report", text=None)
  (tmp_path / "no_image.txt").write_text("orphan report")
  write_pair(tmp_path, "empty", text="  \n ")
  write_pair(tmp_path, "latin1")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (tmp_path / "broken.txt").write_text("report of a broken image")

  data = folders.load(str(tmp_path), image_size=8)
  assert data.names == ["good"]
  kinds = sorted(e.kind for e in data.skipped)
  assert kinds == ["empty report", "missing image", "missing report", "non-UTF-8 report",
                   "unreadable image"]
  messages = {e.kind: str(e) for e in data.skipped}
  assert messages["missing report"].startswith(str(tmp_path / "no_report.png"))
  assert "no report no_report.txt" in messages["missing report"]
  assert messages["missing image"].startswith(str(tmp_path / "no_image.txt"))
  assert str(tmp_path / "latin1.txt") in messages["non-UTF-8 report"]
  assert str(tmp_path / "empty.txt") in messages["empty report"]
  assert str(tmp_path / "broken.png") in messages["unreadable image"]
  summary = data.summary()
  assert "1 pairs, 5 skipped" in summary and "1 unreadable image" in summary


def test_error_mode_stops_at_the_first_bad_pair(tmp_path):
  write_pair(tmp_path, "good")
  write_pair(tmp_path, "empty", text="")
  with pytest.raises(folders.BadPairError, match=r"empty\.txt: report is empty"):
    folders.load(str(tmp_path), image_size=8, on_bad_pair="error")


def test_no_usable_pairs_and_missing_folder_are_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    folders.load(str(tmp_path / "nowhere"), image_size=8)
  write_pair(tmp_path, "only_image", text=None)
  with pytest.raises(folders.BadPairError, match="no usable image \\+ report pairs.*only_image.png"):
    folders.load(str(tmp_path), image_size=8)


def test_sixteen_bit_greyscale_is_scaled_not_clipped_and_duplicates_are_skipped(tmp_path):
  ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250).astype(np.uint16)  # 0..63750
  Image.fromarray(ramp).save(tmp_path / "film.png")  # a 16-bit PNG, as radiographs often are
  (tmp_path / "film.txt").write_text("a film")
  write_pair(tmp_path, "twin")
  write_pair(tmp_path, "twin", ext=".jpg")
  data = folders.load(str(tmp_path), image_size=16)
  film = data.images[data.names.index("film")]
  assert film.min() == 0 and film.max() == 255 and (film == 255).mean() < 0.05
  assert [e.kind for e in data.skipped] == ["duplicate image"]
  assert "twin.png" in str(data.skipped[0]) and "kept twin.jpg" in str(data.skipped[0])
