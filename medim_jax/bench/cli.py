"""``python -m medim_jax.bench``: run the benchmarks the command line asks for and print their tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax

from medim_jax.bench.sampler_loop import bench_condition_cache, bench_sampler
from medim_jax.bench.shapes import build_shape
from medim_jax.bench.timing import (bench_train, known_peak_tflops, machine, measure_matmul_peak,
                                    on_cpu, out_of_memory_as_result, torch_matmul_peak)
from medim_jax.models import transformer

WHAT = ("peak", "train", "torch", "sampler", "sampler_cache")


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


def print_condition_cache(r: dict) -> None:
  for task, methods in r["tasks"].items():
    rows = [[name, f"{m['median_s']:.2f}", f"{m['min_s']:.2f}", f"{m['speedup']:.2f}x",
             f"{m['same_tokens_as_uncached']:.3f}"] for name, m in methods.items()]
    print_table(f"Condition cache, {r['shape']} {r['dtype']}: {task}, {r['steps']} confidence steps, "
                f"CFG {r['cfg_scale']}, batch {r['batch_size']} x {r['seq_length']}, random weights "
                f"(median of {next(iter(methods.values()))['runs']} calls)",
                ["refresh", "s/call", "min s", "speedup", "same tokens as uncached"], rows)


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
  parser.add_argument("--activation_dtype", default="", choices=("", "float32", "bfloat16"),
                      help="config.model.activation_dtype ('' = --dtype): float32 with --dtype "
                           "bfloat16 keeps only the matmul operands in bfloat16")
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
  parser.add_argument("--cache_refresh", default="1,2,4,8",
                      help="sampler_cache: comma list of refresh intervals K to time beside no cache")
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
  try:
    args.cache_refresh = [int(k) for k in args.cache_refresh.split(",") if k.strip()]
  except ValueError:
    parser.error(f"--cache_refresh: {args.cache_refresh!r} is not a comma list of integers")
  if any(k < 1 for k in args.cache_refresh):
    parser.error("--cache_refresh: every interval must be >= 1 (no cache is always timed)")
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
    # At the compute dtype: a CPU with AMX or AVX512-BF16 multiplies bfloat16 several times faster.
    results["peak"] = {"jax": measure_matmul_peak(args.dtype, args.peak_repeats)}
    if "torch" in args.what and on_cpu():
      results["peak"]["torch"] = torch_matmul_peak(args.peak_repeats, args.dtype)
    print_peak(results["peak"])
    peak_tflops = peak_tflops or results["peak"]["jax"]["tflops"]
  results["peak_tflops_for_fraction"] = peak_tflops
  model_overrides = dict(dtype=args.dtype, activation_dtype=args.activation_dtype,
                         attention_impl=args.attention_impl,
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

  if "sampler_cache" in args.what:
    print(f"Condition cache, {args.sample_shape}", flush=True)
    shape = build_shape(args.sample_shape, model_overrides)
    results["sampler_cache"] = bench_condition_cache(shape, args.sample_steps, args.sample_batch,
                                                     args.repeats, [0] + args.cache_refresh)
    print_condition_cache(results["sampler_cache"])

  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"\nResults written to {args.out}")
  return results


if __name__ == "__main__":
  main()
