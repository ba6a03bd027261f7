"""The benchmark's yardsticks: the FLOP count, the PyTorch baseline's model, the Python-loop sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medim_jax.bench import cli, sampler_loop, shapes, timing
from medim_jax.diffusion import sampler as sampler_lib, schedules
from medim_jax.models import transformer

LAYOUT = helpers.LAYOUT
# Grouped KV heads, segment markers and learned positions: every part the baseline must mirror.
OVERRIDES = dict(learned_positions=LAYOUT.seq_length + 2)
APPLY, PARAMS = helpers.tiny_model(seed=3, **OVERRIDES)


def test_flop_count_matches_the_closed_form_and_the_programs_matmuls():
  # d 32, 2 layers, 4 heads (2 kv) of 8, mlp 48, time frequencies 16, vocab 20, 14 + 2 markers.
  cfg = helpers.tiny_config(**OVERRIDES)
  batch, length, seq = 3, LAYOUT.seq_length, LAYOUT.seq_length + 2
  per_token_layer = 2 * 32 * (4 + 2 * 2) * 8 + 2 * 4 * 8 * 32 + 3 * 2 * 32 * 48
  want = {"dense": batch * 2 * seq * per_token_layer,
          "attention": batch * 2 * 2 * 2 * seq * seq * 4 * 8,
          "head": batch * length * 2 * 32 * 20,
          "conditioning": batch * (2 * (16 * 32 + 32 * 32) + 2 * 2 * 32 * 6 * 32)}
  assert shapes.forward_flops(cfg, batch, length) == want

  tokens = jnp.asarray(helpers.random_tokens(np.random.default_rng(0), batch))
  counted = shapes.jaxpr_matmul_flops(APPLY, PARAMS, tokens, jnp.ones(batch), None)
  assert counted == sum(want.values())


def test_the_torch_baseline_is_the_same_model():
  torch = pytest.importorskip("torch")
  from medim_jax.bench import torch_twin as bench_torch
  model = bench_torch.MeDiMTorch(helpers.tiny_config(**OVERRIDES))
  assert bench_torch.count_params(model) == transformer.count_params(PARAMS)

  bench_torch.load_jax_params(model, PARAMS)
  tokens = helpers.random_tokens(np.random.default_rng(1), 3)
  sigma = np.array([0.1, 1.0, 3.0], np.float32)
  valid = np.ones(tokens.shape, bool)
  valid[1, 2:5] = False  # padding keys
  want = np.asarray(jax.jit(APPLY)(PARAMS, jnp.asarray(tokens), jnp.asarray(sigma), jnp.asarray(valid)))
  with torch.no_grad():
    got = model(torch.from_numpy(tokens).long(), torch.from_numpy(sigma), torch.from_numpy(valid))
  np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_the_python_loop_sampler_generates_what_the_jitted_sampler_does():
  config = sampler_lib.SamplerConfig(text_steps=2, image_steps=3, cfg_scale=1.5)
  schedule = schedules.LogLinearSchedule()
  tokens = helpers.random_tokens(np.random.default_rng(0), 4)
  x = sampler_lib.task_inputs("joint", tokens, np.full(4, 2), LAYOUT)
  ids = np.arange(10, 14)
  want = sampler_lib.Sampler(APPLY, LAYOUT, schedule, config)(PARAMS, x, ids, 7).tokens
  # The jitted step runs the very code the op-by-op loop runs, and compiles in a fraction of the time.
  loop = sampler_loop.PythonLoopSampler(APPLY, LAYOUT, schedule, config, jit_step=True)
  np.testing.assert_array_equal(loop(PARAMS, x, ids, 7, (2, 3)), np.asarray(want))


def test_a_shape_the_device_cannot_hold_is_reported_and_other_errors_are_not_hidden():
  too_big = lambda: jax.block_until_ready(jax.jit(lambda: jnp.ones((2**42,), jnp.float32))())
  result = timing.out_of_memory_as_result("huge", too_big)
  assert result["shape"] == "huge" and result["error"].startswith("out of memory: RESOURCE_EXHAUSTED")
  cli.print_train([result])  # the table prints the row instead of failing on missing numbers
  assert timing.out_of_memory_as_result("fine", lambda: {"shape": "fine"}) == {"shape": "fine"}
  with pytest.raises(TypeError):
    timing.out_of_memory_as_result("broken", lambda: jnp.ones(3).reshape(2, 2))


def test_the_condition_cache_benchmark_times_every_refresh_interval_on_both_tasks(capsys):
  results = cli.main(["--what", "sampler_cache", "--sample_shape", "tiny", "--sample_steps", "3",
                      "--sample_batch", "2", "--repeats", "1", "--cache_refresh", "1,2"])
  tasks = results["sampler_cache"]["tasks"]
  assert list(tasks) == ["image_to_report", "report_to_image"]
  for methods in tasks.values():
    assert list(methods) == ["no cache", "K=1", "K=2"]
    assert methods["no cache"]["speedup"] == 1.0
    # Refreshing every step is the uncached sampler exactly.
    assert methods["K=1"]["same_tokens_as_uncached"] == 1.0
  assert "Condition cache, tiny float32: report_to_image" in capsys.readouterr().out
