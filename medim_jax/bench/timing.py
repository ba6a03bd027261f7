"""Timing: alternating rounds, the matmul peak, and the training step of JAX and of the PyTorch
twin (bench/torch_twin.py) on the same batch."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from medim_jax.bench.shapes import Shape, forward_flops
from medim_jax.bench.shapes import model_config, random_batch, train_step_flops
from medim_jax.evaluation import card
from medim_jax.models import layers, transformer
from medim_jax.training import train

# Dense bf16 peaks (TFLOP/s, no sparsity) by a substring of jax's device_kind.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


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
  # A low-precision peak is the rate of the form the model uses (models/layers.py: float32
  # accumulation and output), which on XLA:CPU is the one that runs on the CPU's bf16 units.
  accumulate = jnp.float32 if layers.is_low_precision(dtype) else None
  matmul = jax.jit(functools.partial(jnp.dot, preferred_element_type=accumulate))
  matmul(a, b).block_until_ready()
  stats = summary(time_calls(lambda: matmul(a, b).block_until_ready(), repeats))
  return {"n": n, "dtype": dtype, **stats, "tflops": 2 * n ** 3 / stats["median_s"] / 1e12}


def torch_matmul_peak(repeats: int, dtype: str = "float32") -> dict:
  """The same matmul in torch: how fast the baseline's own BLAS is on this CPU."""
  import torch
  n = 2048
  a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
  a @ b
  stats = summary(time_calls(lambda: a @ b, repeats))
  return {"n": n, "dtype": dtype, **stats, "tflops": 2 * n ** 3 / stats["median_s"] / 1e12}


def dtype_label(model_config) -> str:
  """"bfloat16", or "bfloat16, float32 activations" where the residual stream's dtype differs."""
  activations = model_config.get("activation_dtype", "") or model_config.dtype
  return model_config.dtype + ("" if activations == model_config.dtype else f", {activations} activations")


def known_peak_tflops() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in KNOWN_PEAK_TFLOPS.items() if name in kind), None)


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
    from medim_jax.bench import torch_twin
    self.trainer = torch_twin.TorchTrainer(model_config(shape), shape.layout, shape.config.train,
                                            shape.config.diffusion.eps, seed)
    batch = random_batch(shape.layout, shape.config.train.batch_size, seed)
    self.tokens = torch.from_numpy(batch["tokens"]).long()
    self.valid = torch.from_numpy(batch["valid"])
    self.num_params = torch_twin.count_params(self.trainer.model)

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
            "dtype": dtype_label(shape.config.model), "model_flops_per_step": flops,
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
