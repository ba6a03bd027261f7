"""Speed against quality of the samplers on a trained run: model calls and wall-clock per sample.

For image->report and report->image on the run's evaluation split, every sampler setting of
``SETTINGS`` generates the same rows with the same seed: the fixed-step confidence sampler at
several step counts, and each adaptive strategy at several thresholds (with the largest step count
as its maximum). Quality on smoke data is the rule score (``all_attributes_accuracy``: colour, shape
and position all right; deterministic, no extra packages). Each setting is called once to compile
and once timed.

``python -m medim_jax.bench.sampler_pareto --config configs/smoke.py --workdir W --out pareto.json --plot pareto.png``
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

TASKS = ("image_to_report", "report_to_image")
MAX_STEPS = 32
# (strategy, steps, reveal_threshold): the fixed sampler by its step count, the adaptive ones by
# their threshold, with MAX_STEPS as the most they may take.
SETTINGS = (
    [("confidence", steps, None) for steps in (4, 8, 16, 32)]
    + [("threshold", MAX_STEPS, p) for p in (0.5, 0.7, 0.9, 0.97)]
    + [("margin", MAX_STEPS, m) for m in (0.3, 0.6, 0.9)]
    + [("entropy_bound", MAX_STEPS, h) for h in (0.1, 0.5, 2.0)])


def measure(config, workdir: str, settings=SETTINGS, tasks=TASKS, examples: int | None = None,
            quality=None) -> list[dict]:
  """One row per (task, setting). ``quality(task, tokens, dataset) -> dict`` scores the samples
  (default: the smoke rules, for smoke runs)."""
  import numpy as np

  from medim_jax import progress, sample
  from medim_jax.data import build as data_build
  from medim_jax.diffusion import sampler as sampler_lib
  from medim_jax.evaluation.demo import smoke_scoring
  from medim_jax.parallel import sharding
  from medim_jax.training import train

  quality = quality or (lambda task, tokens, dataset: smoke_scoring.score(task, tokens, dataset))
  dataset = data_build.build_dataset(config, workdir)
  trainer = train.Trainer(config, dataset.layout)
  params, step = sample.load_sampling_params(config, workdir, trainer)
  split = dataset.eval
  split = split.subset(np.arange(min(examples or config.sample.num_examples, len(split))))
  rows, bar = [], progress.bar(len(tasks) * len(settings), "sampler settings", "setting")
  for task in tasks:
    inputs = sampler_lib.task_inputs(task, split.tokens, split.prompt_length, dataset.layout)
    for strategy, steps, threshold in settings:
      sample_config = sampler_lib.SamplerConfig.from_config(config.sample)
      sample_config = dataclasses.replace(
          sample_config, strategy=strategy, text_steps=steps, image_steps=steps,
          reveal_threshold=sample_config.reveal_threshold if threshold is None else threshold)
      sampler = sampler_lib.Sampler(trainer.model.apply, dataset.layout, trainer.schedule,
                                    sample_config, sharding.batch_sharding(trainer.mesh))

      run = lambda: sample.sample_in_batches(
          sampler, params, trainer.mesh, inputs, split.example_id, config.sample.batch_size,
          config.sample.seed, sampler.steps_for_task(task))
      run()  # compiles
      start = time.perf_counter()
      out = run()
      seconds = time.perf_counter() - start
      tokens, calls = out.tokens, out.model_calls
      scores = quality(task, tokens, dataset)
      rows.append({"task": task, "strategy": strategy, "max_steps": steps,
                   "reveal_threshold": threshold, "checkpoint_step": step,
                   "mean_model_calls": float(calls.mean()), "max_model_calls": int(calls.max()),
                   "seconds_per_sample": seconds / len(split), "examples": len(split),
                   "quality": scores.get("all_attributes_accuracy"), "scores": scores})
      bar.update(1)
  bar.close()
  return rows


def setting_name(row: dict) -> str:
  if row["reveal_threshold"] is None:
    return f"{row['strategy']}, {row['max_steps']} steps"
  return f"{row['strategy']} {row['reveal_threshold']:g} (max {row['max_steps']})"


def markdown(rows: list[dict]) -> str:
  lines = []
  for task in dict.fromkeys(r["task"] for r in rows):
    reference = next((r for r in rows if r["task"] == task and r["strategy"] == "confidence"
                      and r["max_steps"] == MAX_STEPS), None)
    lines += [f"**{task}** ({rows[0]['examples']} examples, checkpoint {rows[0]['checkpoint_step']})", "",
              "| sampler | model calls per sample (mean / max) | fewer calls than "
              f"confidence-{MAX_STEPS} | s per sample | quality (all attributes) |",
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
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
      points = sorted((r["mean_model_calls"], r["quality"]) for r in rows
                      if r["task"] == task and r["strategy"] == strategy)
      ax.plot(*zip(*points), "o-", label=strategy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model calls per sample (mean)")
    ax.set_ylabel("quality: all attributes right")
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
  _EXAMPLES = flags.DEFINE_integer("examples", None, "Rows per task (default: sample.num_examples).")
  _DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    from medim_jax import cli, integrity
    cli.configure_logs(_DEBUG.value)
    try:
      rows = measure(_CONFIG.value, _WORKDIR.value, examples=_EXAMPLES.value)
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
