"""Benchmarks: training step against a PyTorch baseline, sampler against a per-step Python loop.

``python -m medim_jax.bench`` (from the repository root) measures, with warm-up and medians of
many timed runs:

- ``peak``: the matmul peak of the device (a large jitted ``jnp.dot``), so achieved FLOP/s reads as
  a fraction of what the hardware does. On a GPU MFU is taken against the card's dense bf16 peak
  (``--peak_tflops`` or ``KNOWN_PEAK_TFLOPS``); on a CPU against this measured peak.
- ``train``: our jitted training step (``train.Trainer``): step time, tokens/s, achieved TFLOP/s.
- ``torch``: the same model and step in PyTorch (``bench_torch``), alternating with ours round by
  round in this process, and the speed ratio JAX/PyTorch.
- ``sampler``: seconds per generated image+report pair (joint task, CFG) of our jitted sampler
  against a Python loop that calls the jitted model once per step, the original's way.

Shapes: ``demo`` (configs/demo.py), ``paper`` (configs/medim_liquid7b.py, an accelerator's job)
and ``paper_cpu`` (the paper's sequence, vocabulary and head size, fewer and narrower layers).
Model FLOPs count every matmul of the model (2 per multiply-add) with attention in full: it is
bidirectional, so QK^T and AV cover the whole sequence. A training step is 3x the forward pass.

XLA CPU flags are read from ``XLA_FLAGS`` as usual (set it on the command line to try some).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import demo as demo_config, medim_liquid7b
from medim_jax import train
from medim_jax.diffusion import sampler as sampler_lib
from medim_jax.evaluation import card
from medim_jax.models import transformer
from medim_jax.tokenizers.vocab import IMAGE, TEXT, TokenLayout

WHAT = ("peak", "train", "torch", "sampler")

# Dense bf16 peaks (TFLOP/s, no sparsity) by a substring of jax's device_kind.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# ---------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  config: ml_collections.ConfigDict
  layout: TokenLayout
  timed_steps: int      # per framework and round, unless --steps says otherwise
  note: str


# The paper's token space (shared/docs/REFERENCE.md): 32,003 text ids (Llama-2 + <boi> <eoi> <eos>),
# MASK, 8,192 Chameleon VQ codes; 256 report + 32x32 image tokens.
PAPER_LAYOUT = TokenLayout(text_vocab_size=32_003, image_vocab_size=8_192, text_length=256,
                           image_length=1_024)

# What of the paper's shape fits a 2-core CPU step in seconds: its sequence, vocabulary, head size
# and MLP ratio; 2 layers of width 512 instead of 10 of 3072; batch 1 instead of 8.
PAPER_CPU_MODEL = dict(num_layers=2, d_model=512, num_heads=2, num_kv_heads=2, head_dim=256,
                       mlp_dim=4096)


def build_shape(name: str, model_overrides: dict, batch_size: int | None = None,
                num_devices: int | None = None) -> Shape:
  """A named shape; ``model_overrides`` (e.g. dtype, attention_impl) replace config.model keys."""
  if name == "demo":
    config = demo_config.get_config()
    config.model.image_embedding_init = "random"  # no tokenizer here; speed does not depend on it
    tokens_per_side = config.data.image_size // config.data.patch_pixels
    layout = TokenLayout(text_vocab_size=config.data.text_vocab_size,
                         image_vocab_size=config.vq.codebook_size,
                         text_length=config.data.text_length, image_length=tokens_per_side ** 2)
    shape = Shape(name, config, layout, 10, "configs/demo.py as trained by `make demo`")
  elif name == "tiny":  # configs/demo.py:tiny, for tests of the benchmarks themselves
    config = demo_config.get_config("tiny")
    config.model.image_embedding_init = "random"
    layout = TokenLayout(text_vocab_size=config.data.text_vocab_size,
                         image_vocab_size=config.data.image_codebook_size,
                         text_length=config.data.text_length, image_length=16)
    shape = Shape(name, config, layout, 2, "configs/demo.py:tiny (tests)")
  elif name in ("paper", "paper_cpu"):
    config = medim_liquid7b.get_config()
    note = "configs/medim_liquid7b.py"
    if name == "paper_cpu":
      config.model.update(PAPER_CPU_MODEL)
      config.train.batch_size = 1
      note += (" scaled to a CPU: " + ", ".join(f"{k}={v}" for k, v in PAPER_CPU_MODEL.items())
               + ", batch 1 (paper: 10 layers, d_model 3072, 16 heads, mlp 24576, batch 8)")
    shape = Shape(name, config, PAPER_LAYOUT, 3 if name == "paper_cpu" else 10, note)
  else:
    raise ValueError(f"unknown shape {name!r}; choose from demo, paper, paper_cpu, tiny")
  with shape.config.unlocked():
    shape.config.model.update({k: v for k, v in model_overrides.items() if v is not None})
    if batch_size:
      shape.config.train.batch_size = batch_size
    if num_devices:
      shape.config.mesh.num_devices = num_devices
  return shape


def model_config(shape: Shape) -> transformer.TransformerConfig:
  return train.Model(shape.config, shape.layout).config


def random_batch(layout: TokenLayout, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as the pipeline yields it (no padding: the configs train on padding)."""
  rng = np.random.default_rng(seed)
  tokens = layout.join(rng.integers(0, layout.text_vocab_size, (batch_size, layout.text_length)),
                       rng.integers(0, layout.image_vocab_size, (batch_size, layout.image_length)))
  return {"tokens": tokens, "valid": np.ones(tokens.shape, bool),
          "prompt_length": np.full((batch_size,), 3, np.int32)}


# ---------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(cfg: transformer.TransformerConfig, batch: int, length: int) -> dict[str, int]:
  """Matmul FLOPs of one forward pass over (batch, length) tokens, by part.

  The blocks see the segment markers too (length + #segments positions); the LM head only the
  content positions. Attention is counted in full: every query attends to every key.
  """
  d, heads, kv_heads, head_dim = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  seq = length + len(cfg.segment_lengths)
  projections = 2 * d * (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim * d
  mlp = 3 * 2 * d * cfg.mlp_dim
  attention = 2 * 2 * seq * seq * heads * head_dim            # QK^T and AV, per example
  conditioning = 2 * (cfg.time_frequency_dim * d + d * d) + cfg.num_layers * 2 * d * 6 * d
  return {
      "dense": batch * cfg.num_layers * seq * (projections + mlp),
      "attention": batch * cfg.num_layers * attention,
      "head": batch * length * 2 * d * cfg.vocab_size,
      "conditioning": batch * conditioning,
  }


def train_step_flops(cfg: transformer.TransformerConfig, batch: int, length: int) -> int:
  """Forward + backward: the backward pass computes two matmuls for every forward one."""
  return 3 * sum(forward_flops(cfg, batch, length).values())


def jaxpr_matmul_flops(fn, *args) -> int:
  """FLOPs of every dot_general in ``fn``'s jaxpr (nested calls and scans included; a while loop's
  body counted once): a check of ``forward_flops`` against what the program actually multiplies."""
  def count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
      repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            total += repeat * count(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            total += repeat * count(sub)
    return total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


# ---------------------------------------------------------------------------------------------
# Timing


def time_calls(fn, count: int) -> list[float]:
  """Wall seconds of ``count`` calls; ``fn`` must block until its work is done."""
  times = []
  for _ in range(count):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def time_alternating(fns: dict, rounds: int, calls: int, warmup: int,
                     label: str) -> dict[str, list[float]]:
  """``calls`` timed calls of each function per round, the functions taking turns round by round so
  that a change of load on the machine touches all of them alike. Each turn starts with ``warmup``
  untimed calls (they also let the previous function's idle threads go quiet)."""
  times = {name: [] for name in fns}
  for round_index in range(rounds):
    for name, fn in fns.items():
      time_calls(fn, warmup)
      times[name] += time_calls(fn, calls)
    medians = ", ".join(f"{name} {statistics.median(times[name][-calls:]):.3f} s" for name in fns)
    print(f"  {label} round {round_index + 1}/{rounds}: {medians}", flush=True)
  return times


def summary(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "runs": len(times)}


def on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def measure_matmul_peak(dtype: str, repeats: int) -> dict:
  """TFLOP/s of a square jitted matmul large enough to be compute bound."""
  n = 2048 if on_cpu() else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.dot)
  matmul(a, b).block_until_ready()
  stats = summary(time_calls(lambda: matmul(a, b).block_until_ready(), repeats))
  return {"n": n, "dtype": dtype, **stats, "tflops": 2 * n ** 3 / stats["median_s"] / 1e12}


def torch_matmul_peak(repeats: int) -> dict:
  """The same matmul in torch (float32): how fast the baseline's own BLAS is on this CPU."""
  import torch
  n = 2048
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  stats = summary(time_calls(lambda: a @ b, repeats))
  return {"n": n, "dtype": "float32", **stats, "tflops": 2 * n ** 3 / stats["median_s"] / 1e12}


def known_peak_tflops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in KNOWN_PEAK_TFLOPS.items() if name in kind), None)


# ---------------------------------------------------------------------------------------------
# Training step


class JaxTrainStep:
  """Our training step as the training loop runs it (state donated), blocking after each step."""

  def __init__(self, shape: Shape, seed: int = 0):
    self.trainer = train.Trainer(shape.config, shape.layout)
    self.state = self.trainer.init_state(seed)
    # Host arrays, as the data pipeline yields them: train_step places them on the mesh.
    self.batch = random_batch(shape.layout, shape.config.train.batch_size, seed)
    self.num_params = transformer.count_params(self.state.params)

  def __call__(self):
    self.state, metrics = self.trainer.train_step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))


class TorchTrainStep:
  """The PyTorch baseline's step on the same batch."""

  def __init__(self, shape: Shape, seed: int = 0):
    import torch
    from medim_jax import bench_torch
    self.trainer = bench_torch.TorchTrainer(model_config(shape), shape.layout, shape.config.train,
                                            shape.config.diffusion.eps, seed)
    batch = random_batch(shape.layout, shape.config.train.batch_size, seed)
    self.tokens = torch.from_numpy(batch["tokens"]).long()
    self.valid = torch.from_numpy(batch["valid"])
    self.num_params = bench_torch.count_params(self.trainer.model)

  def __call__(self):
    self.trainer.train_step(self.tokens, self.valid)


def bench_train(shape: Shape, with_torch: bool, rounds: int, steps: int | None, warmup: int,
                peak_tflops: float | None) -> dict:
  """Our step (and the torch baseline's) timed in alternating rounds; medians over all rounds."""
  steps = steps or shape.timed_steps
  batch_size, length = shape.config.train.batch_size, shape.layout.seq_length
  flops = train_step_flops(model_config(shape), batch_size, length)
  frameworks = {"jax": JaxTrainStep(shape)}
  start = time.perf_counter()
  frameworks["jax"]()  # compiles
  compile_s = time.perf_counter() - start
  if with_torch:
    frameworks["torch"] = TorchTrainStep(shape)
  times = time_alternating(frameworks, rounds, steps, warmup, f"{shape.name} train step")

  result = {"shape": shape.name, "note": shape.note, "batch_size": batch_size, "seq_length": length,
            "dtype": shape.config.model.dtype, "model_flops_per_step": flops,
            "forward_flops_by_part": forward_flops(model_config(shape), batch_size, length),
            "jax_compile_s": compile_s, "peak_tflops": peak_tflops}
  for name, step in frameworks.items():
    stats = summary(times[name])
    tflops = flops / stats["median_s"] / 1e12
    result[name] = {"params": step.num_params, **stats,
                    "tokens_per_s": batch_size * length / stats["median_s"], "tflops": tflops,
                    "fraction_of_peak": tflops / peak_tflops if peak_tflops else None}
  if with_torch:
    result["jax_speedup_over_torch"] = result["torch"]["median_s"] / result["jax"]["median_s"]
  return result


# ---------------------------------------------------------------------------------------------
# Sampler


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
    self.step = jax.jit(self._step, static_argnames=("segment_steps",)) if jit_step else self._step

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
    for step in range(max(segment_steps)):
      # The step as an int32 array, as in the jitted loop, so that t is computed the same way.
      x = self.step(params, x, generate, initial_masked, fractions, example_ids, jnp.asarray(seed),
                    jnp.asarray(step, jnp.int32), segment_steps=segment_steps)
    if bool(jnp.any(x == layout.mask_id)):
      raise RuntimeError("tokens left masked after the last step (the confidence sampler reveals "
                         "every one)")
    return np.asarray(x)

  def _step(self, params, x, generate, initial_masked, fractions, example_ids, seed, step, *,
            segment_steps):
    """One iteration of ``Sampler._sample``'s loop body (confidence strategy), tokens only."""
    cfg, layout, sampler = self.config, self.layout, self.sampler
    batch, length = x.shape
    num_steps = max(segment_steps)
    t = jnp.full((batch,), 1.0 - step / num_steps * (1.0 - cfg.final_t), jnp.float32)
    masked = x == layout.mask_id
    log_probs, _ = sampler._guided_log_probs(params, x, ~generate, sampler._sigma(x, generate, t), t)
    keys = sampler_lib.example_keys(seed, example_ids, step)
    draw_keys, noise_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
    sampled = jax.vmap(jax.random.categorical)(draw_keys[:, 0], log_probs)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (length,)))(noise_keys[:, 0])
    chosen = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]
    confidence = chosen + cfg.gumbel_scale * t[:, None] * noise
    modality = jnp.asarray(layout.modality())
    reveal = jnp.zeros_like(masked)
    for seg, seg_mask in enumerate((modality == TEXT, modality == IMAGE)):
      if segment_steps[seg] == 0:
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


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
  info = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "devices": jax.device_count(), "cpu_count": os.cpu_count(), "processor": cpu_model(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "versions": card.package_versions(("jax", "jaxlib", "flax", "optax", "numpy", "torch"))}
  return info


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
  line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  print(f"\n{title}")
  print(line(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in rows:
    print(line(row))


def print_peak(peak: dict) -> None:
  rows = [[name, f"{p['n']}x{p['n']} {p['dtype']}", f"{p['median_s'] * 1e3:.1f}", f"{p['tflops']:.3f}"]
          for name, p in peak.items() if isinstance(p, dict)]
  print_table("Matmul peak (median)", ["framework", "matmul", "ms", "TFLOP/s"], rows)


def out_of_memory_as_result(shape_name: str, bench) -> dict:
  """Runs one shape's benchmark; a shape the device cannot hold is a result (the others still run)."""
  try:
    return bench()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    message = str(error).splitlines()[0]
    print(f"  {shape_name}: does not fit on this device ({message})", flush=True)
    return {"shape": shape_name, "error": f"out of memory: {message}"}


def print_train(results: list[dict]) -> None:
  rows = []
  for r in results:
    if "error" in r:
      rows.append([r["shape"], "jax", "-", "-", "-", r["error"][:60], "", "", "", "", ""])
      continue
    for name in ("jax", "torch"):
      if name in r:
        m = r[name]
        peak = f"{m['fraction_of_peak'] * 100:.1f}%" if m["fraction_of_peak"] else "-"
        speedup = f"{r['jax_speedup_over_torch']:.2f}x" if name == "jax" and "torch" in r else ""
        rows.append([r["shape"], name, f"{m['params']:,}", f"{r['batch_size']}x{r['seq_length']}",
                     r["dtype"], f"{m['median_s'] * 1e3:.1f}", f"{m['min_s'] * 1e3:.1f}",
                     f"{m['tokens_per_s']:,.0f}", f"{m['tflops']:.4f}", peak, speedup])
  print_table("Training step (median over all timed steps; tokens/s and TFLOP/s from the median)",
              ["shape", "framework", "params", "batch x len", "dtype", "ms/step", "min ms",
               "tokens/s", "TFLOP/s", "of peak", "JAX/torch speed"], rows)
  for r in results:
    if "error" in r:
      continue
    print(f"  {r['shape']}: {r['model_flops_per_step'] / 1e9:.2f} GFLOP per step, JAX compile "
          f"{r['jax_compile_s']:.1f} s; {r['note']}")


def print_sampler(r: dict) -> None:
  rows = []
  for name in ("jitted", "python_loop", "python_loop_jitted_step"):
    if name not in r:
      continue
    m = r[name]
    peak = f"{m['fraction_of_peak'] * 100:.1f}%" if m["fraction_of_peak"] else "-"
    rows.append([name, f"{m['median_s']:.2f}", f"{m['min_s']:.2f}", f"{m['s_per_pair']:.3f}",
                 f"{m['tflops']:.4f}", peak, f"{m.get('jitted_speedup', 1.0):.2f}x",
                 f"{m.get('same_tokens_as_jitted', 1.0):.3f}"])
  print_table(f"Sampler, {r['shape']} {r['dtype']}: joint task, {r['steps']} steps, CFG "
              f"{r['cfg_scale']} ({r['strategy']}), {r['batch_size']} pairs per call, model batch "
              f"{r['model_batch']}x{r['seq_length']} (median of {r['jitted']['runs']} calls)",
              ["method", "s/call", "min s", "s/pair", "TFLOP/s", "of peak", "jitted speedup",
               "same tokens"],
              rows)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m medim_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--what", default=None,
                      help=f"comma list of {', '.join(WHAT)} (default: all on CPU; no torch on an "
                           "accelerator: the baseline is CPU PyTorch)")
  parser.add_argument("--shapes", default=None,
                      help="train shapes: demo, paper, paper_cpu (default: demo,paper_cpu on CPU, "
                           "demo,paper elsewhere)")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed train steps per framework and round (default: 10, paper_cpu 3)")
  parser.add_argument("--rounds", type=int, default=3, help="alternating JAX/torch rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each round")
  parser.add_argument("--batch_size", type=int, default=None, help="train batch (default: config's)")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--attention_impl", default=None, choices=transformer.ATTENTION_IMPLS,
                      help="config.model.attention_impl (default: the config's)")
  parser.add_argument("--remat_policy", default=None,
                      choices=("none", *transformer.REMAT_POLICIES),
                      help="config.model.remat_policy, to fit the paper shape on an accelerator")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak for MFU (default: known dense bf16 peak on GPU, measured on CPU)")
  parser.add_argument("--peak_repeats", type=int, default=10)
  parser.add_argument("--sample_shape", default="demo", help="shape of the sampler benchmark")
  parser.add_argument("--sample_steps", type=int, default=128)
  parser.add_argument("--sample_batch", type=int, default=4, help="pairs per sampler call")
  parser.add_argument("--repeats", type=int, default=3, help="timed sampler calls per method")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="split the CPU into this many JAX devices and the train batch over them "
                           "(data parallel, config.mesh.num_devices); default: one device")
  parser.add_argument("--out", default=None, help="write the results as JSON to this file")
  args = parser.parse_args(argv)
  if args.cpu_devices:  # before anything below asks for the devices
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  default_what = WHAT if on_cpu() else tuple(w for w in WHAT if w != "torch")
  args.what = [w.strip() for w in (args.what or ",".join(default_what)).split(",") if w.strip()]
  unknown = set(args.what) - set(WHAT)
  if unknown:
    parser.error(f"--what: unknown {sorted(unknown)}; choose from {WHAT}")
  default_shapes = "demo,paper_cpu" if on_cpu() else "demo,paper"
  args.shapes = [s.strip() for s in (args.shapes or default_shapes).split(",") if s.strip()]
  args.dtype = args.dtype or ("float32" if on_cpu() else "bfloat16")
  return args


def setup_torch(threads: int) -> None:
  try:
    import torch
  except ImportError:
    sys.exit("--what torch needs PyTorch: pip install torch==2.13.0 (the CPU wheel)")
  torch.set_num_threads(threads)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if "torch" in args.what:
    if not on_cpu():
      sys.exit("--what torch: the PyTorch baseline runs on the CPU only; leave it out here")
    setup_torch(args.torch_threads)
  results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": "python -m medim_jax.bench " + " ".join(sys.argv[1:] if argv is None else argv),
             "machine": machine(), "args": {k: v for k, v in vars(args).items()}}
  if "torch" in args.what:
    results["machine"]["torch_threads"] = args.torch_threads
  print(f"{results['machine']['processor']} ({results['machine']['cpu_count']} cores), "
        f"backend {results['machine']['backend']}: {results['machine']['device']}", flush=True)

  peak_tflops = args.peak_tflops or (None if on_cpu() else known_peak_tflops())
  if "peak" in args.what or (("train" in args.what or "torch" in args.what) and not peak_tflops):
    results["peak"] = {"jax": measure_matmul_peak("float32" if on_cpu() else args.dtype,
                                                  args.peak_repeats)}
    if "torch" in args.what and on_cpu():
      results["peak"]["torch"] = torch_matmul_peak(args.peak_repeats)
    print_peak(results["peak"])
    peak_tflops = peak_tflops or results["peak"]["jax"]["tflops"]
  results["peak_tflops_for_fraction"] = peak_tflops
  model_overrides = dict(dtype=args.dtype, attention_impl=args.attention_impl,
                         remat_policy=args.remat_policy)

  if "train" in args.what or "torch" in args.what:
    results["train"] = []
    for name in args.shapes:
      shape = build_shape(name, model_overrides, args.batch_size, args.cpu_devices)
      print(f"Training step, {name}", flush=True)
      results["train"].append(out_of_memory_as_result(name, lambda: bench_train(
          shape, "torch" in args.what, args.rounds, args.steps, args.warmup, peak_tflops)))
    print_train(results["train"])

  if "sampler" in args.what:
    print(f"Sampler, {args.sample_shape}", flush=True)
    shape = build_shape(args.sample_shape, model_overrides)
    results["sampler"] = bench_sampler(shape, args.sample_steps, args.sample_batch, args.repeats,
                                       peak_tflops)
    print_sampler(results["sampler"])

  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"\nResults written to {args.out}")
  return results


if __name__ == "__main__":
  main()
