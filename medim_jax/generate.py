"""``python -m medim_jax.generate``: generate from your own inputs on the command line.

    python -m medim_jax.generate --workdir W --report "..." --out DIR
    python -m medim_jax.generate --workdir W --images DIR --out DIR --grid

writes ``DIR/NNN.png`` (with ``NNN_confidence.png``: the image beside its tokens' confidence) and
``DIR/generated.jsonl`` (inputs, outputs, confidences, seed, checkpoint step, sampler settings);
``--config.sample.*`` overrides the sampler. The run's config is read from ``W/config.txt`` (what
every command of ``medim_jax.main`` writes there); ``--config configs/X.py`` gives it instead. The
same from Python: ``medim_jax.inference.MeDiMPipeline``.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from medim_jax import errors, integrity, visualize
from medim_jax.inference import (IMAGE_SUFFIXES, Generation, MeDiMPipeline, as_rgb_array,
                                 config_of_workdir, load_config)



# ---------------------------------------------------------------------------------------------
# Command line


def read_inputs(args) -> dict:
  """Everything the command will generate from, read and checked before anything is written."""
  def lines(path):
    if not os.path.isfile(path):
      raise errors.InputError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
      if not path.endswith(".jsonl"):
        return [line.rstrip("\n") for line in f if line.strip()]
      reports = []
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            reports.append(json.loads(line)["report"])
          except (json.JSONDecodeError, KeyError, TypeError):
            raise errors.InputError(f"{path} line {number}: expected a JSON object with a "
                                    "\"report\" string") from None
      return reports

  def images_in(folder):
    if not os.path.isdir(folder):
      raise errors.InputError(f"{folder} is not a folder of images")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
      raise errors.InputError(f"{folder} holds no .png / .jpg image")
    return [os.path.join(folder, n) for n in names]

  given = {"reports": ([args.report] if args.report is not None else [])
           + (lines(args.reports) if args.reports else []),
           "images": ([args.image] if args.image else []) + (images_in(args.images) if args.images else []),
           "prompts": [args.prompt] if args.prompt is not None else [],
           "template": args.template, "mask": None}
  if args.reports and not given["reports"]:
    raise errors.InputError(f"{args.reports} holds no report")
  if args.mask:
    try:
      with Image.open(args.mask) as opened:
        given["mask"] = np.asarray(opened.convert("L")) > 127
    except OSError as e:
      raise errors.InputError(f"{args.mask}: mask cannot be read ({type(e).__name__}: {e})") from None
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise errors.InputError(f"--out {args.out} is a file, not a folder")
  return given


def task_of(given) -> str:
  if given["template"] is not None or given["mask"] is not None:
    if len(given["images"]) > 1 or len(given["reports"]) > 1 or given["prompts"]:
      raise errors.InputError("infilling (--template / --mask) takes at most one --image and one "
                              "--report")
    return "infill"
  tasks = [task for task, key in (("report_to_image", "reports"), ("image_to_report", "images"),
                                  ("joint", "prompts")) if given[key]]
  if len(tasks) != 1:
    raise errors.InputError("give one kind of input: --report/--reports (report->image), "
                            "--image/--images (image->report), --prompt (joint), or --template "
                            "and/or --image with --mask (infilling)"
                            + (f"; got inputs for {' and '.join(tasks)}" if tasks else ""))
  return tasks[0]


def run_command(args, config) -> list[dict]:
  """Read and check every input, load the run, generate, then write: bad input writes nothing."""
  import time
  given = read_inputs(args)
  task = task_of(given)
  start = time.perf_counter()
  pipe = MeDiMPipeline.from_workdir(args.workdir, args.step, config)
  loaded = time.perf_counter()
  if task == "infill":
    image = given["images"][0] if given["images"] else None
    row = pipe.infill_row(given["template"], image, given["mask"],
                          report=given["reports"][0] if given["reports"] else None,
                          dataset=args.dataset, blank_tokens=args.blank_tokens)
    out = pipe.generate(row[None], args.seed)
    inputs = [{"template": given["template"], "report": given["reports"][0] if given["reports"] else None,
               "image": image, "mask": args.mask}]
  else:
    key, rows = {"report_to_image": ("reports", lambda: pipe.report_rows(given["reports"], args.dataset)),
                 "image_to_report": ("images", lambda: pipe.image_rows(given["images"])),
                 "joint": ("prompts", lambda: pipe.prompt_rows(given["prompts"], args.dataset))}[task]
    rows = rows()  # every input checked before any generation
    out = pipe.generate(rows, args.seed, progress_bar=True)
    inputs = [{key[:-1]: value} for value in given[key]]
  records = [{"task": task, **inputs[i]} for i in range(len(inputs))]
  seconds = (loaded - start, time.perf_counter() - loaded)
  write_outputs(args.out, records, out, pipe, args.seed, args.grid, seconds, args.dicom)
  return records


def _rounded(values) -> list:
  return [None if np.isnan(v) else round(float(v), 4) for v in values]


def write_outputs(out_dir: str, records: list[dict], out: Generation, pipe: MeDiMPipeline,
                  seed: int, grid: bool, seconds: tuple[float, float] = (0.0, 0.0),
                  as_dicom: bool = False) -> None:
  """NNN.png (+ NNN_confidence.png) for every image the task drew, and generated.jsonl, written
  under a temporary name and renamed, so a crash never leaves a half-written record."""
  os.makedirs(out_dir, exist_ok=True)
  settings = pipe.sampler_settings()
  draws_image = records[0]["task"] in ("report_to_image", "joint") or (
      np.isfinite(out.image_confidence).any())
  lines = []
  for i, record in enumerate(records):
    record = dict(record)
    if draws_image:
      record["image_out"] = f"{i:03d}.png"
      out.images[i].save(os.path.join(out_dir, record["image_out"]))
      confidence_picture(out.images[i], out.image_confidence[i]).save(
          os.path.join(out_dir, f"{i:03d}_confidence.png"))
      if as_dicom:  # marked synthetic in every field a viewer shows
        from medim_jax.data import dicom
        record["dicom_out"] = f"{i:03d}.dcm"
        source = record.get("report") or record.get("prompt") or record.get("template") or ""
        dicom.write_synthetic(os.path.join(out_dir, record["dicom_out"]), np.asarray(out.images[i]),
                              f"{record['task']} from checkpoint {pipe.step}, seed {seed}: {source}")
      record["image_confidence"] = [_rounded(row) for row in out.image_confidence[i]]
    pieces = out.report_confidence[i]
    if any(np.isfinite(p) for _, p in pieces):  # the task wrote (some of) the report
      record["report_out"] = out.reports[i]
      record["report_confidence"] = [[text, p] for (text, _), p in
                                     zip(pieces, _rounded([p for _, p in pieces]))]
    if out.model_calls is not None:
      record["model_calls"] = int(out.model_calls[i])
    lines.append(json.dumps({**record, "seed": seed, "checkpoint_step": pipe.step,
                             "sampler": settings}))
  integrity.write_text_atomically(os.path.join(out_dir, "generated.jsonl"), "\n".join(lines) + "\n")
  if grid:
    if draws_image:
      images = [np.asarray(im) for im in out.images]
    else:  # image->report: the given images with the reports written for them
      size, square = pipe.config.data.image_size, pipe.config.data.square
      images = [as_rgb_array(r["image"], size, square) for r in records]
    captions = [[r.get("prompt") or r.get("template") or "", out.reports[i]]
                for i, r in enumerate(records)]
    visualize.sample_grid(np.stack(images), captions, os.path.join(out_dir, "grid.png"),
                          columns=min(8, len(images)))
  print(f"{len(records)} generated ({records[0]['task']}) from checkpoint {pipe.step} in "
        f"{seconds[1]:.1f} s, compilation included (loading {seconds[0]:.1f} s): {out_dir}/generated.jsonl")


def confidence_picture(image: Image.Image, confidence: np.ndarray, scale: int = 4) -> Image.Image:
  """The image beside its token grid coloured by confidence: red = the model was unsure (p near 0),
  green = sure (p near 1), grey = given, not generated."""
  heat = Image.fromarray(visualize.confidence_colours(confidence))
  side = image.size[0] * scale
  sheet = Image.new("RGB", (2 * side + 4, side), "white")
  sheet.paste(image.resize((side, side), Image.NEAREST), (0, 0))
  sheet.paste(heat.resize((side, side), Image.NEAREST), (side + 4, 0))
  return sheet


def main():
  import argparse
  import sys
  from absl import flags
  from ml_collections import config_flags

  from medim_jax import cli, config_checks
  parser = argparse.ArgumentParser(prog="python -m medim_jax.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a trained run (python -m medim_jax.main)")
  parser.add_argument("--config", help="configs/X.py[:arg] (default: the run's WORKDIR/config.txt)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint (default: the latest)")
  parser.add_argument("--report", help="report -> image")
  parser.add_argument("--reports", help="a .txt (one report a line) or .jsonl ({'report': ...}) file")
  parser.add_argument("--image", help="image -> report (or the image to edit with --mask)")
  parser.add_argument("--images", help="a folder of .png / .jpg images -> reports")
  parser.add_argument("--prompt", help="joint: image + report from the start of a report ('' for none)")
  parser.add_argument("--template", help="a report with blanks (___, [MASK], [MASK:n]) to fill")
  parser.add_argument("--blank_tokens", type=int, default=3, help="tokens of a ___ or [MASK] blank")
  parser.add_argument("--dataset", help="whose report prompt to use, e.g. pathology (default: the "
                      "run's first dataset; medim-demo: chest)")
  parser.add_argument("--mask", help="a picture of the image's size: white = redraw these pixels")
  parser.add_argument("--out", required=True, help="folder for the PNGs and generated.jsonl")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--grid", action="store_true", help="also a contact sheet, grid.png")
  parser.add_argument("--dicom", action="store_true", help="also NNN.dcm for each image drawn, "
                      "marked synthetic (needs pydicom)")
  parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
  args, rest = parser.parse_known_args()
  cli.configure_logs(args.debug)
  try:
    config = load_config(args.config) if args.config else config_of_workdir(args.workdir)
    unknown = config_checks.unknown_keys(config, rest, args.config or f"{args.workdir}/config.txt")
    if unknown:
      raise errors.InputError("; ".join(unknown))
    # --config.sample.*=... (and any other --config.* key) override it, as in every other command.
    config_flag = config_flags.DEFINE_config_dict("config", config)
    try:
      flags.FLAGS([sys.argv[0]] + rest)
    except flags.Error as e:
      raise errors.InputError(str(e)) from None
    run_command(args, config_flag.value)
  except cli.USER_ERRORS as e:
    cli.exit_with(e, args.debug)


if __name__ == "__main__":
  main()
