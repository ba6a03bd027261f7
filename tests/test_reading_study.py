"""The reading study's bookkeeping: measured rows resume, the table and the curves."""

import json

import numpy as np
import pytest

from configs import demo
from medim_jax.evaluation.demo import reading_study


def fake_row(step):
  return {"step": step, "held-out text loss": 2.0 - step / 1e4, "held-out image loss": 4.0,
          "reading AUC": {"cardiomegaly": 0.5 + step / 1e4, "opacity": 0.6},
          "positives": {"cardiomegaly": 5, "opacity": 16},
          "image->report macro F1": 0.05 + step / 1e5, "retrieval macro F1": 0.141,
          "report->image macro F1": 0.1, "chance macro F1": 0.06,
          "image->report F1": {"opacity": 0.2}, "report->image F1": {"opacity": 0.3},
          "model-ranked retrieval macro F1": 0.12, "model-ranked retrieval F1": {"opacity": 0.25}}


def test_run_measures_only_the_missing_steps_and_keeps_rows_in_step_order(tmp_path, monkeypatch):
  measured = []
  monkeypatch.setattr(reading_study, "measure",
                      lambda config, workdir, step, draws, row:
                      measured.append(step) or fake_row(step))
  out = tmp_path / "study.json"
  reading_study.run(demo.get_config(), str(tmp_path), [3000, 750], str(out))
  reading_study.run(demo.get_config(), str(tmp_path), [750, 1500, 3000], str(out))
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
  assert "| run_a | 3,000 | 1.700 / 4.000 | 0.800 / 0.600 | 0.080 (0.141) | 0.120 | 0.100 (0.060) |" in table
  png = tmp_path / "curves.png"
  reading_study.plot([str(out), str(out)], str(png), ["a", "b"])
  from PIL import Image
  image = np.asarray(Image.open(png))
  assert image.shape[0] > 400 and image.std() > 10  # drawn, not blank


def fake_draw(seed):
  return {"image->report macro F1": 0.1 * (seed + 1), "retrieval macro F1": 0.141,
          "report->image macro F1": 0.2, "chance macro F1": 0.06,
          "image->report F1": {"cardiomegaly": 0.1 * seed, "effusion": None},
          "report->image F1": {"cardiomegaly": 0.5, "effusion": None}}


def test_more_draws_sample_only_the_seeds_a_row_lacks_and_average_them(tmp_path, monkeypatch):
  from medim_jax.data import build
  monkeypatch.setattr(build, "build_dataset", lambda config, workdir: None)
  sampled = []
  monkeypatch.setattr(reading_study, "sample_and_score",
                      lambda config, workdir, dataset, step, seed:
                      sampled.append(seed) or fake_draw(seed))
  # A row measured before draws were counted: one draw, of sample seed 0.
  old = {**fake_row(3000), **fake_draw(0)}
  row = reading_study.measure(demo.get_config(), str(tmp_path), 3000, draws=3, row=old)
  assert sampled == [1, 2]
  assert row["sample seeds"] == [0, 1, 2]
  assert row["image->report macro F1 draws"] == pytest.approx([0.1, 0.2, 0.3])
  assert row["image->report macro F1"] == pytest.approx(0.2)
  assert reading_study.spread(row, "image->report") == pytest.approx(0.1)
  assert reading_study.spread(row, "report->image") == 0.0
  assert row["image->report F1"] == {"cardiomegaly": pytest.approx(0.1), "effusion": None}
  assert row["held-out text loss"] == old["held-out text loss"]  # not measured again
  out = tmp_path / "study.json"
  out.write_text(json.dumps({"rows": [row]}))
  assert ("| 0.200 +- 0.100 (3 draws) (0.141) | 0.120 | 0.200 +- 0.000 (3 draws) (0.060) |"
          in reading_study.table([str(out)]))

  # Asking for as many draws again samples nothing; run() leaves the row as it is.
  reading_study.run(demo.get_config(), str(tmp_path), [3000], str(out), draws=3)
  assert sampled == [1, 2]
  assert json.loads(out.read_text())["rows"] == [row]
  reading_study.run(demo.get_config(), str(tmp_path), [3000], str(out), draws=4)
  assert sampled == [1, 2, 3]
  assert json.loads(out.read_text())["rows"][0]["sample seeds"] == [0, 1, 2, 3]


def test_held_out_losses_use_the_standard_forward_process_whatever_the_run_trained_with(
    tmp_path, monkeypatch):
  from types import SimpleNamespace
  from medim_jax import sample
  from medim_jax.data import build
  from medim_jax.evaluation.demo import reading_probe
  from medim_jax.training import train
  seen = []

  class Trainer:
    def __init__(self, config, layout):
      seen.append(config.diffusion.whole_target_prob)

    def evaluate(self, params, batches):
      return {"text_loss": 1.5, "image_loss": 3.5}

  dataset = SimpleNamespace(layout=None, eval_batches=lambda batch_size, count: [])
  monkeypatch.setattr(build, "build_dataset", lambda config, workdir: dataset)
  monkeypatch.setattr(train, "Trainer", Trainer)
  monkeypatch.setattr(sample, "load_sampling_params", lambda *args: (None, None))
  monkeypatch.setattr(reading_probe, "probe", lambda *args, **kwargs: {
      "model": {"opacity": 0.6}, "positives": {"opacity": 16}})
  monkeypatch.setattr(reading_study, "sample_and_score", lambda *args: fake_draw(0))
  config = demo.get_config()
  config.diffusion.whole_target_prob = 0.5  # as the run was trained
  row = reading_study.measure(config, str(tmp_path), 3000, draws=1)
  assert seen == [0.0] and config.diffusion.whole_target_prob == 0.5
  assert (row["held-out text loss"], row["held-out image loss"]) == (1.5, 3.5)


def test_a_row_from_before_the_ranked_retrieval_gets_it_without_sampling_again(tmp_path,
                                                                              monkeypatch):
  from medim_jax.data import build
  from medim_jax.evaluation.demo import reading_probe
  monkeypatch.setattr(build, "build_dataset", lambda config, workdir: None)
  monkeypatch.setattr(reading_study, "sample_and_score",
                      lambda *args: pytest.fail("the row's draw is there: nothing to sample"))
  probed = []
  reading = {"model": {"cardiomegaly": 0.7, "opacity": 0.6},
             "positives": {"cardiomegaly": 5, "opacity": 16},
             "model-ranked retrieval": {"macro F1": 0.15, "F1": {"opacity": 0.3}}}
  monkeypatch.setattr(reading_probe, "probe", lambda config, workdir, step, classifiers:
                      probed.append((step, classifiers)) or reading)
  old = {**fake_row(3000), **fake_draw(0)}
  for key in ("model-ranked retrieval macro F1", "model-ranked retrieval F1"):
    del old[key]
  out = tmp_path / "study.json"
  out.write_text(json.dumps({"rows": [old]}))
  reading_study.run(demo.get_config(), str(tmp_path), [3000], str(out))
  reading_study.run(demo.get_config(), str(tmp_path), [3000], str(out))  # now complete: no probe
  assert probed == [(3000, False)]
  row = json.loads(out.read_text())["rows"][0]
  assert row["model-ranked retrieval macro F1"] == 0.15
  assert row["model-ranked retrieval F1"] == {"opacity": 0.3}
  assert row["reading AUC"] == {"cardiomegaly": 0.7, "opacity": 0.6}
  assert row["held-out text loss"] == old["held-out text loss"]
  assert row["image->report macro F1"] == old["image->report macro F1"]
