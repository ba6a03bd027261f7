"""The command line end to end on the tiny smoke config, and its errors."""

import json
import os
import subprocess
import sys

import pytest

from cli_env import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=280):
  return subprocess.run([sys.executable, "-m", "medim_jax.main", *args], cwd=ROOT, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout)


def test_mode_all_trains_samples_and_scores(tmp_path):
  result = run_main("--config", "configs/smoke.py:tiny", "--workdir", str(tmp_path), "--mode", "all")
  assert result.returncode == 0, result.stderr[-3000:]
  for task in ("report_to_image", "image_to_report", "joint"):
    folder = tmp_path / "samples" / task
    assert (folder / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("generated_report" in r for r in rows)
  scores = json.loads((tmp_path / "samples" / "scores.json").read_text())
  assert set(scores) == {"report_to_image", "image_to_report", "joint"}
  assert "all_attributes_accuracy" in scores["image_to_report"]
  assert "Smoke scores" in result.stdout


def test_unknown_config_key_is_one_clear_error(tmp_path):
  result = run_main("--config", "configs/smoke.py:tiny", "--workdir", str(tmp_path),
                    "--config.train.num_step=3", timeout=60)
  assert result.returncode != 0
  assert "unknown config key 'train.num_step'" in result.stderr
  assert "did you mean train.num_steps" in result.stderr
  assert "Traceback" not in result.stderr


def test_sampling_without_a_checkpoint_says_to_train_first(tmp_path):
  result = run_main("--config", "configs/smoke.py:tiny", "--workdir", str(tmp_path), "--mode", "sample",
                    timeout=120)
  assert result.returncode == 1
  assert "no checkpoint in" in result.stderr and "train first" in result.stderr
  assert "Traceback" not in result.stderr
  debug = run_main("--config", "configs/smoke.py:tiny", "--workdir", str(tmp_path), "--mode", "sample",
                   "--debug", timeout=120)
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "train first" in debug.stderr


def write_labels(folder):
  """labels.jsonl for make_folder's pairs: a 'nodule' when the square is in the upper half."""
  lines = []
  for text in sorted(folder.glob("*.txt")):
    upper = text.read_text().startswith("upper")
    lines.append(json.dumps({"name": text.stem, "labels": {"nodule": upper, "opacity": False}}))
  (folder / "labels.jsonl").write_text("\n".join(lines) + "\n")


def test_main_job_runs_every_stage_on_folders_then_reuses_them(tmp_path):
  from tests.test_shards_and_pipeline import make_folder
  for name, count, seed in (("xray", 40, 0), ("xray_test", 10, 2), ("slides", 30, 1),
                            ("slides_test", 6, 3)):
    make_folder(tmp_path / name, count, seed)
  write_labels(tmp_path / "xray")
  write_labels(tmp_path / "xray_test")
  workdir = tmp_path / "run"
  common = ["--config", "configs/demo.py:tiny", "--workdir", str(workdir),
            "--config.data.name=folders", "--config.data.image_size=16",
            "--config.data.image_tokenizer=vq", "--config.data.text_length=32",
            "--config.data.text_vocab_size=80",
            f"--config.data.datasets.chest.train={tmp_path / 'xray'}",
            f"--config.data.datasets.chest.test={tmp_path / 'xray_test'}",
            f"--config.data.datasets.pathology.train={tmp_path / 'slides'}",
            f"--config.data.datasets.pathology.test={tmp_path / 'slides_test'}",
            "--config.data.val_fraction=0.2", "--config.eval.report_metrics=False",
            "--config.model.finding_names=nodule,opacity"]
  result = run_main(*common, "--mode", "all")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "VQ tokenizer saved" in result.stdout and "Shards written to" in result.stdout
  manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
  assert manifest["tokenizers"]["image_tokenizer"]["fingerprint"].startswith("vq:")
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(m["split"] == "train" and m["step"] == 4 for m in metrics)
  logged = [m for m in metrics if m["split"] in ("train", "eval")]
  assert all("finding_loss" in m for m in logged) and any(m["finding_loss"] > 0 for m in logged)

  results = json.loads((workdir / "eval" / "metrics.json").read_text(),  # strict JSON: no NaN
                       parse_constant=lambda name: pytest.fail(f"metrics.json holds {name}"))
  assert results["card"]["checkpoint_step"] == 4 and results["card"]["examples"] == 8
  chest, pathology = results["datasets"]["chest"], results["datasets"]["pathology"]
  assert "clinical" in chest and "clinical" not in pathology  # only chest has labels.jsonl
  image_to_report = chest["clinical"]["image_to_report"]
  assert set(image_to_report) >= {"MeDiM", "retrieval baseline", "majority baseline"}
  assert image_to_report["majority baseline"]["nodule"]["support"] == sum(
      json.loads(line)["labels"]["nodule"]
      for line in (tmp_path / "xray_test" / "labels.jsonl").read_text().splitlines()[:4])
  assert "unavailable" in chest["image_metrics"]["report_to_image"]["fid"]  # no weights configured
  from medim_jax.evaluation import chexpert
  ce = chest["chexpert14_rule_based"]["uncertain as negative"]
  assert set(ce) == {"MeDiM", "retrieval baseline"}
  real = [p.read_text() for p in sorted((tmp_path / "xray_test").glob("*.txt"))[:4]]
  assert ce["MeDiM"]["Pleural Effusion"]["support"] == sum(
      chexpert.label_report(r)["Pleural Effusion"] == 1 for r in real) > 0
  assert (f"chexpert14_rule_based, image->report, micro / macro F1 (uncertain as negative): MeDiM "
          f"{ce['MeDiM']['micro']['f1']:.3f} / {ce['MeDiM']['macro']['f1']:.3f}") in result.stdout
  assert chest["image_metrics"]["joint"]["frechet_distance_tokenizer_encoder_features"] >= 0
  assert len(chest["clinical"]["joint_consistency"]["per_pair"]) == 4
  page = (workdir / "report.html").read_text()
  for heading in ("Clinical agreement", "Memorisation", "Evaluation card", "image -> report",
                  "Clinical efficacy, CheXpert-14"):
    assert heading in page
  assert page.count('class="heat"') == 16  # a confidence map per report->image and joint image (2 x 2 x 4)
  rows = (workdir / "eval" / "generated" / "image_to_report" / "samples.jsonl").read_text()
  assert len(rows.splitlines()) == 8

  again = run_main(*common, "--mode", "all")  # every stage's output is there: nothing is redone
  assert again.returncode == 0, again.stderr[-3000:]
  assert "VQ tokenizer: reusing" in again.stdout and "Shards written" not in again.stdout
  assert again.stdout.count("reusing") >= 4 and "finding classifier (" not in again.stdout

  # The reading study scores the validation split in its own folder: the run's test-split
  # metrics.json and report.html stay as they were.
  before = {name: (workdir / name).read_bytes() for name in ("eval/metrics.json", "report.html")}
  study = subprocess.run(
      [sys.executable, "-m", "medim_jax.evaluation.demo.reading_study", *common[:4], "--steps", "4",
       *common[4:]],
      cwd=ROOT, env=cli_env(), capture_output=True,
      text=True, timeout=280)
  assert study.returncode == 0, study.stderr[-3000:]
  row = json.loads((workdir / "reading_study.json").read_text())["rows"][0]
  assert row["step"] == 4 and set(row["reading AUC"]) == {"nodule", "opacity"}
  assert 0.0 <= row["model-ranked retrieval macro F1"] <= 1.0
  assert set(row["model-ranked retrieval F1"]) == {"nodule", "opacity"}
  assert (workdir / "reading_study" / "step_4" / "metrics.json").exists()
  assert before == {name: (workdir / name).read_bytes() for name in before}

  # The sampler speed/quality table on this run: chest validation rows, macro finding F1.
  pareto = subprocess.run(
      [sys.executable, "-m", "medim_jax.bench.sampler_pareto", *common[:4], *common[4:],
       "--settings", "confidence:2::2,threshold:2:0", "--examples", "4",
       "--out", str(tmp_path / "pareto.json")],
      cwd=ROOT, env=cli_env(), capture_output=True,
      text=True, timeout=280)
  assert pareto.returncode == 0, pareto.stderr[-3000:]
  rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
  assert [(r["task"], r["condition_cache_every"]) for r in rows] == [
      (task, k) for task in ("image_to_report", "report_to_image") for k in (2, 0)]
  assert all(r["data"] == "demo" and r["examples"] == 4 and 0 <= r["quality"] <= 1 for r in rows)
  assert "| confidence, 2 steps, cache K=2 |" in pareto.stdout
  assert "quality (macro finding F1)" in pareto.stdout
