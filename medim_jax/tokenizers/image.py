"""Image tokenizers behind one interface: ``encode(images) -> codes`` and ``decode(codes) -> images``.

Images are uint8 arrays (B, H, W, 3); codes are int32 (B, tokens_per_image) in raster order.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from medim_jax import errors

# What reading a damaged or foreign .npz raises (a truncated file is a BadZipFile or an EOFError).
UNREADABLE = (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile)
REBUILD = ("rebuild it: --mode tokenize into a fresh data.shards_dir rebuilds the shards' tokenizers, "
           "--mode train_vq the trained VQ tokenizer")


def _reason(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


class PalettePatchTokenizer:
  """A fixed quantiser for pictures drawn on a grid of flat-coloured cells from a small palette.

  Each token covers ``patch x patch`` cells. Code 0 is an empty patch (all background, palette
  colour 0); otherwise the code says which of the patch's cells are filled and with which single
  palette colour: ``1 + (colour - 1) * (2^(patch^2) - 1) + (pattern - 1)``. Exact on such
  pictures (the smoke data); a stand-in for the learned VQ tokenizer behind the same interface.
  """

  def __init__(self, palette, image_size: int, cell_size: int, patch: int = 1):
    self.palette = np.asarray(palette, np.float32)
    if self.palette.ndim != 2 or self.palette.shape[1] != 3:
      raise ValueError(f"palette must be (K, 3) RGB, got shape {self.palette.shape}")
    if image_size % (cell_size * patch):
      raise ValueError(f"image_size {image_size} is not a multiple of cell_size * patch "
                       f"({cell_size} * {patch})")
    self.image_size, self.cell_size, self.patch = image_size, cell_size, patch
    self.cells = image_size // cell_size
    self.grid = self.cells // patch
    self.patterns = 2 ** (patch * patch) - 1  # non-empty fill patterns of one patch
    digest = hashlib.sha256(self.palette.tobytes())
    digest.update(f"{image_size},{cell_size},{patch}".encode())
    self.fingerprint = "palette:" + digest.hexdigest()

  @property
  def codebook_size(self) -> int:
    return 1 + (len(self.palette) - 1) * self.patterns

  @property
  def tokens_per_image(self) -> int:
    return self.grid * self.grid

  def _patches(self, cell_colours):
    """(B, cells, cells) -> (B, grid*grid, patch*patch) in raster order of patches and of cells."""
    b, g, p = cell_colours.shape[0], self.grid, self.patch
    return cell_colours.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g, p * p)

  def encode(self, images) -> np.ndarray:
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, 3), got {images.shape}")
    b, n, c = images.shape[0], self.cells, self.cell_size
    means = images.astype(np.float32).reshape(b, n, c, n, c, 3).mean(axis=(2, 4))
    colours = ((means[..., None, :] - self.palette) ** 2).sum(-1).argmin(-1)  # (B, n, n)
    patches = self._patches(colours)
    filled = patches > 0
    pattern = (filled * (1 << np.arange(self.patch * self.patch))).sum(-1)
    counts = np.stack([(patches == k).sum(-1) for k in range(1, len(self.palette))], -1)
    colour = counts.argmax(-1) + 1  # the patch's most common non-background colour
    codes = np.where(pattern > 0, 1 + (colour - 1) * self.patterns + (pattern - 1), 0)
    return codes.astype(np.int32)

  def decode(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
      raise ValueError(f"codes must have shape (B, {self.tokens_per_image}), got {codes.shape}")
    codes = np.clip(codes, 0, self.codebook_size - 1)
    colour = np.where(codes > 0, (codes - 1) // self.patterns + 1, 0)
    pattern = np.where(codes > 0, (codes - 1) % self.patterns + 1, 0)
    bits = (pattern[..., None] >> np.arange(self.patch * self.patch)) & 1
    cells = bits * colour[..., None]  # (B, grid*grid, patch*patch)
    b, g, p = codes.shape[0], self.grid, self.patch
    grid = cells.reshape(b, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(b, self.cells, self.cells)
    pixels = self.palette[grid].repeat(self.cell_size, axis=1).repeat(self.cell_size, axis=2)
    return pixels.round().astype(np.uint8)


class PatchKMeansTokenizer:
  """A fixed patch quantiser: each ``patch x patch`` pixel block becomes its nearest codebook block.

  The codebook is fitted by k-means on training patches. A stand-in for the learned VQ tokenizer
  behind the same interface: good enough to carry coarse anatomy (heart size, effusion, large
  opacities) through the token space, not fine detail.
  """

  def __init__(self, codebook, patch: int, image_size: int):
    self.codebook = np.asarray(codebook, np.float32)  # (K, patch * patch * 3) in [0, 255]
    if self.codebook.ndim != 2 or self.codebook.shape[1] != patch * patch * 3:
      raise ValueError(f"codebook must be (K, {patch * patch * 3}), got {self.codebook.shape}")
    if image_size % patch:
      raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    self.patch, self.image_size = patch, image_size
    self.grid = image_size // patch
    digest = hashlib.sha256(self.codebook.tobytes())
    digest.update(f"{patch},{image_size}".encode())
    self.fingerprint = "patch_kmeans:" + digest.hexdigest()

  @property
  def codebook_size(self) -> int:
    return len(self.codebook)

  @property
  def tokens_per_image(self) -> int:
    return self.grid * self.grid

  def _patches(self, images) -> np.ndarray:
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, 3), got {images.shape}")
    b, g, p = images.shape[0], self.grid, self.patch
    patches = images.astype(np.float32).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, g * g, p * p * 3)

  def encode(self, images) -> np.ndarray:
    patches = self._patches(images)
    return _nearest(patches.reshape(-1, patches.shape[-1]), self.codebook).reshape(patches.shape[:2])

  def decode(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
      raise ValueError(f"codes must have shape (B, {self.tokens_per_image}), got {codes.shape}")
    blocks = self.codebook[np.clip(codes, 0, self.codebook_size - 1)]
    b, g, p = codes.shape[0], self.grid, self.patch
    images = blocks.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return images.reshape(b, self.image_size, self.image_size, 3).round().clip(0, 255).astype(np.uint8)

  @classmethod
  def fit(cls, images, codebook_size: int, patch: int, seed: int, iterations: int = 15,
          max_patches: int = 65_536) -> "PatchKMeansTokenizer":
    """k-means (Lloyd) on up to ``max_patches`` training patches; empty clusters are re-seeded."""
    images = np.asarray(images)
    probe = cls(np.zeros((1, patch * patch * 3)), patch, images.shape[1])
    patches = probe._patches(images).reshape(-1, patch * patch * 3)
    rng = np.random.default_rng(seed)
    if len(patches) > max_patches:
      patches = patches[rng.choice(len(patches), max_patches, replace=False)]
    if len(patches) < codebook_size:
      raise ValueError(f"{len(patches)} patches cannot fit a codebook of {codebook_size}")
    centres = patches[rng.choice(len(patches), codebook_size, replace=False)].copy()
    for _ in range(iterations):
      assignment = _nearest(patches, centres)
      counts = np.bincount(assignment, minlength=codebook_size)
      sums = np.zeros_like(centres)
      np.add.at(sums, assignment, patches)
      empty = counts == 0
      centres[~empty] = sums[~empty] / counts[~empty, None]
      centres[empty] = patches[rng.choice(len(patches), int(empty.sum()), replace=False)]
    return cls(centres, patch, images.shape[1])

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, codebook=self.codebook, patch=self.patch, image_size=self.image_size)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "PatchKMeansTokenizer":
    try:
      with np.load(path) as data:
        return cls(data["codebook"], int(data["patch"]), int(data["image_size"]))
    except UNREADABLE as e:
      raise errors.InputError(f"{path} is not a readable patch-quantiser file ({_reason(e)}); "
                              f"{REBUILD}") from None


def _nearest(x: np.ndarray, centres: np.ndarray, chunk: int = 16_384) -> np.ndarray:
  """Index of the nearest centre (squared L2) of each row of x, in chunks to bound memory."""
  centre_norms = (centres ** 2).sum(-1)
  out = np.empty(len(x), np.int32)
  for start in range(0, len(x), chunk):
    block = x[start:start + chunk]
    out[start:start + chunk] = (centre_norms - 2.0 * block @ centres.T).argmin(-1)
  return out


class VQTokenizer:
  """A trained (or converted) VQ model behind the image tokenizer interface; jitted, batched."""

  KIND = "vq"

  def __init__(self, vq_config, params, image_size: int, batch_size: int = 64):
    import jax
    from flax import nnx

    from medim_jax.models import vq
    self.config = vq_config
    self.image_size, self.batch_size = image_size, batch_size
    if image_size % vq_config.downsample:
      raise ValueError(f"image_size {image_size} is not a multiple of the VQ downsampling "
                       f"{vq_config.downsample}")
    self.grid = image_size // vq_config.downsample
    abstract = nnx.eval_shape(lambda: vq.VQModel(vq_config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    self.params = jax.tree.map(np.asarray, params)
    digest = hashlib.sha256(repr(vq_config).encode())
    for path, leaf in sorted(_flatten(self.params).items()):
      digest.update(path.encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
    self.fingerprint = "vq:" + digest.hexdigest()

    def encode(params, images):
      x = images.astype(np.float32) / 127.5 - 1.0
      return nnx.merge(graphdef, params).encode(x)

    def decode(params, codes):
      x = nnx.merge(graphdef, params).decode(codes)
      return (jax.numpy.clip(x, -1.0, 1.0) + 1.0) * 127.5

    def features(params, images):
      x = images.astype(np.float32) / 127.5 - 1.0
      latents = nnx.merge(graphdef, params).encode_latents(x)
      return latents.reshape(latents.shape[0], -1)

    self._encode, self._decode, self._features = jax.jit(encode), jax.jit(decode), jax.jit(features)

  @property
  def codebook_size(self) -> int:
    return self.config.codebook_size

  @property
  def tokens_per_image(self) -> int:
    return self.grid * self.grid

  def _batches(self, array):
    """Fixed-size batches (the last one padded), so each shape compiles once."""
    for start in range(0, len(array), self.batch_size):
      chunk = array[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      yield np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk, len(chunk)

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, 3), got {images.shape}")
    return images

  def encode(self, images) -> np.ndarray:
    images = self._check_images(images)
    out = [np.asarray(self._encode(self.params, batch))[:n] for batch, n in self._batches(images)]
    codes = np.concatenate(out) if out else np.zeros((0, self.grid, self.grid), np.int32)
    return codes.reshape(len(images), -1).astype(np.int32)

  def features(self, images) -> np.ndarray:
    """The encoder's continuous latents before quantisation, flattened: (B, grid * grid * dim)."""
    out = [np.asarray(self._features(self.params, batch))[:n]
           for batch, n in self._batches(self._check_images(images))]
    return np.concatenate(out).astype(np.float32)

  def decode(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
      raise ValueError(f"codes must have shape (B, {self.tokens_per_image}), got {codes.shape}")
    grids = np.clip(codes, 0, self.codebook_size - 1).reshape(-1, self.grid, self.grid)
    out = [np.asarray(self._decode(self.params, batch))[:n] for batch, n in self._batches(grids)]
    return np.concatenate(out).round().astype(np.uint8)

  def save(self, path: str) -> None:
    import dataclasses
    import json
    arrays = {f"param:{k}": v for k, v in _flatten(self.params).items()}
    config = json.dumps(dataclasses.asdict(self.config))
    tmp = path + ".tmp.npz"
    np.savez(tmp, kind=self.KIND, config=config, image_size=self.image_size, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "VQTokenizer":
    import json

    from medim_jax.models import vq
    try:
      with np.load(path) as data:
        config = vq.VQConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in json.loads(str(data["config"])).items()})
        flat = {k[len("param:"):]: data[k] for k in data.files if k.startswith("param:")}
        image_size = int(data["image_size"])
    except UNREADABLE as e:
      raise errors.InputError(f"{path} is not a readable VQ tokenizer file ({_reason(e)}); "
                              f"{REBUILD}") from None
    return cls(config, _unflatten(flat), image_size)


def _flatten(tree, prefix="") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(_flatten(value, name))
    else:
      out[name] = np.asarray(value)
  return out


def _unflatten(flat: dict) -> dict:
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for part in parents:
      node = node.setdefault(int(part) if part.isdigit() else part, {})
    node[int(leaf) if leaf.isdigit() else leaf] = value
  return tree


def code_appearance(tokenizer, chunk: int = 256) -> np.ndarray:
  """(codebook_size, pixels per token * 3) in [0, 1]: what each code looks like once decoded.

  Each code is decoded as an image made only of that code, and its token-sized blocks averaged;
  for the patch quantiser this is exactly its codebook block. Works for any tokenizer that decodes.
  """
  grid = int(round(np.sqrt(tokenizer.tokens_per_image)))
  rows = []
  for start in range(0, tokenizer.codebook_size, chunk):
    codes = np.arange(start, min(start + chunk, tokenizer.codebook_size), dtype=np.int32)
    images = tokenizer.decode(np.repeat(codes[:, None], tokenizer.tokens_per_image, axis=1))
    n, size = images.shape[0], images.shape[1]
    blocks = images.reshape(n, grid, size // grid, grid, size // grid, 3).astype(np.float32)
    rows.append(blocks.mean(axis=(1, 3)).reshape(n, -1) / 255.0)
  return np.concatenate(rows)


def load_image_tokenizer(path: str):
  """A saved image tokenizer (.npz): the VQ model or the patch quantiser, told apart by its contents."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"image tokenizer {path} does not exist")
  try:
    with np.load(path) as data:
      kind = str(data["kind"]) if "kind" in data.files else "patch_kmeans"
  except UNREADABLE as e:
    raise errors.InputError(f"{path} is not a readable image tokenizer file ({_reason(e)}); "
                            f"{REBUILD}") from None
  return VQTokenizer.load(path) if kind == VQTokenizer.KIND else PatchKMeansTokenizer.load(path)
