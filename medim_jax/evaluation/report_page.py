"""``WORKDIR/report.html``: one self-contained page (images inline) with what evaluation found.

Sample grids with their prompts and reports, the metric tables with the baselines beside the model,
loss curves, memorisation distributions with the most suspicious samples, and the evaluation card.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np
from PIL import Image

from medim_jax import integrity, visualize

SHOWN_PER_TASK = 16
CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;line-height:1.4}
h1{font-size:26px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}h3{margin-top:24px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;
font-size:13px;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:
tabular-nums}.na{color:#a33;font-style:italic}.note{color:#555;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(4,1fr);gap:10px}.cell{border:1px solid #ddd;padding:6px;
font-size:12px}.cell img{width:128px;height:128px;image-rendering:pixelated;margin-right:4px}
.cell img.heat{width:48px;height:48px}
.ok{color:#17733a}.bad{color:#a33}.unsure{background:#fbd5d5;border-bottom:1px dotted #a33}pre{background:#f6f6f6;padding:8px;font-size:11px;overflow:auto;
max-height:400px}
"""


def png_data_uri(image: np.ndarray, size: int = 128) -> str:
  picture = Image.fromarray(np.asarray(image, np.uint8))
  if picture.size[0] < size:
    picture = picture.resize((size, size), Image.NEAREST)
  buffer = io.BytesIO()
  picture.save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def img(image, title: str = "", css_class: str = "") -> str:
  return (f'<img src="{png_data_uri(image)}" title="{html.escape(title)}" alt="{html.escape(title)}"'
          + (f' class="{css_class}">' if css_class else ">"))


def fmt(value) -> str:
  if isinstance(value, dict) and "unavailable" in value:
    return f'<span class="na">unavailable: {html.escape(str(value["unavailable"]))}</span>'
  if isinstance(value, bool) or value is None:
    return html.escape(str(value))
  if isinstance(value, (int, np.integer)):
    return f"{value:,}"
  if isinstance(value, (float, np.floating)):
    return "nan" if np.isnan(value) else f"{value:.3f}"
  return html.escape(str(value))


def table(header: list[str], rows: list[list]) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(
      f'<td class="num">{fmt(c)}</td>' if isinstance(c, (int, float, np.number)) and
      not isinstance(c, bool) else f"<td>{fmt(c) if not isinstance(c, str) else c}</td>"
      for c in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def pyplot():
  """matplotlib's pyplot on the file backend, or None without matplotlib (the eval extra)."""
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def figure_img(plt, figure) -> str:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=90)
  plt.close(figure)
  return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


NO_PLOTS = '<p class="na">plots need matplotlib: pip install -e ".[eval]"</p>'


def loss_curves(workdir: str) -> str:
  """Training curves of MeDiM and of the VQ tokenizer as one inline PNG ('' when there are none)."""
  plt = pyplot()
  if plt is None:
    return NO_PLOTS
  panels = []
  for path, title, keys in ((os.path.join(workdir, "metrics.jsonl"), "MeDiM training",
                             ("loss", "text_loss", "image_loss", "finding_loss")),
                            (os.path.join(workdir, "vq", "metrics.jsonl"), "VQ tokenizer",
                             ("l1", "l2", "psnr"))):
    if os.path.exists(path):
      panels.append((title, keys, [row for _, row in integrity.read_jsonl(path)]))
  if not panels:
    return ""
  figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
  for ax, (title, keys, records) in zip(axes[0], panels):
    for split in ("train", "eval"):
      for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
        if points and key != "psnr":
          steps, values = zip(*points)
          ax.plot(steps, values, "-" if split == "train" else "o--",
                  label=f"{'validation' if split == 'eval' else split} {key}")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    psnr = [(r["step"], r["psnr"]) for r in records if "psnr" in r]
    if psnr:
      twin = ax.twinx()
      twin.plot(*zip(*psnr), color="grey", alpha=0.6)
      twin.set_ylabel("PSNR (dB), grey")
  figure.tight_layout()
  return figure_img(plt, figure)


def histogram(series: dict[str, np.ndarray], xlabel: str) -> str:
  plt = pyplot()
  if plt is None:
    return NO_PLOTS
  figure, ax = plt.subplots(figsize=(5.5, 3))
  for label, values in series.items():
    ax.hist(np.asarray(values, float), bins=20, alpha=0.55, label=label)
  ax.set_xlabel(xlabel)
  ax.legend(fontsize=8)
  figure.tight_layout()
  return figure_img(plt, figure)


def metric_rows(metrics: dict, prefix: str = "") -> list[list]:
  rows = []
  for key, value in metrics.items():
    if isinstance(value, dict) and "unavailable" not in value:
      rows += metric_rows(value, f"{prefix}{key} / ")
    else:
      rows.append([html.escape(prefix + key), value])
  return rows


def clinical_section(clinical: dict) -> str:
  parts = []
  for direction, title in (("image_to_report", "image -> report: findings extracted from the "
                            "generated report vs the image's true labels"),
                           ("report_to_image", "report -> image: the finding classifier on the "
                            "generated image vs the prompt report's labels")):
    if direction not in clinical:
      continue
    columns = clinical[direction]
    findings = [f for f, v in next(iter(columns.values())).items() if isinstance(v, dict)]
    header = ["finding"] + list(columns)
    rows = [[f] + [columns[c][f]["f1"] if isinstance(columns[c].get(f), dict) else columns[c].get(f)
                   for c in columns] for f in findings]
    rows.append(["<b>macro F1</b>"] + [columns[c]["macro_f1"] for c in columns])
    support = [columns[next(iter(columns))][f].get("support") for f in findings]
    parts.append(f"<h4>{html.escape(title)}</h4>" + table(header, rows)
                 + '<p class="note">F1 per finding; positives per finding in these examples: '
                 + ", ".join(f"{f} {s}" for f, s in zip(findings, support))
                 + ". Macro F1 averages the findings that have positives.</p>")
  if "joint_consistency" in clinical:
    parts.append("<h4>joint pairs: does the generated report agree with the generated image?</h4>"
                 + table(["measure", "value"], metric_rows(
                     {k: v for k, v in clinical["joint_consistency"].items() if k != "per_pair"})))
  if "classifier" in clinical:
    parts.append('<p class="note">' + html.escape(clinical["classifier"].get("description", ""))
                 + "</p>")
  return "".join(parts)


def grid(cells: list[str]) -> str:
  return '<div class="grid">' + "".join(f'<div class="cell">{c}</div>' for c in cells) + "</div>"


UNSURE = 0.5  # a generated word drawn with a probability below this is marked


def marked_report(g: dict, i: int) -> str:
  """The generated report, its words drawn with probability < UNSURE marked (hover: p)."""
  if "report_confidence" not in g:
    return html.escape(g["reports"][i])
  return "".join(f'<span class="unsure" title="p = {p:.2f}">{html.escape(text)}</span>'
                 if p < UNSURE else html.escape(text)  # NaN (a given word) is never marked
                 for text, p in g["report_confidence"][i])


def confidence_map(g: dict, i: int) -> str:
  if "image_confidence" not in g:
    return ""
  return img(visualize.confidence_colours(g["image_confidence"][i]),
             "confidence of each image token: red unsure, green sure, grey given", "heat")


CONFIDENCE_NOTE = ('<p class="note">Confidence: each image token coloured by the probability it had '
                   'when drawn (red unsure, green sure); <span class="unsure">marked words</span> were '
                   f'drawn with probability below {UNSURE} (hover for it).</p>')


def samples_section(shown: dict, result: dict) -> str:
  originals, generated = shown["originals"], shown["generated"]
  parts = [CONFIDENCE_NOTE]
  if "image_to_report" in generated:
    g = generated["image_to_report"]
    parts.append("<h3>image -> report (real test image; generated report; real report)</h3>" + grid([
        img(originals.images[i]) + f"<p><b>generated:</b> {marked_report(g, i)}</p>"
        f"<p><b>real:</b> {html.escape(originals.reports[i])}</p>"
        for i in range(min(SHOWN_PER_TASK, len(originals.reports)))]))
  if "report_to_image" in generated:
    g = generated["report_to_image"]
    parts.append("<h3>report -> image (generated image, its confidence, real image; prompt "
                 "report)</h3>" + grid([
        img(g["images"][i], "generated") + confidence_map(g, i) + img(originals.images[i], "real")
        + f"<p><b>prompt:</b> {html.escape(g['prompts'][i])}</p>"
        for i in range(min(SHOWN_PER_TASK, len(g["images"])))]))
  if "joint" in generated:
    g = generated["joint"]
    agree = result.get("clinical", {}).get("joint_consistency", {}).get("per_pair")
    parts.append("<h3>joint generation (prompt: the dataset's prompt only; image, its "
                 "confidence)</h3>" + grid([
        img(g["images"][i]) + confidence_map(g, i) + f"<p><b>prompt:</b> {html.escape(g['prompts'][i])}<br>"
        f"<b>generated:</b> {marked_report(g, i)}</p>"
        + ("" if agree is None else '<p class="ok">report and image agree</p>' if agree[i]
           else '<p class="bad">report and image disagree</p>')
        for i in range(min(SHOWN_PER_TASK, len(g["images"])))]))
  return "".join(parts)


def memorisation_section(memo: dict, shown: dict) -> str:
  parts = ['<p class="note">Each generated sample against its nearest training sample; the real test '
           "samples (never trained on) are the yardstick: generations much closer to the training set "
           "than they are would suggest copying.</p>"]
  for kind in ("images", "reports"):
    rows = [[name, key, value] for name, block in memo[kind].items()
            for key, value in metric_rows(block)]
    parts.append(table(["samples", "quantity", "value"], rows))
  found, training, generated = shown["memorisation"], shown["training"], shown["generated"]
  parts.append(histogram({k: v.distance for k, v in found["images"].items()},
                         "nearest training image, pixel RMSE (0-255)"))
  parts.append(histogram({k: v.length for k, v in found["reports"].items()},
                         "longest word run shared with a training report"))
  for task in ("report_to_image", "joint"):
    if task in found["images"]:
      parts.append(f"<h4>{task}: the generated images closest to a training image (left: generated, "
                   "right: that training image)</h4>" + grid([
                       img(generated[task]["images"][s["generated"]], "generated")
                       + img(training.images[s["train"]], "nearest training image")
                       + f"<p>pixel RMSE {s['distance']:.1f}</p>"
                       for s in found["images"][task].most_suspicious(4)]))
  for task in ("image_to_report", "joint"):
    if task in found["reports"]:
      parts.append(f"<h4>{task}: the generated reports sharing the longest verbatim run with a "
                   "training report</h4>" + grid([
                       f"<p><b>{s['length']} words shared:</b> <i>{html.escape(s['ngram'])}</i></p>"
                       f"<p>generated: {html.escape(generated[task]['reports'][s['generated']])}</p>"
                       for s in found["reports"][task].most_suspicious(4)]))
  return "".join(parts)


def chexpert_section(ce: dict) -> str:
  """Clinical efficacy over the CheXpert-14 observations: F1 per observation, micro and macro."""
  strict = ce["uncertain as negative"]
  names = [n for n in strict["MeDiM"] if n not in ("micro", "macro")]
  rows = [[html.escape(n), strict["MeDiM"][n]["support"], strict["MeDiM"][n]["f1"],
           strict["retrieval baseline"][n]["f1"]] for n in names]
  for average in ("micro", "macro"):
    for u, scores in ce.items():
      if u.startswith("uncertain"):
        rows.append([f"<b>{average} P / R / F1</b> ({html.escape(u)})", "",
                     " / ".join(f"{scores['MeDiM'][average][k]:.3f}" for k in ("precision", "recall", "f1")),
                     " / ".join(f"{scores['retrieval baseline'][average][k]:.3f}"
                                for k in ("precision", "recall", "f1"))])
  return ("<h3>Clinical efficacy, CheXpert-14 (image -> report)</h3>"
          + table(["observation", "reference positives", "MeDiM F1", "retrieval baseline F1"], rows)
          + f'<p class="note">{html.escape(ce["labeler"])}: both the generated and the real report '
          "are labelled by the same rules; per-observation F1 counts uncertain mentions as "
          "negative.</p>")


def write(path: str, results: dict, shown: dict, workdir: str) -> str:
  card = results["card"]
  body = [f"<h1>MeDiM-JAX evaluation: checkpoint {card['checkpoint_step']}</h1>",
          f'<p class="note">{card["examples"]} {html.escape(card["split"])} examples; '
          f"{html.escape(card['devices'])}; evaluation took {card.get('seconds', 0):.0f} s. "
          "Regenerate with the command in the evaluation card at the bottom.</p>"]
  curves = loss_curves(workdir)
  if curves:
    body.append("<h2>Training</h2>" + curves)
  for name, result in results["datasets"].items():
    body.append(f"<h2>{html.escape(name)}</h2>")
    if "clinical" in result:
      body.append("<h3>Clinical agreement</h3>" + clinical_section(result["clinical"]))
    if "report_metrics" in result:
      rows = [[protocol, html.escape(metric), value]
              for protocol, metrics in result["report_metrics"].items()
              for metric, value in (metrics.items() if isinstance(metrics, dict) else [])]
      body.append("<h3>Report metrics (image -> report vs the real report)</h3>"
                  + table(["protocol", "metric", "value"], rows))
    if "chexpert14_rule_based" in result:
      body.append(chexpert_section(result["chexpert14_rule_based"]))
    body.append("<h3>Image metrics</h3>" + table(["metric", "value"],
                                                  metric_rows(result["image_metrics"])))
    body.append(samples_section(shown[name], result))
    body.append("<h3>Memorisation</h3>" + memorisation_section(result["memorisation"], shown[name]))
  rows = [[html.escape(k), v if not isinstance(v, dict) else
           html.escape(json.dumps(v))] for k, v in card.items() if k != "config"]
  body.append("<h2>Evaluation card</h2>" + table(["field", "value"], rows)
              + f"<details><summary>config</summary><pre>{html.escape(card['config'])}</pre></details>")
  page = ("<!doctype html><html><head><meta charset='utf-8'><title>MeDiM-JAX evaluation</title>"
          f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(page)
  os.replace(tmp, path)
  return path
