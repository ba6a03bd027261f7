"""The sampler speed/quality table on a tiny trained smoke run."""

from configs import smoke as smoke_config
from medim_jax import jobs
from medim_jax.bench import sampler_pareto


def test_every_setting_is_measured_with_its_model_calls_and_quality(tmp_path):
  config = smoke_config.get_config("tiny")
  jobs.run(config, str(tmp_path), "train")
  settings = [("confidence", 4, None), ("threshold", 4, 0.0)]
  rows = sampler_pareto.measure(config, str(tmp_path), settings=settings, examples=4)
  assert [(r["task"], r["strategy"]) for r in rows] == [
      (task, strategy) for task in sampler_pareto.TASKS for strategy in ("confidence", "threshold")]
  for row in rows:
    # Fixed: one call per step; threshold 0: everything in the first step.
    assert row["mean_model_calls"] == row["max_model_calls"] == (4 if row["strategy"] == "confidence" else 1)
    assert 0.0 <= row["quality"] <= 1.0 and row["seconds_per_sample"] > 0
  table = sampler_pareto.markdown(rows)
  assert "| threshold 0 (max 4) | 1.0 / 1 |" in table
  sampler_pareto.plot(rows, str(tmp_path / "pareto.png"))
  assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
