"""A trained work directory as a Python object: generate from your own inputs.

    pipe = MeDiMPipeline.from_workdir("workdir/demo")
    images = pipe.report_to_image(["the heart is enlarged. no effusion."], seed=0)
    reports = pipe.image_to_report([PIL.Image.open("film.png")])
    images, reports = pipe.joint(["the heart"])
    image, report = pipe.infill(report_template="the heart is ___. no ___.", image=film,
                                image_mask=mask)

Inputs are plain strings and PIL images or uint8 arrays of any size (padded or cropped to square
and resized as the data pipeline does, ``data.square``); outputs are PIL images and strings. The
dataset's prompt (``chest x-ray.`` for medim-demo's chest part) is put before every report, as in
training. A sample depends only on its input, its place in the list and the seed: the same for any
batch size (the sampler's per-example keys). ``details=True`` returns a :class:`Generation` with the
probability each generated token had when it was drawn (``image_confidence``, ``report_confidence``).
The command line over it is ``python -m medim_jax.generate`` (generate.py).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
from PIL import Image, ImageOps

from medim_jax import errors, visualize

# A blank in a report template: "___" (``blank_tokens`` tokens) or "[MASK]" / "[MASK:n]" (n tokens).
BLANK = re.compile(r"_{3,}|\[MASK(?::(\d+))?\]")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def as_rgb_array(image, image_size: int, square: str, name: str = "image") -> np.ndarray:
  """A PIL image, a uint8 array (H, W[, 3]) or a path -> (S, S, 3) uint8 as the data pipeline makes it."""
  from medim_jax.data import folders
  if isinstance(image, (str, os.PathLike)):
    try:
      return folders.read_image(str(image), image_size, square)
    except folders.BadPairError as e:
      raise errors.InputError(str(e)) from None
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise errors.InputError(f"{name}: expected a uint8 array (H, W) or (H, W, 3), got "
                              f"{image.dtype} {image.shape}")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise errors.InputError(f"{name}: expected a PIL image, a uint8 array or a path, got "
                            f"{type(image).__name__}")
  return folders.square_and_resize(folders._to_rgb(ImageOps.exif_transpose(image)), image_size, square)


def mask_to_tokens(mask, image_shape: tuple[int, int], grid: int, square: str) -> np.ndarray:
  """A boolean pixel mask of the input image's size -> (grid * grid,) bool: a token is redrawn when
  any of its pixels is (the mask goes through the same square-and-resize as the image)."""
  mask = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
  if mask.ndim == 3:
    mask = mask.max(axis=-1)
  if mask.shape != tuple(image_shape):
    raise errors.InputError(f"the image mask is {mask.shape[1]}x{mask.shape[0]} pixels, the image "
                            f"{image_shape[1]}x{image_shape[0]}: give a mask of the image's size")
  height, width = mask.shape
  side = max(width, height) if square == "pad" else min(width, height)
  canvas = np.zeros((side, side), bool)
  top, left = (side - height) // 2, (side - width) // 2
  src = mask[max(-top, 0):max(-top, 0) + min(side, height), max(-left, 0):max(-left, 0) + min(side, width)]
  canvas[max(top, 0):max(top, 0) + src.shape[0], max(left, 0):max(left, 0) + src.shape[1]] = src > 0
  cell = side / grid
  tokens = np.zeros((grid, grid), bool)
  for row in range(grid):
    for col in range(grid):
      tokens[row, col] = canvas[int(row * cell):int(np.ceil((row + 1) * cell)),
                                int(col * cell):int(np.ceil((col + 1) * cell))].any()
  return tokens.reshape(-1)


@dataclasses.dataclass
class Generation:
  """What one call produced, row by row. Confidences are the probabilities the sampler's
  distribution gave each token when it was drawn; NaN where the token was given, not generated."""
  images: list                    # PIL images
  reports: list[str]
  tokens: np.ndarray              # (N, L) joint ids
  image_confidence: np.ndarray    # (N, grid, grid) float32
  report_confidence: list         # per row: [(token text, probability or NaN), ...] up to EOS
  model_calls: np.ndarray | None = None  # (N,) model evaluations each row took (x2 with CFG)


class MeDiMPipeline:
  """A trained model with its tokenizers: load once, then call with plain inputs."""

  def __init__(self, config, dataset, trainer, params, step: int):
    self.config, self.dataset, self.trainer, self.params, self.step = (
        config, dataset, trainer, params, step)
    self.layout = dataset.layout
    self.text_tokenizer, self.image_tokenizer = dataset.text_tokenizer, dataset.image_tokenizer
    self.grid = self.image_tokenizer.grid  # image tokens per side
    self._samplers = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, config=None) -> "MeDiMPipeline":
    """``step``: a checkpoint (None: the latest); EMA params when the run kept them and
    config.sample.use_ema. ``config``: None reads the run's own (``workdir/config.txt``); or a
    ConfigDict, or a file "configs/demo.py[:arg]"."""
    from medim_jax import sample
    from medim_jax.data import build as data_build
    from medim_jax.training import train
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise errors.InputError(f"{workdir} has no checkpoints/: train first "
                              f"(python -m medim_jax.main --workdir {workdir} --mode train)")
    config = load_config(config) if config is not None else config_of_workdir(workdir)
    with config.unlocked():
      config.data.verify_shards = False  # only the tokenizers and the layout are read
    dataset = data_build.build_dataset(config, workdir)
    trainer = train.Trainer(config, dataset.layout)
    try:
      params, step = sample.load_sampling_params(config, workdir, trainer, step)
    except FileNotFoundError as e:
      raise errors.InputError(str(e)) from None
    except errors.CorruptFileError:
      raise
    except ValueError as e:  # the checkpoint's shapes are not this config's model
      raise errors.InputError(f"the checkpoint in {workdir}/checkpoints is not of the model "
                              f"{config.model.d_model}x{config.model.num_layers} this config "
                              f"builds ({str(e).splitlines()[0][:200]}): pass the config it was "
                              "trained with") from None
    return cls(config, dataset, trainer, params, step)

  # -- inputs ---------------------------------------------------------------------------------

  def prompt_ids(self, dataset: str | None) -> list[int]:
    """The prompt of ``dataset`` (None: the run's first dataset, e.g. medim-demo's chest)."""
    datasets = self.dataset.manifests[self.dataset.directories[0]]["datasets"]
    name = dataset or next(iter(datasets))
    if name not in datasets:
      raise errors.InputError(f"unknown dataset {name!r}; this model was trained on {sorted(datasets)}")
    prompt = datasets[name].get("prompt", "")
    return self.text_tokenizer.tokenize(prompt) if prompt else []

  def report_ids(self, report: str, dataset: str | None, what: str = "report") -> np.ndarray:
    """prompt + report + EOS + padding, as tokenize writes it."""
    if not isinstance(report, str) or not report.strip():
      raise errors.InputError(f"{what} is empty: give the report's text")
    ids = self.prompt_ids(dataset) + self.text_tokenizer.tokenize(report)
    return self._fit(ids, what)

  def _fit(self, ids, what: str) -> np.ndarray:
    from medim_jax.tokenizers import text as text_tokenizers
    length = self.layout.text_length
    if len(ids) + 1 > length:
      if not self.config.data.truncate_reports:
        raise errors.InputError(f"{what} needs {len(ids) + 1} tokens; the text segment holds "
                                f"{length} (shorten it, or allow data.truncate_reports)")
      print(f"warning: {what} needs {len(ids) + 1} tokens; truncated to the text segment's {length}")
    return text_tokenizers.fixed_length(ids, length, self.text_tokenizer.eos_id,
                                        self.text_tokenizer.pad_id, truncate=True)

  def template_ids(self, template: str, dataset: str | None, blank_tokens: int):
    """A report with blanks -> (ids, blank mask): the given words' ids in place, MASK in every blank."""
    if not template.strip():
      raise errors.InputError("the report template is empty")
    ids = list(self.prompt_ids(dataset))
    blank = [False] * len(ids)
    position = 0
    for match in BLANK.finditer(template):
      piece = template[position:match.start()]
      if piece.strip():
        words = self.text_tokenizer.tokenize(piece)
        ids += words
        blank += [False] * len(words)
      count = int(match.group(1)) if match.group(1) else blank_tokens
      ids += [self.layout.mask_id] * count
      blank += [True] * count
      position = match.end()
    if not any(blank):
      raise errors.InputError(f"the report template has no blank (___ or [MASK] or [MASK:n]): "
                              f"{template!r}")
    rest = template[position:]
    if rest.strip():
      words = self.text_tokenizer.tokenize(rest)
      ids += words
      blank += [False] * len(words)
    fitted = self._fit(ids, "the report template")
    return fitted, np.asarray(fitted == self.layout.mask_id)

  def image_codes(self, images) -> tuple[np.ndarray, list[tuple[int, int]]]:
    arrays, sizes = [], []
    for i, image in enumerate(images):
      original = image
      if isinstance(original, (str, os.PathLike)):
        try:
          with Image.open(original) as opened:
            sizes.append(ImageOps.exif_transpose(opened).size[::-1])
        except OSError as e:
          raise errors.InputError(f"{original}: image cannot be read ({type(e).__name__}: {e})") from None
      else:
        sizes.append(np.asarray(original).shape[:2] if isinstance(original, np.ndarray)
                     else original.size[::-1])
      arrays.append(as_rgb_array(original, self.config.data.image_size, self.config.data.square,
                                 f"image {i + 1}"))
    return np.asarray(self.image_tokenizer.encode(np.stack(arrays))), sizes

  # -- generation -----------------------------------------------------------------------------

  def _sampler(self, overrides: dict):
    from medim_jax.diffusion import sampler as sampler_lib
    from medim_jax.parallel import sharding
    key = tuple(sorted(overrides.items()))
    if key not in self._samplers:
      try:
        config = dataclasses.replace(sampler_lib.SamplerConfig.from_config(self.config.sample),
                                     **overrides)
      except TypeError as e:  # an unknown keyword
        raise errors.InputError(f"sampler settings {sorted(overrides)}: {e}") from None
      self._samplers[key] = sampler_lib.Sampler(
          self.trainer.model.apply, self.layout, self.trainer.schedule, config,
          batch_sharding=sharding.batch_sharding(self.trainer.mesh), cache_model=self.trainer.model)
    return self._samplers[key]

  def sampler_settings(self, **sampler_overrides) -> dict:
    return dataclasses.asdict(self._sampler(sampler_overrides).config)

  def generate(self, inputs: np.ndarray, seed: int = 0, progress_bar: bool = False,
               **sampler_overrides) -> Generation:
    """Every MASK of the (N, L) joint-id rows filled; rows go through in config.sample.batch_size
    batches, example id = the row's index (so a row's sample does not depend on the batch)."""
    from medim_jax import sample
    sampler = self._sampler(sampler_overrides)
    masked = inputs == self.layout.mask_id
    steps = (sampler.config.text_steps if masked[:, self.layout.text_slice].any() else 0,
             sampler.config.image_steps if masked[:, self.layout.image_slice].any() else 0)
    out = sample.sample_in_batches(sampler, self.params, self.trainer.mesh, inputs,
                                   np.arange(len(inputs)), self.config.sample.batch_size, seed,
                                   steps, "generate" if progress_bar else None)
    return dataclasses.replace(self.decode(out.tokens, out.reveal_prob), model_calls=out.model_calls)

  def decode(self, tokens: np.ndarray, probs: np.ndarray | None = None) -> Generation:
    if probs is None:
      probs = np.full(tokens.shape, np.nan, np.float32)
    text_ids, codes = self.layout.split(tokens)
    text_probs, image_probs = probs[:, self.layout.text_slice], probs[:, self.layout.image_slice]
    pixels = self.image_tokenizer.decode(np.asarray(codes))
    reports, confidences = [], []
    for ids, p in zip(np.asarray(text_ids), text_probs):
      ids, p = self._without_prompt(ids, p)
      reports.append(self.text_tokenizer.decode(ids))
      confidences.append(visualize.token_pieces(self.text_tokenizer, ids, p))
    return Generation(images=[Image.fromarray(np.asarray(p, np.uint8)) for p in pixels],
                      reports=reports, tokens=tokens,
                      image_confidence=image_probs.reshape(-1, self.grid, self.grid),
                      report_confidence=confidences)

  def _without_prompt(self, ids, probs):
    prompt = self.prompt_ids(None)
    ids = np.asarray(ids)
    if prompt and list(ids[:len(prompt)]) == prompt:
      return ids[len(prompt):], probs[len(prompt):]
    return ids, probs

  def _rows(self, count: int) -> np.ndarray:
    return np.full((count, self.layout.seq_length), self.layout.mask_id, np.int32)

  # -- the tasks ------------------------------------------------------------------------------

  def report_rows(self, reports: list[str], dataset: str | None = None) -> np.ndarray:
    """report->image inputs; every report is checked before anything is generated."""
    rows = self._rows(len(reports))
    for i, report in enumerate(reports):
      rows[i, self.layout.text_slice] = self.report_ids(report, dataset, f"report {i + 1}")
    return rows

  def image_rows(self, images) -> np.ndarray:
    codes, _ = self.image_codes(images)
    rows = self._rows(len(codes))
    rows[:, self.layout.image_slice] = self.layout.image_ids(codes)
    return rows

  def prompt_rows(self, prompts: list[str], dataset: str | None = None) -> np.ndarray:
    rows = self._rows(len(prompts))
    for i, prompt in enumerate(prompts):
      if not isinstance(prompt, str):
        raise errors.InputError(f"prompt {i + 1}: expected a string, got {type(prompt).__name__}")
      ids = self.prompt_ids(dataset) + (self.text_tokenizer.tokenize(prompt) if prompt.strip() else [])
      if len(ids) >= self.layout.text_length:
        raise errors.InputError(f"prompt {i + 1} needs {len(ids)} tokens; the text segment holds "
                                f"{self.layout.text_length} with room to generate")
      rows[i, :len(ids)] = ids
    return rows

  def report_to_image(self, reports: list[str], seed: int = 0, dataset: str | None = None,
                      details: bool = False, progress_bar: bool = False, **sampler_overrides):
    """Reports -> PIL images (``details``: the whole :class:`Generation`)."""
    out = self.generate(self.report_rows(_as_list(reports, "reports"), dataset), seed, progress_bar,
                        **sampler_overrides)
    return out if details else out.images

  def image_to_report(self, images, seed: int = 0, details: bool = False, progress_bar: bool = False,
                      **sampler_overrides):
    """Images (PIL, uint8 arrays or paths) -> report strings (``details``: the Generation)."""
    out = self.generate(self.image_rows(_as_list(images, "images")), seed, progress_bar,
                        **sampler_overrides)
    return out if details else out.reports

  def joint(self, prompts: list[str], seed: int = 0, dataset: str | None = None,
            details: bool = False, progress_bar: bool = False, **sampler_overrides):
    """Image and report from the start of a report ('' for none): its words stay, the rest is
    drawn. Returns (images, reports) (``details``: the Generation)."""
    out = self.generate(self.prompt_rows(_as_list(prompts, "prompts"), dataset), seed, progress_bar,
                        **sampler_overrides)
    return out if details else (out.images, out.reports)

  def infill_row(self, report_template: str | None = None, image=None, image_mask=None,
                 report: str | None = None, dataset: str | None = None,
                 blank_tokens: int = 3) -> np.ndarray:
    row = self._rows(1)[0]
    if report_template is not None:
      row[self.layout.text_slice], _ = self.template_ids(report_template, dataset, blank_tokens)
    elif report is not None:
      row[self.layout.text_slice] = self.report_ids(report, dataset)
    if image_mask is not None and image is None:
      raise errors.InputError("an image mask needs the image it masks")
    if image is not None:
      codes, sizes = self.image_codes([image])
      ids = self.layout.image_ids(codes[0])
      if image_mask is not None:
        redraw = mask_to_tokens(image_mask, sizes[0], self.grid, self.config.data.square)
        if not redraw.any():
          raise errors.InputError("the image mask marks no pixel: nothing to redraw")
        ids = np.where(redraw, self.layout.mask_id, ids)
      row[self.layout.image_slice] = ids
    if not (row == self.layout.mask_id).any():
      raise errors.InputError("nothing to generate: give a template with blanks, an image mask, "
                              "or leave the report or the image out")
    return row

  def infill(self, report_template: str | None = None, image=None, image_mask=None, seed: int = 0,
             report: str | None = None, dataset: str | None = None, blank_tokens: int = 3,
             details: bool = False, **sampler_overrides):
    """Fill the blanks of a report template and/or redraw the masked region of an image.

    report_template: text with blanks ("___" or "[MASK]": ``blank_tokens`` tokens; "[MASK:n]": n
      tokens); the given words keep their place. Without it the report is ``report`` as given, or
      drawn whole.
    image / image_mask: an image and a boolean pixel mask of its size; the tokens under the mask
      are redrawn, the others kept. An image without a mask is kept whole; no image: drawn whole.
    Returns (PIL image, report) (``details``: the Generation).
    """
    row = self.infill_row(report_template, image, image_mask, report, dataset, blank_tokens)
    out = self.generate(row[None], seed, **sampler_overrides)
    return out if details else (out.images[0], out.reports[0])


def _as_list(values, what: str) -> list:
  if isinstance(values, (str, np.ndarray, Image.Image)):
    raise errors.InputError(f"{what}: give a list (one per example), got one {type(values).__name__}")
  values = list(values)
  if not values:
    raise errors.InputError(f"{what}: the list is empty")
  return values


def config_of_workdir(workdir: str):
  """The config the last command run in ``workdir`` wrote to ``config.txt`` (ml_collections' YAML)."""
  import ml_collections
  import yaml
  path = os.path.join(workdir, "config.txt")
  if not os.path.exists(path):
    raise errors.InputError(f"{path} not found: give the run's config (--config configs/X.py)")
  try:
    with open(path) as f:
      values = yaml.load(f, Loader=yaml.FullLoader)  # its tuples are python/tuple tags
    return ml_collections.ConfigDict(values)
  except (yaml.YAMLError, TypeError, ValueError) as e:
    raise errors.InputError(f"{path} is not a config ml_collections wrote "
                            f"({type(e).__name__}: {str(e).splitlines()[0]}): give the run's "
                            "config (--config configs/X.py)") from None


def load_config(config):
  """A ConfigDict (copied) or a config file "configs/X.py[:arg]"."""
  if not isinstance(config, str):
    return config.copy_and_resolve_references()
  from medim_jax import config_checks
  return config_checks.load_config(config)
