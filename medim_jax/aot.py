"""Ahead-of-time compile of the training step for a target topology, on a host that has none of it.

  python -m medim_jax.aot --config configs/tpu_v5p.py:v5p-16 --topology v5p-16 --libtpu PATH
  python -m medim_jax.aot --config configs/gpu_8x.py --topology h100-8
  python -m medim_jax.aot --config configs/medim_liquid7b.py --cpu_devices 8

As MaxText's train_compile.py: the state and the batch exist only as shapes carrying their target
shardings (``Trainer.abstract_state``), so nothing is allocated; XLA partitions and compiles the
step for the target's devices and says what each device would hold. The report compares that with
an analytic estimate of the state alone. A config that does not fit the device's memory ends with
one ``error:`` line, before anyone pays for a slice.

Targets:
  v4-N, v5p-N, v5e-N, v6e-N  TPU slices, compiled by libtpu for the real chips (compile-only devices
      of ``jax.experimental.topologies``). libtpu must match jax (jax 0.10.2 wants libtpu 0.0.42.*).
      Installed into the project's environment it makes every jax program on a machine without TPUs
      print TPU start-up errors, so keep it apart and point at it:
        pip install --no-deps --target .venv/libtpu-aot "libtpu==0.0.42.*"
        python -m medim_jax.aot ... --libtpu .venv/libtpu-aot/libtpu/libtpu.so
  a100-N, h100-N, h200-N, or no --topology  N fake CPU devices stand in for the accelerators (the
      largest target jax compiles for here without the target's compiler). The partitioning and the
      state per device are the target's; XLA:CPU's fusion and buffer assignment are not XLA:GPU's,
      so temporaries are indicative only.

Token layout (--layout): auto, gemma (Liquid's 256,000 text ids), llama2 (the original's 32,003), config
(config.data's tokenizer sizes) or shards (read from the tokenized shards: what training will see);
--text_vocab_size replaces the text vocabulary of any of them.

Memory limits are the vendors' HBM sizes (--device_memory_gib overrides). On GPU, JAX preallocates
75% of that unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (launch/slurm_gpu.sbatch sets it).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import numpy as np

from medim_jax import errors
from medim_jax.parallel.topologies import Target, parse_target, target_devices
from medim_jax.tokenizers.vocab import TokenLayout

GIB = 1024 ** 3

# The original's token space (shared/docs/REFERENCE.md): Llama-2's 32,000 ids + <boi> <eoi> <eos>.
LLAMA2_TEXT_VOCAB = 32_003
# Liquid_V1_7B's text ids: Gemma's tokenizer, followed in its embedding by the 8,192 VQ codes.
GEMMA_TEXT_VOCAB = 256_000
CHAMELEON_CODEBOOK = 8_192
CHAMELEON_DOWNSAMPLE = 16  # 512 px -> 32 x 32 = 1,024 image tokens

LAYOUTS = ("auto", "gemma", "llama2", "config", "shards")

_FIT_HINT = ("use more devices (fsdp), a smaller config.train.batch_size, "
             "config.model.remat_policy=full with config.model.scan_layers=True, or a smaller "
             "optimizer state (config.train.mu_dtype=bfloat16, config.train.second_moment=factored; "
             "configs/gpu_1x.py uses all of these)")


# ------------------------------------------------------------------------------------------------
# Token layout


def layout_for(config, choice: str = "auto") -> TokenLayout:
  """The token layout the step is compiled for (training reads it from the shards' tokenizers).

  gemma: Liquid_V1_7B's Gemma text ids (256,000), MASK, the 8,192 Chameleon VQ codes, and
    (image_size / 16)^2 image tokens (512 px -> 1,024). llama2: the original MeDiM's 32,003 text ids
    with the same image side. config: config.data's own tokenizer sizes (text_vocab_size, the VQ or
    patch codebook, image_size / downsampling). shards: exactly what training will read, from the
    tokenized shards in data.shards_dir (their tokenizers are loaded). auto: gemma for a config that
    loads Liquid's image rows (model.pretrained_image_token_offset >= 0, as
    configs/medim_liquid7b.py), else config.
  """
  data = config.data
  if choice == "auto":
    choice = "gemma" if config.model.pretrained_image_token_offset >= 0 else "config"
  if choice == "shards":
    if not data.shards_dir:
      raise errors.InputError("--layout shards reads config.data.shards_dir, which is empty")
    from medim_jax.data import pipeline, tokenize
    return pipeline.ShardDataset(tokenize.shards_dirs(config, ".")).layout
  if choice in ("gemma", "llama2"):
    text_vocab = GEMMA_TEXT_VOCAB if choice == "gemma" else LLAMA2_TEXT_VOCAB
    side = data.image_size // CHAMELEON_DOWNSAMPLE
    return TokenLayout(text_vocab, CHAMELEON_CODEBOOK, data.text_length, side * side)
  if choice != "config":
    raise errors.InputError(f"--layout {choice!r}: choose from {', '.join(LAYOUTS)}")
  if data.image_tokenizer == "vq":
    codebook, pixels_per_token = config.vq.codebook_size, 2 ** (len(config.vq.channel_mult) - 1)
  else:
    codebook, pixels_per_token = data.image_codebook_size, data.patch_pixels
  side = data.image_size // pixels_per_token
  return TokenLayout(data.text_vocab_size, codebook, data.text_length, side * side)


# ------------------------------------------------------------------------------------------------
# Compilation and the report


def abstract_batch(layout: TokenLayout, batch_size: int, mesh, num_findings: int = 0) -> dict:
  """What the data pipeline yields (with finding labels for a finding head), as shapes split over
  the mesh's batch axes."""
  from medim_jax.parallel import sharding
  split = sharding.batch_sharding(mesh)
  rows, length = batch_size, layout.seq_length
  shapes = {"tokens": ((rows, length), np.int32), "valid": ((rows, length), np.bool_),
            "prompt_length": ((rows,), np.int32), "example_id": ((rows,), np.int32)}
  if num_findings:
    shapes.update(finding_labels=((rows, num_findings), np.float32),
                  finding_known=((rows,), np.bool_))
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
          for key, (shape, dtype) in shapes.items()}


def state_copies(config) -> dict[str, float]:
  """f32 copies of the parameters the train state holds: params, Adam's two moments (a bfloat16
  first moment is half a copy; a factored second moment's row and column statistics are none),
  EMA if on."""
  first = 0.5 if config.train.get("mu_dtype") == "bfloat16" else 1
  second = 0 if config.train.get("second_moment", "full") == "factored" else 1
  copies = {"params": 1, "adam_moments": first + second}
  if config.train.ema_decay > 0:
    copies["ema"] = 1
  return copies


def analytic_state_bytes(num_params: int, config, mesh) -> float:
  """Per device, with every parameter split evenly over fsdp x tensor (the ideal the rules aim at)."""
  shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
  return 4 * num_params * sum(state_copies(config).values()) / shards


def sharded_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (replicated parts whole)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Report:
  target: Target
  mesh_shape: dict[str, int]
  layout: TokenLayout
  batch_size: int
  num_params: int
  compile_seconds: float
  memory: dict[str, int]            # XLA's per-device buffer sizes, bytes
  analytic_state_bytes: float       # per device, even split over fsdp x tensor
  sharded_state_bytes: int          # per device, as config.mesh.rules place it
  batch_bytes: int                  # per device
  state_copies: dict[str, int]
  flops_per_device: float | None    # XLA's cost analysis, None where the backend gives none
  device_memory_gib: float          # 0: no limit known

  @property
  def total_bytes(self) -> int:
    return self.memory["total"]

  @property
  def fits(self) -> bool:
    return not self.device_memory_gib or self.total_bytes <= self.device_memory_gib * GIB


def memory_from(compiled) -> dict[str, int]:
  """Per-device bytes from XLA's buffer assignment. Donated state buffers are reused for the new
  state (``aliased``), so the peak is arguments + outputs - aliased + temporaries + code."""
  stats = compiled.memory_analysis()
  memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "generated_code": stats.generated_code_size_in_bytes}
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"] + memory["generated_code"])
  return memory


def flops_from(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it; the report says so
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def compile_train_step(config, layout: TokenLayout, target: Target, devices,
                       device_memory_gib: float = 0.0) -> tuple[Report, object]:
  """Lower and compile Trainer's jitted step for ``devices``; nothing is allocated on them."""
  from medim_jax.models import transformer
  from medim_jax.training import train
  num_findings = len(transformer.finding_names(config.model))
  trainer = train.Trainer(config, layout, devices=devices, finding_positive_weight=(
      np.ones(num_findings, np.float32) if num_findings else None))
  state = trainer.abstract_state()
  batch = abstract_batch(layout, config.train.batch_size, trainer.mesh, num_findings)
  start = time.perf_counter()
  try:
    compiled = trainer._jit_train_step.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    # libtpu refuses to compile a step that cannot fit the chip's HBM: the answer we came for.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    raise errors.InputError(
        f"the train step does not fit {target.describe()} (XLA: {message}); {_FIT_HINT}") from None
  seconds = time.perf_counter() - start
  num_params = transformer.count_params(trainer.model.abstract_params)
  report = Report(
      target=target, mesh_shape=dict(trainer.mesh.shape), layout=layout,
      batch_size=config.train.batch_size, num_params=num_params, compile_seconds=seconds,
      memory=memory_from(compiled),
      analytic_state_bytes=analytic_state_bytes(num_params, config, trainer.mesh),
      sharded_state_bytes=sharded_bytes(state), batch_bytes=sharded_bytes(batch),
      state_copies=state_copies(config), flops_per_device=flops_from(compiled),
      device_memory_gib=device_memory_gib or target.device_memory_gib)
  return report, compiled


def format_report(report: Report) -> str:
  # GiB for real models; MiB for the tiny ones of tests, whose sizes would all read 0.00 GiB.
  unit, scale = ("GiB", GIB) if report.total_bytes >= GIB / 4 else ("MiB", 1024 ** 2)
  gib = lambda n: f"{n / scale:8.2f}"
  layout, mesh = report.layout, report.mesh_shape
  shards = mesh["fsdp"] * mesh["tensor"]
  copies = " + ".join(f"{n:g} {name}" if n != 1 else name for name, n in report.state_copies.items())
  batch_shards = mesh["data"] * mesh["fsdp"]
  lines = [
      f"target: {report.target.describe()}",
      f"mesh: data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}; global batch "
      f"{report.batch_size} ({report.batch_size / batch_shards:g} per data x fsdp shard)",
      f"layout: {layout.text_length} text + {layout.image_length} image tokens; vocabulary "
      f"{layout.vocab_size:,} (text {layout.text_vocab_size:,} | MASK | {layout.image_vocab_size:,} "
      "image codes)",
      f"parameters: {report.num_params:,}",
      f"compile: {report.compile_seconds:.1f} s",
      "",
      f"per-device memory from the compiled step (XLA buffer assignment)      {unit}",
      f"  arguments (train state + batch shard)                          {gib(report.memory['arguments'])}",
      f"  outputs (new state + metrics)                                  {gib(report.memory['outputs'])}",
      f"  aliased (donated state buffers reused for the outputs)         {gib(report.memory['aliased'])}",
      f"  temporaries (activations, gradients, optimizer scratch)        {gib(report.memory['temporaries'])}",
      f"  generated code                                                 {gib(report.memory['generated_code'])}",
      f"  total (arguments + outputs - aliased + temporaries + code)     {gib(report.total_bytes)}",
      "",
      f"analytic train state per device: 4 B x {report.num_params:,} x ({copies}) / "
      f"(fsdp {mesh['fsdp']} x tensor {mesh['tensor']} = {shards})",
      f"  even split                                                     {gib(report.analytic_state_bytes)}",
      f"  as config.mesh.rules shard it (undivided dimensions whole)     {gib(report.sharded_state_bytes)}",
      f"  batch shard                                                    {gib(report.batch_bytes)}",
  ]
  if report.flops_per_device is not None:
    total = report.flops_per_device * report.target.num_devices
    tokens = report.batch_size * layout.seq_length
    lines.append(f"FLOPs per step (XLA cost analysis): {report.flops_per_device:.4g} per device, "
                 f"{total:.4g} on all {report.target.num_devices} ({total / tokens:.4g} per token)")
  else:
    lines.append("FLOPs: this backend's compiled step has no cost analysis")
  if report.device_memory_gib:
    verdict = "fits" if report.fits else "DOES NOT FIT"
    lines.append(f"device memory {report.device_memory_gib:g} GiB: {verdict} "
                 f"({_size(report.total_bytes)} needed per device)")
  else:
    lines.append("device memory: no limit known for this target (pass --device_memory_gib)")
  return "\n".join(lines)


def _size(num_bytes: float) -> str:
  return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 1024 ** 2:.2f} MiB"


def check_fits(report: Report, config_name: str) -> None:
  if report.fits:
    return
  raise errors.InputError(
      f"{config_name} does not fit {report.target.describe()}: the train step needs "
      f"{_size(report.total_bytes)} per device, the device has {report.device_memory_gib:g} GiB; "
      f"{_FIT_HINT}")


# ------------------------------------------------------------------------------------------------
# Command line


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("topology", "", "v5p-16, v5e-32, v4-8, h100-8, ...; empty: --cpu_devices "
                      "fake CPU devices.")
  flags.DEFINE_integer("cpu_devices", 8, "Fake CPU devices to compile for without a TPU topology.")
  flags.DEFINE_float("device_memory_gib", 0.0, "Memory per device to check against (0: the "
                     "target's HBM where known).")
  flags.DEFINE_enum("layout", "auto", LAYOUTS, "Token layout to compile for (see layout_for).")
  flags.DEFINE_integer("text_vocab_size", 0, "Replaces the layout's text vocabulary (e.g. a "
                       "tokenizer with added tokens); 0 keeps it.")
  flags.DEFINE_string("libtpu", "", "Path of libtpu.so for TPU topologies (else TPU_LIBRARY_PATH or "
                      "an importable libtpu).")
  flags.mark_flags_as_required(["config"])
  return flags.FLAGS


def _set_up_backend(target: Target) -> None:
  """Before any jax backend starts: CPU only, with as many devices as a CPU target needs."""
  jax.config.update("jax_platforms", "cpu")
  if target.platform == "cpu":
    jax.config.update("jax_num_cpu_devices", target.num_devices)


def main(argv) -> None:
  from absl import app, flags, logging
  from ml_collections import config_flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  flag_values = flags.FLAGS
  config = flag_values.config
  config_name = config_flags.get_config_filename(flag_values["config"])
  try:
    target = parse_target(flag_values.topology, flag_values.cpu_devices)
    _set_up_backend(target)
    devices = target_devices(target, flag_values.libtpu)
    layout = layout_for(config, flag_values.layout)
    if flag_values.text_vocab_size > 0:
      layout = dataclasses.replace(layout, text_vocab_size=flag_values.text_vocab_size)
    print(f"Compiling the train step of {config_name} for {target.describe()} ...", flush=True)
    report, _ = compile_train_step(config, layout, target, devices, flag_values.device_memory_gib)
    print(format_report(report), flush=True)
    check_fits(report, config_name)
  except errors.InputError as e:
    sys.exit(f"error: {e}")


def run() -> None:
  from absl import app
  from medim_jax import config_checks
  _define_flags()
  config_checks.exit_on_unknown_overrides(sys.argv[1:])
  app.run(main)


if __name__ == "__main__":
  run()
