"""The reading study's bookkeeping: measured rows resume, the table and the curves."""

import json

import numpy as np

from medim_jax.evaluation.demo import reading_study


def fake_row(step):
  return {"step": step, "held-out text loss": 2.0 - step / 1e4, "held-out image loss": 4.0,
          "reading AUC": {"cardiomegaly": 0.5 + step / 1e4, "opacity": 0.6},
          "positives": {"cardiomegaly": 5, "opacity": 16},
          "image->report macro F1": 0.05 + step / 1e5, "retrieval macro F1": 0.141,
          "report->image macro F1": 0.1, "chance macro F1": 0.06}


def test_run_measures_only_the_missing_steps_and_keeps_rows_in_step_order(tmp_path, monkeypatch):
  measured = []
  monkeypatch.setattr(reading_study, "measure",
                      lambda config, workdir, step: measured.append(step) or fake_row(step))
  out = tmp_path / "study.json"
  reading_study.run(None, str(tmp_path), [3000, 750], str(out))
  reading_study.run(None, str(tmp_path), [750, 1500, 3000], str(out))
  assert measured == [3000, 750, 1500]
  rows = json.loads(out.read_text())["rows"]
  assert [r["step"] for r in rows] == [750, 1500, 3000]
  assert not (tmp_path / "study.json.tmp").exists()


def test_table_and_plot_show_every_row(tmp_path):
  out = tmp_path / "run_a" / "reading_study.json"
  out.parent.mkdir()
  out.write_text(json.dumps({"rows": [fake_row(750), fake_row(3000)]}))
  table = reading_study.table([str(out)])
  assert table.count("\n") == 3
  assert "| run_a | 3,000 | 1.700 / 4.000 | 0.800 / 0.600 | 0.080 (0.141) | 0.100 (0.060) |" in table
  png = tmp_path / "curves.png"
  reading_study.plot([str(out), str(out)], str(png), ["a", "b"])
  from PIL import Image
  image = np.asarray(Image.open(png))
  assert image.shape[0] > 400 and image.std() > 10  # drawn, not blank
