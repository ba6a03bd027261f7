"""The reading study: what a run's checkpoints read of the image, step by step.

For each checkpoint of a training run, on the validation split of medim-demo's chest part
(180 images): the held-out losses (text / image), the reading probe's AUC per finding (the
model's masked-report reading, reading_probe.py), and the macro finding F1 of image->report and
report->image sampled with the config's sampler, beside the retrieval baseline and chance. One JSON
per run (rewritten atomically after every checkpoint, so a run cut short keeps what it measured,
and a rerun measures only the checkpoints not in it yet); ``--plot`` draws the curves of several
runs into one PNG.

``python -m medim_jax.evaluation.demo.reading_study --config configs/demo.py --workdir W --steps 750,3000``
``python -m medim_jax.evaluation.demo.reading_study --plot docs/reading_study.png W1/reading_study.json ...``
"""

from __future__ import annotations

import json
import os


RESULTS_FILE = "reading_study.json"
CURVE_FINDINGS = ("cardiomegaly", "opacity")


def measure(config, workdir: str, step: int, examples: int = 180) -> dict:
  """One checkpoint's row: held-out losses, reading AUCs, image->report / report->image F1."""
  from medim_jax import evaluate, sample
  from medim_jax.data import build as data_build
  from medim_jax.evaluation.demo import reading_probe
  from medim_jax.training import train

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.update(split="val", datasets="chest", examples_per_dataset=examples,
                       tasks="image_to_report,report_to_image", checkpoint_step=step,
                       report_metrics=False, export_synthetic="")
  dataset = data_build.build_dataset(config, workdir)
  trainer = train.Trainer(config, dataset.layout)
  params, _ = sample.load_sampling_params(config, workdir, trainer, step)
  held_out = trainer.evaluate(params, dataset.eval_batches(config.train.batch_size,
                                                           config.train.num_eval_batches))
  reading = reading_probe.probe(config, workdir, step=step, classifiers=False)
  # Its own folder: the run's eval/ and report.html (the test split's) stay as they are.
  side = os.path.join(workdir, "reading_study", f"step_{step}")
  clinical = evaluate.evaluate(config, workdir, dataset, out_dir=side)["datasets"]["chest"]["clinical"]
  macro = lambda table: table["macro_f1"]
  i2r, r2i = clinical["image_to_report"], clinical["report_to_image"]
  row = {"step": step,
         "held-out text loss": held_out["text_loss"], "held-out image loss": held_out["image_loss"],
         "reading AUC": reading["model"], "positives": reading["positives"],
         "image->report macro F1": macro(i2r["MeDiM"]),
         "retrieval macro F1": macro(i2r["retrieval baseline"]),
         "report->image macro F1": macro(r2i["MeDiM"]),
         "chance macro F1": macro(r2i["chance (random at training prevalence)"]),
         "image->report F1": {f: v["f1"] for f, v in i2r["MeDiM"].items() if isinstance(v, dict)},
         "report->image F1": {f: v["f1"] for f, v in r2i["MeDiM"].items() if isinstance(v, dict)}}
  return evaluate.finite_or_null(row)  # strict JSON: a finding without positives is null, not NaN


def write_atomically(path: str, value) -> None:
  from medim_jax import integrity
  integrity.write_text_atomically(path, json.dumps(value, indent=1))


def run(config, workdir: str, steps: list[int], out: str | None = None) -> dict:
  """Measure ``steps`` of the run in ``workdir`` (those not already in ``out``) into ``out``."""
  out = out or os.path.join(workdir, RESULTS_FILE)
  results = {"workdir": os.path.abspath(workdir), "rows": []}
  if os.path.exists(out):
    with open(out) as f:
      results = json.load(f)
  done = {row["step"] for row in results["rows"]}
  for step in steps:
    if step in done:
      continue
    results["rows"].append(measure(config, workdir, step))
    results["rows"].sort(key=lambda row: row["step"])
    write_atomically(out, results)
    row = results["rows"][[r["step"] for r in results["rows"]].index(step)]
    print(f"{workdir} step {step}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
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
      line, = ax.plot(steps, values, "o-", label=name)
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
           + " | image->report macro F1 (retrieval) | report->image macro F1 (chance) |",
           "|---|---|---|---|---|---|"]
  for i, path in enumerate(result_files):
    with open(path) as f:
      rows = json.load(f)["rows"]
    name = labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
    for r in rows:
      auc = " / ".join(f"{r['reading AUC'][f]:.3f}" for f in CURVE_FINDINGS)
      lines.append(f"| {name} | {r['step']:,} | {r['held-out text loss']:.3f} / "
                   f"{r['held-out image loss']:.3f} | {auc} | {r['image->report macro F1']:.3f} "
                   f"({r['retrieval macro F1']:.3f}) | {r['report->image macro F1']:.3f} "
                   f"({r['chance macro F1']:.3f}) |")
  return "\n".join(lines)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
  _STEPS = flags.DEFINE_list("steps", [], "Checkpoint steps to measure.")
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
      run(_CONFIG.value, _WORKDIR.value, [int(s) for s in _STEPS.value], _OUT.value)
    except cli.USER_ERRORS as e:
      cli.exit_with(e, _DEBUG.value)

  app.run(main)
