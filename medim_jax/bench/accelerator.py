"""One prepared accelerator benchmark: everything a lent GPU should measure, in minutes, in one run.

``launch/bench_gpu.sh`` runs ``python -m medim_jax.bench.accelerator --out DIR`` and writes
``DIR/bench_accelerator.json`` and ``DIR/bench_accelerator.md``:

1. the matmul peak (8192^3 bf16 on a GPU);
2. the demo training step (configs/demo.py's model and batch);
3. the paper training step at the largest batch that fits: each candidate batch is compiled (not
   run) and its compiled memory (arguments + outputs + temporaries) compared with the device's
   memory, so finding the batch costs compiles, never an out-of-memory crash; then that batch is
   timed, with MFU against the card's dense bf16 peak;
4. the same step with cuDNN attention (``attention_impl=jax_dot_product``) against einsum attention;
5. the jitted sampler at the paper shape (joint task, CFG).

Every part that fails (out of memory, a kernel the device lacks) is written as a result and the
rest goes on. ``--shapes tiny`` runs the same plan on configs/demo.py:tiny shapes, which is how the
tests check it end to end on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax

from medim_jax.bench import sampler_loop, shapes as shape_lib, timing
from medim_jax.training import train

SHAPE_SETS = {
    # (demo shape, paper shape, candidate paper batches, sampler steps)
    "gpu": ("demo", "paper", (32, 16, 8, 4, 2, 1), 32),
    "tiny": ("tiny", "tiny", (8, 4), 3),  # batch 8 = the demo step: one program, compiled once
}


def compiled_bytes(shape: shape_lib.Shape) -> int | None:
  """Per-device memory of the compiled train step (as ``python -m medim_jax.aot`` counts it);
  None where the backend gives no memory analysis."""
  from medim_jax import aot
  trainer = train.Trainer(shape.config, shape.layout)
  batch = aot.abstract_batch(shape.layout, shape.config.train.batch_size, trainer.mesh)
  with jax.set_mesh(trainer.mesh):
    compiled = trainer._jit_train_step.lower(trainer.abstract_state(), batch).compile()
  return aot.memory_from(compiled)["total"] if compiled.memory_analysis() is not None else None


def device_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def largest_fitting_batch(name: str, overrides: dict, candidates, limit: int | None,
                          mu_dtype: str) -> tuple[int, list[dict]]:
  """The largest candidate batch whose compiled step fits ``limit`` bytes (without a limit: the
  first candidate), and what each compile said."""
  tried = []
  for batch_size in candidates:
    shape = paper_shape(name, overrides, batch_size, mu_dtype)
    needed = compiled_bytes(shape)
    tried.append({"batch_size": batch_size, "compiled_bytes": needed, "limit_bytes": limit})
    print(f"  batch {batch_size}: {needed / 2**30 if needed else float('nan'):.2f} GiB compiled "
          f"(limit {limit / 2**30 if limit else float('nan'):.2f} GiB)", flush=True)
    if limit is None or needed is None or needed <= 0.95 * limit:
      return batch_size, tried
  return candidates[-1], tried


def paper_shape(name: str, overrides: dict, batch_size: int, mu_dtype: str) -> shape_lib.Shape:
  shape = shape_lib.build_shape(name, overrides, batch_size)
  with shape.config.unlocked():
    shape.config.train.mu_dtype = mu_dtype
  return shape


def run(shapes: str, out_dir: str, dtype: str, remat_policy: str, mu_dtype: str, rounds: int,
        steps: int, peak_tflops: float | None) -> dict:
  demo_name, paper_name, candidates, sample_steps = SHAPE_SETS[shapes]
  results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "command": "python -m medim_jax.bench.accelerator " + " ".join(sys.argv[1:]),
             "machine": timing.machine(), "parts": {}}
  parts = results["parts"]
  start = time.perf_counter()

  def part(name, fn):
    print(f"{name} ...", flush=True)
    begun = time.perf_counter()
    try:
      parts[name] = timing.out_of_memory_as_result(name, fn)
    except Exception as error:  # a kernel the device lacks: a result, the rest still runs
      parts[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    parts[name]["seconds"] = round(time.perf_counter() - begun, 1)
    print(f"  {name}: {parts[name]['seconds']} s", flush=True)

  part("peak", lambda: timing.measure_matmul_peak("float32" if timing.on_cpu() else dtype, 10))
  peak = peak_tflops or timing.known_peak_tflops() or parts["peak"].get("tflops")
  results["peak_tflops_for_mfu"] = peak
  model = dict(dtype=dtype)
  part("demo train step", lambda: timing.bench_train(
      shape_lib.build_shape(demo_name, model), False, rounds, steps, 1, peak))

  paper = dict(model, remat_policy=remat_policy)
  batch, tried = largest_fitting_batch(paper_name, paper, candidates, device_memory_bytes(), mu_dtype)
  results["paper_batch_search"] = tried
  for impl in ("xla", "jax_dot_product"):
    part(f"paper train step, attention {impl}", lambda: timing.bench_train(
        paper_shape(paper_name, dict(paper, attention_impl=impl), batch, mu_dtype), False, rounds,
        steps, 1, peak))
  part("paper sampler", lambda: sampler_loop.bench_sampler(
      shape_lib.build_shape(paper_name, dict(model, attention_impl="jax_dot_product")), sample_steps,
      2, 2, peak, python_loops=False))
  results["seconds"] = round(time.perf_counter() - start, 1)

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "bench_accelerator.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  markdown = markdown_table(results)
  with open(os.path.join(out_dir, "bench_accelerator.md"), "w") as f:
    f.write(markdown)
  print(markdown)
  return results


def markdown_table(results: dict) -> str:
  machine = results["machine"]
  lines = [f"Machine: {machine['device']} x {machine['devices']} ({machine['backend']}), "
           f"{machine['processor']}; jax {machine['versions'].get('jax')}; {results['date']}; "
           f"{results['seconds']} s in all. MFU against {results['peak_tflops_for_mfu']} TFLOP/s.",
           "", "| measurement | result |", "|---|---|"]
  for name, r in results["parts"].items():
    if "error" in r:
      lines.append(f"| {name} | {r['error']} |")
    elif name == "peak":
      lines.append(f"| matmul peak, {r['n']}^3 {r['dtype']} | {r['median_s'] * 1e3:.2f} ms, "
                   f"{r['tflops']:.1f} TFLOP/s |")
    elif "sampler" in name:
      j = r["jitted"]
      lines.append(f"| {name}: joint, {r['steps']} steps, CFG {r['cfg_scale']}, {r['batch_size']} "
                   f"pairs | {j['median_s']:.3f} s per call, {j['s_per_pair']:.3f} s per pair |")
    else:
      j = r["jax"]
      mfu = f", MFU {j['fraction_of_peak'] * 100:.1f}%" if j.get("fraction_of_peak") else ""
      lines.append(f"| {name}: batch {r['batch_size']} x {r['seq_length']}, {r['dtype']} | "
                   f"{j['median_s'] * 1e3:.1f} ms per step, {j['tokens_per_s']:,.0f} tokens/s, "
                   f"{j['tflops']:.2f} TFLOP/s{mfu} |")
  for tried in results.get("paper_batch_search", []):
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "n/a"
    lines.append(f"| paper step compiled at batch {tried['batch_size']} | "
                 f"{gib(tried['compiled_bytes'])} of {gib(tried['limit_bytes'])} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m medim_jax.bench.accelerator", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder for bench_accelerator.json / .md")
  parser.add_argument("--shapes", default="gpu", choices=sorted(SHAPE_SETS))
  parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 off CPU)")
  parser.add_argument("--remat_policy", default="full", help="the paper step's remat policy")
  parser.add_argument("--mu_dtype", default="bfloat16", help="Adam first moment of the paper step")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--peak_tflops", type=float, default=None)
  args = parser.parse_args(argv)
  dtype = args.dtype or ("float32" if timing.on_cpu() else "bfloat16")
  return run(args.shapes, args.out, dtype, args.remat_policy, args.mu_dtype, args.rounds,
             args.steps, args.peak_tflops)


if __name__ == "__main__":
  main()
