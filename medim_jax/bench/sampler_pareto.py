"""Speed against quality of the samplers on a trained run: model calls and wall-clock per sample.

For image->report and report->image, every sampler setting generates the same rows with the same
seed: the fixed-step confidence sampler at several step counts, each adaptive strategy at several
thresholds (with the largest step count as its maximum) and, on medim-demo, the condition cache.
Quality on smoke data (``SETTINGS``, the evaluation split) is the rule score
(``all_attributes_accuracy``: colour, shape and position all right; deterministic, no extra
packages). On a medim-demo run (``DEMO_SETTINGS``, the chest validation images) it is the macro
finding F1 of ``--mode eval``'s clinical agreement: findings read from the generated report by the
rule extractor, from the generated image by the finding classifier, against the true labels. Each
setting is called once to compile and once timed.

``python -m medim_jax.bench.sampler_pareto --config configs/smoke.py --workdir W --out pareto.json --plot pareto.png``
``python -m medim_jax.bench.sampler_pareto --config configs/demo.py --workdir workdir/demo --out pareto.json``
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

TASKS = ("image_to_report", "report_to_image")
MAX_STEPS = 32
# (strategy, steps, reveal_threshold[, condition_cache_every]): the fixed sampler by its step count,
# the adaptive ones by their threshold, with MAX_STEPS as the most they may take.
SETTINGS = (
    [("confidence", steps, None) for steps in (4, 8, 16, 32)]
    + [("threshold", MAX_STEPS, p) for p in (0.5, 0.7, 0.9, 0.97)]
    + [("margin", MAX_STEPS, m) for m in (0.3, 0.6, 0.9)]
    + [("entropy_bound", MAX_STEPS, h) for h in (0.1, 0.5, 2.0)])
DEMO_SETTINGS = (
    [("confidence", steps, None) for steps in (4, 8, 16, 32)]
    + [("confidence", 16, None, k) for k in (2, 4)]
    + [("threshold", MAX_STEPS, p) for p in (0.5, 0.7, 0.9)]
    + [("margin", MAX_STEPS, 0.5)]
    + [("entropy_bound", MAX_STEPS, h) for h in (0.5, 2.0)])
QUALITY = {"smoke": "all attributes right", "demo": "macro finding F1"}


def smoke_scorer(config, workdir, dataset, examples):
  """The smoke run's evaluation rows and their rule score."""
  import numpy as np

  from medim_jax.evaluation.demo import smoke_scoring
  split = dataset.eval.subset(np.arange(min(examples or config.sample.num_examples, len(dataset.eval))))
  return split, lambda task, tokens: smoke_scoring.score(task, tokens, dataset)


def demo_scorer(config, workdir, dataset, examples):
  """A medim-demo run's chest validation rows (those have finding labels) and their macro finding
  F1: the rule extractor on generated reports, the finding classifier on generated images."""
  import numpy as np

  from medim_jax import evaluate
  from medim_jax.data import dicom
  from medim_jax.evaluation import ground_truth
  from medim_jax.evaluation.demo import clinical

  split = evaluate.first_rows_per_dataset(dataset.split("val"), examples or 180, ["chest"])
  shards_dir = dataset.directories[0]
  manifest, index = dataset.manifests[shards_dir], ground_truth.read_index(shards_dir)
  size, square, window = config.data.image_size, config.data.square, dicom.config_window(config.data)
  originals = ground_truth.load_examples(manifest, index, split.example_id, size, square, window)
  folders = manifest["datasets"]["chest"]["folders"]
  training = ground_truth.load_split(folders["train"], size, square, window)
  out_dir = os.path.join(workdir, "sampler_pareto")
  os.makedirs(out_dir, exist_ok=True)
  classifier, _ = evaluate.cached_classifier(config, "chest", folders, training, out_dir)

  def score(task, tokens):
    text_ids, codes = dataset.layout.split(np.asarray(tokens))
    if task == "image_to_report":
      reports = [dataset.text_tokenizer.decode(ids) for ids in text_ids]
      predicted = clinical.extract_matrix(reports, findings=originals.findings)
    else:
      predicted = classifier.predict_labels(dataset.image_tokenizer.decode(codes))
    table = clinical.f1_table(predicted, originals.labels, originals.findings)
    return {"macro_f1": table["macro_f1"],
            "f1": {f: v["f1"] for f, v in table.items() if isinstance(v, dict)}}
  return split, score


def measure(config, workdir: str, settings=None, tasks=TASKS, examples: int | None = None) -> list[dict]:
  """One row per (task, setting), on a smoke or a medim-demo run (``settings``: default
  ``SETTINGS`` or ``DEMO_SETTINGS``)."""
  from medim_jax import progress, sample
  from medim_jax.data import build as data_build
  from medim_jax.diffusion import sampler as sampler_lib
  from medim_jax.parallel import sharding
  from medim_jax.training import train

  kind = "smoke" if config.data.name == "smoke" else "demo"
  settings = settings or (SETTINGS if kind == "smoke" else DEMO_SETTINGS)
  dataset = data_build.build_dataset(config, workdir)
  trainer = train.Trainer(config, dataset.layout)
  params, step = sample.load_sampling_params(config, workdir, trainer)
  split, quality = (smoke_scorer if kind == "smoke" else demo_scorer)(config, workdir, dataset, examples)
  quality_key = "all_attributes_accuracy" if kind == "smoke" else "macro_f1"
  rows, bar = [], progress.bar(len(tasks) * len(settings), "sampler settings", "setting")
  for task in tasks:
    inputs = sampler_lib.task_inputs(task, split.tokens, split.prompt_length, dataset.layout)
    for strategy, steps, threshold, *cache in settings:
      cache_every = cache[0] if cache else 0
      sample_config = sampler_lib.SamplerConfig.from_config(config.sample)
      sample_config = dataclasses.replace(
          sample_config, strategy=strategy, text_steps=steps, image_steps=steps,
          reveal_threshold=sample_config.reveal_threshold if threshold is None else threshold,
          condition_cache_every=cache_every)
      sampler = sampler_lib.Sampler(trainer.model.apply, dataset.layout, trainer.schedule,
                                    sample_config, sharding.batch_sharding(trainer.mesh),
                                    cache_model=trainer.model)

      run = lambda: sample.sample_in_batches(
          sampler, params, trainer.mesh, inputs, split.example_id, config.sample.batch_size,
          config.sample.seed, sampler.steps_for_task(task))
      run()  # compiles
      start = time.perf_counter()
      out = run()
      seconds = time.perf_counter() - start
      tokens, calls = out.tokens, out.model_calls
      scores = quality(task, tokens)
      rows.append({"task": task, "strategy": strategy, "max_steps": steps,
                   "reveal_threshold": threshold, "condition_cache_every": cache_every,
                   "checkpoint_step": step, "data": kind,
                   "mean_model_calls": float(calls.mean()), "max_model_calls": int(calls.max()),
                   "seconds_per_sample": seconds / len(split), "examples": len(split),
                   "quality": scores.get(quality_key), "scores": scores})
      bar.update(1)
  bar.close()
  return rows


def parse_settings(text: str) -> list[tuple]:
  """"confidence:16,threshold:32:0.9,confidence:16::4" -> SETTINGS-style tuples."""
  from medim_jax import errors
  settings = []
  for item in (part.strip() for part in text.split(",") if part.strip()):
    fields = item.split(":")
    try:
      if not 2 <= len(fields) <= 4:
        raise ValueError
      threshold = float(fields[2]) if len(fields) > 2 and fields[2] else None
      settings.append((fields[0], int(fields[1]), threshold, int(fields[3]) if len(fields) > 3 else 0))
    except ValueError:
      raise errors.InputError(f"--settings: {item!r} is not strategy:steps[:threshold[:K]]") from None
  return settings


def setting_name(row: dict) -> str:
  if row["reveal_threshold"] is None:
    name = f"{row['strategy']}, {row['max_steps']} steps"
  else:
    name = f"{row['strategy']} {row['reveal_threshold']:g} (max {row['max_steps']})"
  every = row.get("condition_cache_every", 0)
  return name + (f", cache K={every}" if every else "")


def markdown(rows: list[dict]) -> str:
  lines = []
  for task in dict.fromkeys(r["task"] for r in rows):
    reference = next((r for r in rows if r["task"] == task and r["strategy"] == "confidence"
                      and r["max_steps"] == MAX_STEPS and not r.get("condition_cache_every")), None)
    lines += [f"**{task}** ({rows[0]['examples']} examples, checkpoint {rows[0]['checkpoint_step']})", "",
              "| sampler | model calls per sample (mean / max) | fewer calls than "
              f"confidence-{MAX_STEPS} | s per sample | quality ({QUALITY[rows[0].get('data', 'smoke')]}) |",
              "|---|---|---|---|---|"]
    for r in rows:
      if r["task"] != task:
        continue
      ratio = (f"{reference['mean_model_calls'] / r['mean_model_calls']:.1f}x" if reference else "-")
      lines.append(f"| {setting_name(r)} | {r['mean_model_calls']:.1f} / {r['max_model_calls']} | "
                   f"{ratio} | {r['seconds_per_sample'] * 1000:.1f} ms | {r['quality']:.3f} |")
    lines.append("")
  return "\n".join(lines)


def plot(rows: list[dict], out_png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    curve = lambda r: r["strategy"] + (", cache" if r.get("condition_cache_every") else "")
    for name in dict.fromkeys(curve(r) for r in rows):
      points = sorted((r["mean_model_calls"], r["quality"]) for r in rows
                      if r["task"] == task and curve(r) == name)
      ax.plot(*zip(*points), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model calls per sample (mean)")
    ax.set_ylabel(f"quality: {QUALITY[rows[0].get('data', 'smoke')]}")
    ax.set_title(task)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "A trained run.")
  _OUT = flags.DEFINE_string("out", None, "Write the rows as JSON here (and a .md table beside).")
  _PLOT = flags.DEFINE_string("plot", None, "Draw quality against model calls into this PNG.")
  _EXAMPLES = flags.DEFINE_integer("examples", None, "Rows per task (default: sample.num_examples; "
                                   "medim-demo: the 180 chest validation images).")
  _SETTINGS = flags.DEFINE_string("settings", None, "Comma list of strategy:steps[:threshold[:K]] "
                                  "(K: condition_cache_every), e.g. confidence:16,threshold:32:0.9,"
                                  "confidence:16::4 (default: SETTINGS or DEMO_SETTINGS).")
  _DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    from medim_jax import cli, integrity
    cli.configure_logs(_DEBUG.value)
    try:
      rows = measure(_CONFIG.value, _WORKDIR.value, examples=_EXAMPLES.value,
                     settings=parse_settings(_SETTINGS.value) if _SETTINGS.value else None)
    except cli.USER_ERRORS as e:
      cli.exit_with(e, _DEBUG.value)
    table = markdown(rows)
    print(table)
    if _OUT.value:
      integrity.write_text_atomically(_OUT.value, json.dumps({"rows": rows}, indent=1))
      integrity.write_text_atomically(os.path.splitext(_OUT.value)[0] + ".md", table)
    if _PLOT.value:
      plot(rows, _PLOT.value)

  app.run(main)
