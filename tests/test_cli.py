"""The command line end to end on the tiny smoke config, and its errors."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=280):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "medim_jax.main", *args], cwd=ROOT, env=env,
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


def test_folders_train_vq_tokenize_train_and_sample_from_the_cli(tmp_path):
  from tests.test_shards_and_pipeline import make_folder
  make_folder(tmp_path / "xray", 40, 0)
  make_folder(tmp_path / "slides", 30, 1)
  workdir = tmp_path / "run"
  common = ["--config", "configs/demo.py:tiny", "--workdir", str(workdir),
            "--config.data.name=folders", "--config.data.image_size=16",
            "--config.data.patch_pixels=4", "--config.data.image_codebook_size=8",
            "--config.data.text_length=32", "--config.data.text_vocab_size=80",
            f"--config.data.datasets.chest.train={tmp_path / 'xray'}",
            f"--config.data.datasets.pathology.train={tmp_path / 'slides'}",
            "--config.data.val_fraction=0.2"]
  result = run_main(*common, "--mode", "train_vq", timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "vq" / "tokenizer.npz").exists() and "VQ tokenizer saved" in result.stdout
  common.append("--config.data.image_tokenizer=vq")
  result = run_main(*common, "--mode", "tokenize", timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Shards written to" in result.stdout and "chest:" in result.stdout
  manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
  assert manifest["tokenizers"]["image_tokenizer"]["fingerprint"].startswith("vq:")

  result = run_main(*common, "--mode", "all")  # shards exist: reused, then train and sample
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Shards written" not in result.stdout
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(m["split"] == "train" and m["step"] == 4 for m in metrics)
  rows = [json.loads(line) for line in
          (workdir / "samples" / "image_to_report" / "samples.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and all(isinstance(r["generated_report"], str) for r in rows)
