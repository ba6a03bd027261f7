"""A (data, fsdp, tensor) device mesh from config.mesh, with one axis left to fill the rest."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils

from medim_jax import errors

AXES = ("data", "fsdp", "tensor")
# A batch is split over every axis that does not split the model's features.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
  """The sizes of AXES for ``device_count`` devices; one axis may be -1 (whatever is left)."""
  sizes = [int(mesh_config[axis]) for axis in AXES]
  described = " x ".join(f"{axis}={size}" for axis, size in zip(AXES, sizes))
  auto = [i for i, size in enumerate(sizes) if size == -1]
  if len(auto) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise errors.InputError(f"config.mesh {described}: each axis needs a positive size, and at most "
                            "one may be -1 (it takes the devices the others leave)")
  fixed = math.prod(size for size in sizes if size != -1)
  if auto:
    if device_count % fixed:
      raise errors.InputError(f"config.mesh {described} cannot use {device_count} devices: "
                              f"{device_count} is not a multiple of {fixed}")
    sizes[auto[0]] = device_count // fixed
  elif fixed != device_count:
    raise errors.InputError(f"config.mesh {described} needs {fixed} devices, but the run has "
                            f"{device_count} (set one axis to -1, or config.mesh.num_devices)")
  return tuple(sizes)


def mesh_devices(mesh_config, devices=None) -> list:
  """Every device, or the first config.mesh.num_devices of them (single-process runs only).

  ``devices`` replaces jax.devices(), e.g. by the devices of a TPU topology compiled for ahead of
  time on a host that has none of them.
  """
  devices = list(jax.devices() if devices is None else devices)
  wanted = int(mesh_config.num_devices)
  if wanted <= 0:
    return devices
  if jax.process_count() > 1:
    raise errors.InputError("config.mesh.num_devices must be 0 (every device) on several hosts")
  if wanted > len(devices):
    raise errors.InputError(f"config.mesh.num_devices={wanted}, but only {len(devices)} "
                            f"{devices[0].platform} devices are visible")
  return devices[:wanted]


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  every = list(jax.devices() if devices is None else devices)
  devices = mesh_devices(mesh_config, every)
  shape = mesh_shape(mesh_config, len(devices))
  if len(devices) == len(every):
    grid = mesh_utils.create_device_mesh(shape, devices)  # topology-aware order on TPU/GPU
  else:
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, AXES)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)
