"""The prepared accelerator benchmark, end to end on the CPU at tiny shapes."""

import json
import os
import subprocess

from medim_jax.bench import accelerator as bench_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_batch_search_takes_the_largest_batch_whose_compiled_step_fits(monkeypatch):
  # Real compiles: the compiled step grows with the batch, and nothing fits one byte (the last
  # candidate is what is left).
  batch, tried = bench_accelerator.largest_fitting_batch("tiny", {}, (8, 4), 1, "float32")
  assert batch == 4 and tried[0]["compiled_bytes"] > tried[1]["compiled_bytes"] > 0
  # The choice, on known sizes: the first candidate within 95% of the limit.
  monkeypatch.setattr(bench_accelerator, "compiled_bytes",
                      lambda shape: 100 * shape.config.train.batch_size)
  batch, tried = bench_accelerator.largest_fitting_batch("tiny", {}, (16, 8, 4), 1000, "float32")
  assert batch == 8 and [t["batch_size"] for t in tried] == [16, 8]


def test_the_whole_plan_runs_and_writes_json_and_markdown(tmp_path):
  results = bench_accelerator.main(["--out", str(tmp_path), "--shapes", "tiny", "--rounds", "1",
                                    "--steps", "1"])
  parts = results["parts"]
  assert list(parts) == ["peak", "demo train step", "paper train step, attention xla",
                         "paper train step, attention jax_dot_product", "paper sampler"]
  assert not [name for name, part in parts.items() if "error" in part]
  assert parts["paper train step, attention xla"]["batch_size"] == 8  # CPU: no memory limit
  written = json.loads((tmp_path / "bench_accelerator.json").read_text())
  assert written["parts"].keys() == parts.keys()
  table = (tmp_path / "bench_accelerator.md").read_text()
  assert table.count("| paper train step") == 2 and "s per pair" in table


def test_the_launch_script_prints_its_command():
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "bench_gpu.sh"), "--dry-run"],
                       capture_output=True, text=True, check=True).stdout
  assert "-m medim_jax.bench.accelerator --out bench_out --remat_policy full --mu_dtype bfloat16" in out
