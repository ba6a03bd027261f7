"""The reading study: what a run's checkpoints read of the image, step by step.

For each checkpoint of a training run, on the validation split of medim-demo's chest part
(180 images): the held-out losses (text / image), the reading probe's AUC per finding (the
model's masked-report reading, reading_probe.py) and its model-ranked retrieval (image->report
without sampling), and the macro finding F1 of image->report and report->image sampled with the
config's sampler, beside the retrieval baseline and chance. One sampling of 180 images fixes a macro
F1 to about +-0.04 (docs/reading_study.md): ``--draws N`` samples each checkpoint with N sample
seeds and keeps their mean, each draw and the spread. One JSON
per run (rewritten atomically after every checkpoint, so a run cut short keeps what it measured,
and a rerun measures only what is not in it yet: new checkpoints, or the sample seeds a checkpoint
lacks); ``--plot`` draws the curves of several runs into one PNG.

``python -m medim_jax.evaluation.demo.reading_study --config configs/demo.py --workdir W --steps 750,3000 [--draws 3]``
``python -m medim_jax.evaluation.demo.reading_study --plot docs/reading_study.png W1/reading_study.json ...``
"""

from __future__ import annotations

import json
import os
import statistics


RESULTS_FILE = "reading_study.json"
CURVE_FINDINGS = ("cardiomegaly", "opacity")


TASKS = ("image->report", "report->image")
# image->report without sampling: each image's training report as the model ranks them
# (reading_probe.ranked_retrieval), so the model's reading in report terms, free of sampling noise.
RANKED = "model-ranked retrieval macro F1"


def measure(config, workdir: str, step: int, examples: int = 180, draws: int = 1,
            row: dict | None = None) -> dict:
  """One checkpoint's row: held-out losses, reading AUCs, the model-ranked retrieval's macro F1, and
  image->report / report->image F1 sampled ``draws`` times (sample seeds config.sample.seed, +1,
  ...; the macro F1s are their mean).

  ``row``: what an earlier measurement of this checkpoint found; what does not sample is kept (and
  measured where the row lacks it) and only the sample seeds it lacks are drawn."""
  from medim_jax import evaluate, sample
  from medim_jax.data import build as data_build
  from medim_jax.evaluation.demo import reading_probe
  from medim_jax.training import train

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.update(split="val", datasets="chest", examples_per_dataset=examples,
                       tasks="image_to_report,report_to_image", checkpoint_step=step,
                       report_metrics=False, export_synthetic="")
    # Every run's held-out loss under the same forward process, whatever its training used.
    config.diffusion.whole_target_prob = 0.0
  dataset = data_build.build_dataset(config, workdir)
  if row is None:
    trainer = train.Trainer(config, dataset.layout)
    params, _ = sample.load_sampling_params(config, workdir, trainer, step)
    held_out = trainer.evaluate(params, dataset.eval_batches(config.train.batch_size,
                                                             config.train.num_eval_batches))
    row = {"step": step,
           "held-out text loss": held_out["text_loss"],
           "held-out image loss": held_out["image_loss"]}
  if RANKED not in row:  # rows measured before it was: the probe again (deterministic, ~1 min)
    reading = reading_probe.probe(config, workdir, step=step, classifiers=False)
    ranked = reading.get("model-ranked retrieval", {})  # none where the extractor lacks a finding
    row = {**row, "reading AUC": reading["model"], "positives": reading["positives"],
           RANKED: ranked.get("macro F1"), "model-ranked retrieval F1": ranked.get("F1")}
  sampled = sampled_draws(row)
  for seed in range(config.sample.seed, config.sample.seed + draws):
    if seed not in sampled:
      sampled[seed] = sample_and_score(config, workdir, dataset, step, seed)
  seeds = sorted(sampled)
  row = {**row, "sample seeds": seeds,
         "retrieval macro F1": sampled[seeds[0]]["retrieval macro F1"],
         "chance macro F1": sampled[seeds[0]]["chance macro F1"]}
  for name in TASKS:
    row[f"{name} macro F1 draws"] = [sampled[s][f"{name} macro F1"] for s in seeds]
    row[f"{name} F1 draws"] = [sampled[s][f"{name} F1"] for s in seeds]
    row[f"{name} macro F1"] = _mean(row[f"{name} macro F1 draws"])
    row[f"{name} F1"] = {f: _mean([draw[f] for draw in row[f"{name} F1 draws"]])
                         for f in row[f"{name} F1 draws"][0]}
  return evaluate.finite_or_null(row)  # strict JSON: a finding without positives is null, not NaN


def _mean(values):
  """The mean, or None where a value is (an F1 of a finding without positives)."""
  return None if None in values else statistics.fmean(values)


def sample_and_score(config, workdir: str, dataset, step: int, seed: int) -> dict:
  """Macro and per-finding F1 of both tasks sampled with sample seed ``seed``."""
  from medim_jax import evaluate
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.sample.seed = seed
  # Its own folder: the run's eval/ and report.html (the test split's) stay as they are; each
  # seed's generations are cached in theirs.
  side = os.path.join(workdir, "reading_study", f"step_{step}")
  out_dir = side if seed == 0 else os.path.join(side, f"sample_seed_{seed}")
  result = evaluate.evaluate(config, workdir, dataset, out_dir=out_dir)
  clinical = result["datasets"]["chest"]["clinical"]
  i2r, r2i = clinical["image_to_report"], clinical["report_to_image"]
  per_finding = lambda table: {f: v["f1"] for f, v in table.items() if isinstance(v, dict)}
  return evaluate.finite_or_null({
      "image->report macro F1": i2r["MeDiM"]["macro_f1"],
      "retrieval macro F1": i2r["retrieval baseline"]["macro_f1"],
      "report->image macro F1": r2i["MeDiM"]["macro_f1"],
      "chance macro F1": r2i["chance (random at training prevalence)"]["macro_f1"],
      "image->report F1": per_finding(i2r["MeDiM"]), "report->image F1": per_finding(r2i["MeDiM"])})


def sampled_draws(row: dict | None) -> dict[int, dict]:
  """A row's sampled results by sample seed (a row from before draws were counted holds one
  draw, of seed 0)."""
  if not row or "image->report macro F1" not in row:
    return {}
  keys = ("retrieval macro F1", "chance macro F1")
  seeds = row.get("sample seeds", [0])
  draws = {}
  for index, seed in enumerate(seeds):
    draw = {k: row[k] for k in keys}
    for metric in [f"{name}{what}" for name in TASKS for what in (" macro F1", " F1")]:
      draw[metric] = row[f"{metric} draws"][index] if f"{metric} draws" in row else row[metric]
    draws[seed] = draw
  return draws


def write_atomically(path: str, value) -> None:
  from medim_jax import integrity
  integrity.write_text_atomically(path, json.dumps(value, indent=1))


def run(config, workdir: str, steps: list[int], out: str | None = None, draws: int = 1) -> dict:
  """Measure ``steps`` of the run in ``workdir`` into ``out``: those not in it yet, and those in it
  with fewer of the ``draws`` sample seeds (only the missing seeds are sampled then)."""
  out = out or os.path.join(workdir, RESULTS_FILE)
  results = {"workdir": os.path.abspath(workdir), "rows": []}
  if os.path.exists(out):
    with open(out) as f:
      results = json.load(f)
  rows = {row["step"]: row for row in results["rows"]}
  wanted = set(range(config.sample.seed, config.sample.seed + draws))
  for step in steps:
    if step in rows and wanted <= set(sampled_draws(rows[step])) and RANKED in rows[step]:
      continue
    rows[step] = measure(config, workdir, step, draws=draws, row=rows.get(step))
    results["rows"] = [rows[s] for s in sorted(rows)]
    write_atomically(out, results)
    print(f"{workdir} step {step}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in rows[step].items() if isinstance(v, float)), flush=True)
  return results


def plot(result_files: list[str], out_png: str, labels: list[str] | None = None) -> None:
  """Curves of several runs against training steps: macro F1 of both tasks with the baselines,
  reading AUC of ``CURVE_FINDINGS``, held-out losses."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = []
  for i, path in enumerate(result_files):
    with open(path) as f:
      rows = json.load(f)["rows"]
    name = labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
    runs.append((name, rows))
  panels = [("image->report macro F1", "retrieval macro F1"),
            ("report->image macro F1", "chance macro F1"),
            *[(f"reading AUC: {f}", None) for f in CURVE_FINDINGS],
            ("held-out text loss", None), ("held-out image loss", None)]
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  for ax, (metric, baseline) in zip(axes.flat, panels):
    for k, (name, rows) in enumerate(runs):
      steps = [r["step"] for r in rows]
      if metric.startswith("reading AUC: "):
        values = [r["reading AUC"][metric.split(": ")[1]] for r in rows]
      else:
        values = [r[metric] for r in rows]
      task = metric.split(" macro F1")[0]
      error = [spread(r, task) for r in rows] if metric.endswith("macro F1") else None
      line = ax.errorbar(steps, values, yerr=error, fmt="o-", capsize=3, label=name).lines[0]
      ranked = [(r["step"], r[RANKED]) for r in rows if r.get(RANKED) is not None]
      if metric == "image->report macro F1" and ranked:
        ax.plot(*zip(*ranked), "x--", color=line.get_color(),
                label=f"model-ranked retrieval ({name})" if k == 0 or len(runs) < 3 else None)
      if baseline:
        ax.plot(steps, [r[baseline] for r in rows], ":", color=line.get_color(),
                label=f"{baseline.split(' macro')[0]} ({name})" if k == 0 or len(runs) < 3 else None)
    if metric.startswith("reading AUC"):
      ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_title(metric)
    ax.set_xlabel("training steps")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle("Reading study: medim-demo chest validation (180 images)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=90)
  plt.close(fig)


def table(result_files: list[str], labels: list[str] | None = None) -> str:
  """The rows of several runs as one Markdown table."""
  lines = ["| run | step | held-out loss text / image | reading AUC " + " / ".join(CURVE_FINDINGS)
           + " | image->report macro F1 (retrieval) | model-ranked retrieval macro F1 |"
           " report->image macro F1 (chance) |",
           "|---|---|---|---|---|---|---|"]
  for i, path in enumerate(result_files):
    with open(path) as f:
      rows = json.load(f)["rows"]
    name = labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
    for r in rows:
      auc = " / ".join(f"{r['reading AUC'][f]:.3f}" for f in CURVE_FINDINGS)
      lines.append(f"| {name} | {r['step']:,} | {r['held-out text loss']:.3f} / "
                   f"{r['held-out image loss']:.3f} | {auc} | {_f1_cell(r, 'image->report')} "
                   f"({r['retrieval macro F1']:.3f}) | {_ranked_cell(r)} | "
                   f"{_f1_cell(r, 'report->image')} ({r['chance macro F1']:.3f}) |")
  return "\n".join(lines)


def spread(row: dict, task: str) -> float:
  """The sample standard deviation of a task's macro F1 over the row's draws (0 for one draw)."""
  values = row.get(f"{task} macro F1 draws", [row[f"{task} macro F1"]])
  return statistics.stdev(values) if len(values) > 1 else 0.0


def _ranked_cell(row: dict) -> str:
  return "-" if row.get(RANKED) is None else f"{row[RANKED]:.3f}"


def _f1_cell(row: dict, task: str) -> str:
  draws = len(row.get(f"{task} macro F1 draws", [None]))
  cell = f"{row[f'{task} macro F1']:.3f}"
  return cell if draws == 1 else f"{cell} +- {spread(row, task):.3f} ({draws} draws)"


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
  _STEPS = flags.DEFINE_list("steps", [], "Checkpoint steps to measure.")
  _DRAWS = flags.DEFINE_integer("draws", 1, "Sample each checkpoint's reports and images this many "
                                "times (sample seeds config.sample.seed, +1, ...) and report the "
                                "macro F1s' mean and standard deviation.", lower_bound=1)
  _OUT = flags.DEFINE_string("out", None, f"Results JSON (default: WORKDIR/{RESULTS_FILE}).")
  _PLOT = flags.DEFINE_string("plot", None, "Draw the curves of the JSON files given as arguments "
                              "into this PNG (and print their table) instead of measuring.")
  _LABELS = flags.DEFINE_list("labels", [], "Names of the runs in --plot (default: their folders).")
  _DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")

  def main(argv):
    from medim_jax import cli
    cli.configure_logs(_DEBUG.value)
    if _PLOT.value:
      plot(argv[1:], _PLOT.value, _LABELS.value or None)
      print(table(argv[1:], _LABELS.value or None))
      return
    if not _CONFIG.value or not _WORKDIR.value or not _STEPS.value:
      raise app.UsageError("--config, --workdir and --steps are required to measure")
    try:
      run(_CONFIG.value, _WORKDIR.value, [int(s) for s in _STEPS.value], _OUT.value, _DRAWS.value)
    except cli.USER_ERRORS as e:
      cli.exit_with(e, _DEBUG.value)

  app.run(main)
