"""The devices an ahead-of-time compile targets (python -m medim_jax.aot): a TPU slice compiled by
libtpu for its real chips, or N fake CPU devices standing in for N GPUs, with each device's memory."""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from medim_jax import errors


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step will run: a TPU slice compiled by libtpu, or CPU stand-ins for N devices."""
  name: str
  platform: str                 # "tpu" or "cpu"
  num_devices: int
  device_memory_gib: float      # 0: unknown (no fit check unless --device_memory_gib)
  topology_name: str = ""       # libtpu's name, e.g. "v5:2x2x2"
  chip_config: str = ""         # "megacore" (v4, v5p: one device per chip) or "default"
  host_bounds: tuple = (2, 2, 1)  # chips per host (v5e/v6e slices of up to 8 chips are one host)

  def describe(self) -> str:
    if self.platform == "tpu":
      return f"{self.name} ({self.num_devices} TPU chips, topology {self.topology_name}, compiled by libtpu)"
    stand_in = f" standing in for {self.name}" if self.name != "cpu" else ""
    return f"{self.num_devices} fake CPU devices{stand_in} (XLA:CPU compiler)"


# Chips laid out as libtpu names them. v4 and v5p names count TensorCores (2 per chip, one device
# per chip with megacore); v5e and v6e count chips.
_TPU_3D_SHAPES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
                  512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}
_TPU_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                  256: "16x16"}
_TPU_KINDS = {  # name prefix: (libtpu prefix, shapes, chip config, HBM GiB per chip)
    "v4": ("v4", _TPU_3D_SHAPES, "megacore", 32.0),
    "v5p": ("v5", _TPU_3D_SHAPES, "megacore", 95.0),
    "v5e": ("v5e", _TPU_2D_SHAPES, "default", 16.0),
    "v6e": ("v6e", _TPU_2D_SHAPES, "default", 32.0),
}
GPU_MEMORY_GIB = {"a100": 80.0, "h100": 80.0, "h200": 141.0}


def parse_target(name: str, cpu_devices: int) -> Target:
  """``v5p-16`` / ``h100-8`` / "" (``cpu_devices`` fake CPU devices) -> Target."""
  if not name:
    return Target("cpu", "cpu", cpu_devices, 0.0)
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.lower())
  kind, size = (match.group(1), int(match.group(2))) if match else (name, 0)
  if kind in GPU_MEMORY_GIB and size > 0:
    return Target(name.lower(), "cpu", size, GPU_MEMORY_GIB[kind])
  if kind in _TPU_KINDS:
    prefix, shapes, chip_config, hbm = _TPU_KINDS[kind]
    if size in shapes:
      chips = size // 2 if chip_config == "megacore" else size
      shape = shapes[size]
      single_host = chip_config == "default" and chips <= 8
      host_bounds = tuple(int(n) for n in (shape + "x1").split("x")[:3]) if single_host else (2, 2, 1)
      return Target(name.lower(), "tpu", chips, hbm, f"{prefix}:{shape}", chip_config, host_bounds)
    raise errors.InputError(f"--topology {name}: known {kind} sizes are "
                            f"{', '.join(f'{kind}-{n}' for n in shapes)}")
  raise errors.InputError(f"--topology {name}: expected a TPU slice (v4-N, v5p-N, v5e-N, v6e-N) or "
                          f"a GPU node (a100-N, h100-N, h200-N), or none for --cpu_devices")


def target_devices(target: Target, libtpu: str = "") -> list:
  """The devices to compile for: libtpu's compile-only chips, or this process's CPU devices."""
  if target.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < target.num_devices:
      raise errors.InputError(f"{target.describe()} asked for, but this process has {len(devices)} "
                              "CPU devices (set them before jax starts: python -m medim_jax.aot does)")
    return devices[:target.num_devices]
  from jax.experimental import topologies
  if libtpu:
    if not os.path.isfile(libtpu):
      raise errors.InputError(f"--libtpu {libtpu} does not exist")
    os.environ["TPU_LIBRARY_PATH"] = os.path.abspath(libtpu)
  # Without these libtpu looks for TPU VM metadata and prints a page of warnings on a normal host.
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", target.name),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
    os.environ.setdefault(key, value)
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=target.topology_name, chip_config_name=target.chip_config,
        chips_per_host_bounds=target.host_bounds, num_slices=1)
  except RuntimeError as e:
    if "TPU support not installed" not in str(e):
      raise
    wanted = _libtpu_wanted()
    raise errors.InputError(
        f"--topology {target.name} needs libtpu {wanted} (the version jax {jax.__version__} was "
        f"released with): pip install --no-deps --target .venv/libtpu-aot 'libtpu=={wanted}', then "
        "pass --libtpu .venv/libtpu-aot/libtpu/libtpu.so; or compile for fake CPU devices "
        "(no --topology)") from None
  return list(topology.devices)


def _libtpu_wanted() -> str:
  """The libtpu versions this jax was released with (its [tpu] extra)."""
  from importlib import metadata
  for requirement in metadata.requires("jax") or ():
    if requirement.startswith("libtpu") and "tpu" in requirement.split(";")[-1]:
      return requirement.split(";")[0].replace("libtpu", "").strip().lstrip("=")
  return "matching jax " + jax.__version__
