"""Paired image + report folders: ``NAME.png|jpg`` next to ``NAME.txt`` (the MIMIC-CXR and PathGen
layouts of the original, and what the medim-demo builder writes).

Every problem names the file and what is wrong with it: an image without its report or a report
without its image, an image that cannot be decoded, a report that is empty or not UTF-8. Bad pairs
are skipped and summarised (``on_bad_pair="skip"``) or stop the load (``"error"``).
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medim_jax import errors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")  # DICOM: data/dicom.py (pydicom)


class BadPairError(errors.InputError):
  """A pair that cannot be used; the message names the file and the problem."""

  def __init__(self, message: str, kind: str = "bad pair"):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class FolderData:
  folder: str
  names: list[str]
  images: np.ndarray             # (N, S, S, 3) uint8
  texts: list[str]
  skipped: list[BadPairError]    # one per skipped pair, each naming its file and problem
  # DICOM images read, by how their values became grey levels (e.g. "file window C=.. W=..").
  dicom_display: dict[str, int] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.names)

  def summary(self) -> str:
    line = f"{self.folder}: {len(self)} pairs"
    if self.skipped:
      kinds = collections.Counter(e.kind for e in self.skipped)
      line += f", {len(self.skipped)} skipped (" + ", ".join(
          f"{n} {kind}" for kind, n in kinds.most_common()) + f"); first: {self.skipped[0]}"
    return line


def scan(folder: str) -> tuple[list[tuple[str, str, str]], list[BadPairError]]:
  """(name, image path, text path) of each complete pair, and an error per file missing its partner."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"dataset folder {folder} does not exist")
  images, texts, duplicates = {}, {}, []
  for entry in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(entry)
    if ext.lower() in IMAGE_EXTENSIONS:
      if stem in images:
        duplicates.append(BadPairError(f"{os.path.join(folder, entry)}: a second image for {stem!r} "
                                       f"(kept {os.path.basename(images[stem])})", "duplicate image"))
        continue
      images[stem] = os.path.join(folder, entry)
    elif ext.lower() == ".txt":
      texts[stem] = os.path.join(folder, entry)
  pairs = [(stem, images[stem], texts[stem]) for stem in sorted(images) if stem in texts]
  missing = duplicates + [BadPairError(f"{images[s]}: no report {s}.txt beside it", "missing report")
                          for s in sorted(images) if s not in texts]
  missing += [BadPairError(f"{texts[s]}: no image {s}.png|jpg beside it", "missing image")
              for s in sorted(texts) if s not in images]
  return pairs, missing


def scan_reports(folder: str) -> list[tuple[str, None, str]]:
  """(name, None, text path) of every ``NAME.txt`` in ``folder``: a text-only dataset's reports."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"dataset folder {folder} does not exist")
  return [(stem, None, os.path.join(folder, entry)) for entry in sorted(os.listdir(folder))
          for stem, ext in [os.path.splitext(entry)] if ext.lower() == ".txt"]


def count_images(folder: str) -> int:
  """How many image files (IMAGE_EXTENSIONS) ``folder`` holds."""
  return sum(os.path.splitext(entry)[1].lower() in IMAGE_EXTENSIONS for entry in os.listdir(folder))


def read_text(path: str) -> str:
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadPairError(f"{path}: report is not UTF-8 (byte {e.start})", "non-UTF-8 report") from None
  text = " ".join(text.split())
  if not text:
    raise BadPairError(f"{path}: report is empty", "empty report")
  return text


def _to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB; 16-bit and float greyscale (common for radiographs) are min-max scaled, not clipped."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    values = np.asarray(image, np.float64)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    image = Image.fromarray(scaled.round().astype(np.uint8))
  return image.convert("RGB")


def read_image(path: str, image_size: int, square: str = "pad",
               dicom_window: tuple[float, float] | None = None) -> np.ndarray:
  """(S, S, 3) uint8: padded (black) or centre-cropped to square, then resized."""
  return read_image_noting_display(path, image_size, square, dicom_window)[0]


def read_image_noting_display(path: str, image_size: int, square: str = "pad",
                              dicom_window: tuple[float, float] | None = None):
  """``read_image`` and, for a DICOM, how its values became grey levels (data/dicom.py: which
  window, MONOCHROME1 inverted or not); None for other images. ``dicom_window`` (center, width)
  replaces every DICOM's own window."""
  if path.lower().endswith(".dcm"):
    from medim_jax.data import dicom
    try:
      pixels, how = dicom.read(path, window=dicom_window)
    except errors.InputError as e:
      raise BadPairError(str(e), "unreadable image") from None
    display = how["window"] + (", MONOCHROME1 inverted" if how["inverted"] else "")
    return square_and_resize(Image.fromarray(pixels).convert("RGB"), image_size, square), display
  try:
    with Image.open(path) as image:
      image.load()
      image = _to_rgb(ImageOps.exif_transpose(image))
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    linked = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    raise BadPairError(f"{path}{linked}: image cannot be read ({type(e).__name__}: {e})",
                       "unreadable image") from None
  return square_and_resize(image, image_size, square), None


def square_and_resize(image: Image.Image, image_size: int, square: str = "pad") -> np.ndarray:
  """An RGB image -> (S, S, 3) uint8: padded (black) or centre-cropped to square, then resized."""
  width, height = image.size
  if square not in ("pad", "crop"):
    raise ValueError(f"square must be 'pad' or 'crop', got {square!r}")
  side = max(width, height) if square == "pad" else min(width, height)
  canvas = Image.new("RGB", (side, side))
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  canvas = canvas.resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(canvas, np.uint8)


def load(folder: str, image_size: int, square: str = "pad", on_bad_pair: str = "skip",
         progress=None, dicom_window: tuple[float, float] | None = None) -> FolderData:
  """Every usable pair of ``folder``; see the module doc for what happens to bad ones."""
  if on_bad_pair not in ("skip", "error"):
    raise ValueError(f"on_bad_pair must be 'skip' or 'error', got {on_bad_pair!r}")
  pairs, skipped = scan(folder)
  if skipped and on_bad_pair == "error":
    raise skipped[0]
  data = load_pairs(pairs, image_size, square, on_bad_pair, progress, dicom_window)
  data.folder, data.skipped = folder, skipped + data.skipped
  if not data.names:
    detail = f"; first problem: {data.skipped[0]}" if data.skipped else ""
    raise BadPairError(f"{folder}: no usable image + report pairs (NAME.png|jpg with NAME.txt)"
                       f"{detail}")
  return data


def load_pairs(pairs, image_size: int, square: str = "pad", on_bad_pair: str = "skip",
               progress=None, dicom_window: tuple[float, float] | None = None) -> FolderData:
  """Read (name, image path, text path) pairs; bad ones are skipped or raised (see ``load``). An
  image path of None is a report without an image (``scan_reports``): only its text is read, and
  ``images`` holds the other pairs' images."""
  names, images, texts, skipped, displays = [], [], [], [], collections.Counter()
  for name, image_path, text_path in pairs:
    try:
      texts.append(read_text(text_path))
      display = None
      if image_path is not None:
        image, display = read_image_noting_display(image_path, image_size, square, dicom_window)
        images.append(image)
      names.append(name)
      if display:
        displays[display] += 1
    except BadPairError as e:
      if on_bad_pair == "error":
        raise
      del texts[len(names):]
      skipped.append(e)
    if progress:
      progress(1)
  stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
  return FolderData("", names, stacked, texts, skipped, dict(displays))
