"""The sampler benchmark: our jitted loop against the original's per-step Python loop."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from medim_jax.bench.shapes import Shape, forward_flops, model_config, random_batch
from medim_jax.bench.timing import summary, time_alternating
from medim_jax.diffusion import sampler as sampler_lib
from medim_jax.tokenizers.vocab import IMAGE, TEXT, TokenLayout
from medim_jax.training import train


class PythonLoopSampler:
  """The original's way of sampling: a Python loop over the steps that calls the jitted model once
  per step (conditional and unconditional rows in one batch, as ours) and does the rest of the
  step's math op by op. Same math as ``Sampler._sample`` with the confidence strategy; it reuses
  the sampler's own guidance, time input, keys, reveal fractions and reveal rule, so for the same
  inputs both generate the same tokens.

  ``jit_step=True`` jits the whole step instead (model and math), called once per step: what is
  left of the difference is the loop itself (one dispatch and its host round trip per step).
  """

  def __init__(self, apply_fn, layout: TokenLayout, schedule, config: sampler_lib.SamplerConfig,
               jit_step: bool = False):
    if config.strategy != "confidence":
      raise ValueError("the Python-loop reference implements the confidence strategy only")
    self.sampler = sampler_lib.Sampler(jax.jit(apply_fn), layout, schedule, config)
    self.layout, self.config = layout, config
    self.step = (jax.jit(self._step, static_argnames=("segment_steps", "generated")) if jit_step
                 else self._step)

  def __call__(self, params, tokens, example_ids, seed: int,
               segment_steps: tuple[int, int]) -> np.ndarray:
    layout = self.layout
    x = jnp.asarray(tokens, jnp.int32)
    example_ids = jnp.asarray(example_ids, jnp.int32)
    generate = x == layout.mask_id
    modality = jnp.asarray(layout.modality())
    in_segment = (modality == TEXT, modality == IMAGE)
    initial_masked = tuple(jnp.sum(generate & seg[None], axis=1) for seg in in_segment)
    fractions = tuple(jnp.asarray(sampler_lib.cumulative_reveal_fraction(
        self.config.reveal_schedule, max(s, 1))) for s in segment_steps)
    generated = self.sampler.generated_segments(np.asarray(tokens))
    for step in range(max(segment_steps)):
      # The step as an int32 array, as in the jitted loop, so that t is computed the same way.
      x = self.step(params, x, generate, initial_masked, fractions, example_ids, jnp.asarray(seed),
                    jnp.asarray(step, jnp.int32), segment_steps=segment_steps, generated=generated)
    if bool(jnp.any(x == layout.mask_id)):
      raise RuntimeError("tokens left masked after the last step (the confidence sampler reveals "
                         "every one)")
    return np.asarray(x)

  def _step(self, params, x, generate, initial_masked, fractions, example_ids, seed, step, *,
            segment_steps, generated):
    """One iteration of ``Sampler._sample``'s loop body (confidence strategy), tokens only."""
    cfg, layout, sampler = self.config, self.layout, self.sampler
    batch, length = x.shape
    num_steps = max(segment_steps)
    t = jnp.full((batch,), 1.0 - step / num_steps * (1.0 - cfg.final_t), jnp.float32)
    masked = x == layout.mask_id
    log_probs, _, _ = sampler._guided_log_probs(params, x, ~generate, sampler._sigma(x, generate, t),
                                                t, generated)
    keys = sampler_lib.example_keys(seed, example_ids, step)
    draw_keys, noise_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    sampled, chosen, _ = sampler._draw(log_probs, generated, draw_keys[:, 0], x)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (length,)))(noise_keys[:, 0])
    confidence = chosen + cfg.gumbel_scale * t[:, None] * noise
    modality = jnp.asarray(layout.modality())
    reveal = jnp.zeros_like(masked)
    for seg, seg_mask in enumerate((modality == TEXT, modality == IMAGE)):
      if seg not in generated:
        continue
      done_after = ((step + 1) * segment_steps[seg]) // num_steps
      reveal |= sampler_lib.confidence_reveal(masked & seg_mask[None], confidence,
                                              initial_masked[seg], fractions[seg][done_after],
                                              done_after)
    return jnp.where(reveal, sampled, x)


def bench_sampler(shape: Shape, steps: int, batch_size: int, repeats: int,
                  peak_tflops: float | None, python_loops: bool = True) -> dict:
  """Seconds per joint image+report pair: jitted sampler vs the Python loop (both variants, unless
  ``python_loops`` is False)."""
  config = shape.config
  trainer = train.Trainer(config, shape.layout)
  params = trainer.init_state(0).params
  sampler_config = dataclasses.replace(sampler_lib.SamplerConfig.from_config(config.sample),
                                       text_steps=steps, image_steps=steps)
  if sampler_config.cfg_scale <= 0:
    raise ValueError("the sampler benchmark measures guided sampling: the config's cfg_scale is 0")
  batch = random_batch(shape.layout, batch_size)
  inputs = sampler_lib.task_inputs("joint", batch["tokens"], batch["prompt_length"], shape.layout)
  example_ids, seed = np.arange(batch_size), 0
  segment_steps = (steps, steps)
  # Every step runs the model once on the conditional and unconditional rows together.
  step_flops = forward_flops(model_config(shape), 2 * batch_size, shape.layout.seq_length)
  flops = steps * sum(step_flops.values())

  jitted = sampler_lib.Sampler(trainer.model.apply, shape.layout, trainer.schedule, sampler_config)
  methods = {
      "jitted": lambda: np.asarray(jitted(params, inputs, example_ids, seed, segment_steps).tokens),
  }
  for name, jit_step in (("python_loop", False), ("python_loop_jitted_step", True))[:2 * python_loops]:
    loop = PythonLoopSampler(trainer.model.apply, shape.layout, trainer.schedule, sampler_config,
                             jit_step)
    methods[name] = (lambda loop: lambda: loop(params, inputs, example_ids, seed, segment_steps))(loop)

  result = {"shape": shape.name, "dtype": config.model.dtype, "steps": steps,
            "batch_size": batch_size, "cfg_scale": sampler_config.cfg_scale,
            "strategy": sampler_config.strategy, "model_batch": 2 * batch_size,
            "seq_length": shape.layout.seq_length, "model_flops_per_call": flops}
  outputs, first_call_s = {}, {}
  with jax.set_mesh(trainer.mesh):  # params live on the trainer's mesh, as in sample.py
    for name, method in methods.items():
      start = time.perf_counter()
      outputs[name] = method()  # compiles
      first_call_s[name] = time.perf_counter() - start
    times = time_alternating(methods, repeats, 1, 0, "sampler call")
  for name in methods:
    stats = summary(times[name])
    tflops = flops / stats["median_s"] / 1e12
    result[name] = {**stats, "first_call_s": first_call_s[name],
                    "s_per_pair": stats["median_s"] / batch_size, "tflops": tflops,
                    "fraction_of_peak": tflops / peak_tflops if peak_tflops else None}
  for name in methods:
    if name != "jitted":
      result[name]["same_tokens_as_jitted"] = float(np.mean(outputs[name] == outputs["jitted"]))
      result[name]["jitted_speedup"] = result[name]["median_s"] / result["jitted"]["median_s"]
  return result


CACHE_TASKS = ("image_to_report", "report_to_image")


def bench_condition_cache(shape: Shape, steps: int, batch_size: int, repeats: int,
                          refresh_every=(0, 1, 2, 4, 8)) -> dict:
  """Seconds per sampler call for image->report and report->image with the condition cache
  recomputed every K steps (0: no cache), the same fixed-step confidence sampler (so the same
  number of model calls) and random weights: what the cache saves in wall-clock. Agreement with
  the uncached tokens is reported, but with random weights it says little about quality."""
  config = shape.config
  trainer = train.Trainer(config, shape.layout)
  params = trainer.init_state(0).params
  base = dataclasses.replace(sampler_lib.SamplerConfig.from_config(config.sample),
                             strategy="confidence", text_steps=steps, image_steps=steps)
  batch = random_batch(shape.layout, batch_size)
  example_ids = np.arange(batch_size)
  result = {"shape": shape.name, "dtype": config.model.dtype, "steps": steps,
            "batch_size": batch_size, "cfg_scale": base.cfg_scale,
            "seq_length": shape.layout.seq_length, "tasks": {}}
  with jax.set_mesh(trainer.mesh):
    for task in CACHE_TASKS:
      inputs = sampler_lib.task_inputs(task, batch["tokens"], batch["prompt_length"], shape.layout)
      methods, outputs = {}, {}
      for every in refresh_every:
        sampler = sampler_lib.Sampler(trainer.model.apply, shape.layout, trainer.schedule,
                                      dataclasses.replace(base, condition_cache_every=every),
                                      cache_model=trainer.model)
        segment_steps = sampler.steps_for_task(task)
        name = f"K={every}" if every else "no cache"
        methods[name] = (lambda s, st: lambda: np.asarray(
            s(params, inputs, example_ids, 0, st).tokens))(sampler, segment_steps)
        outputs[name] = methods[name]()  # compiles
      times = time_alternating(methods, repeats, 1, 0, f"{task} sampler call")
      reference = statistics.median(times["no cache"])
      generated = inputs == shape.layout.mask_id
      result["tasks"][task] = {
          name: {**summary(times[name]), "speedup": reference / statistics.median(times[name]),
                 "same_tokens_as_uncached": float(np.mean(
                     outputs[name][generated] == outputs["no cache"][generated]))}
          for name in methods}
  return result
