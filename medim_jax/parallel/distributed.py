"""Multi-host start-up: ``jax.distributed.initialize()`` when the environment says there are several
processes, nothing for a single one.

Call ``initialize_from_environment()`` once, first thing, before anything touches a JAX device:
every process then sees the global device list, and ``is_main_process()`` picks the one that logs.

What counts as "several processes" (the first that applies):
  MEDIM_DISTRIBUTED=1 / 0     forced on / off (launch/tpu_vm.sh sets 1 on a multi-host TPU slice,
                              whose workers JAX finds through the TPU VM metadata)
  JAX_COORDINATOR_ADDRESS     host:port of process 0; JAX_NUM_PROCESSES and JAX_PROCESS_ID give the
                              rest (else JAX detects them, e.g. under SLURM)
  SLURM_NTASKS > 1            one srun task per GPU or per node (JAX reads the SLURM variables;
                              JAX_LOCAL_DEVICE_IDS says which GPUs a task drives)
  TPU_WORKER_HOSTNAMES        with more than one host (GKE TPU pods), or MEGASCALE_COORDINATOR_ADDRESS
                              (multislice)
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

from medim_jax import errors


def multi_process_reason(environ: Mapping[str, str] | None = None) -> str | None:
  """Which variable says this process is one of several; None for a single process."""
  environ = os.environ if environ is None else environ
  forced = environ.get("MEDIM_DISTRIBUTED", "").strip()
  if forced in ("0", "1"):
    return "MEDIM_DISTRIBUTED=1" if forced == "1" else None
  if forced:
    raise errors.InputError(f"MEDIM_DISTRIBUTED={forced!r}: use 1 (initialize jax.distributed) or 0")
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']}"
  tasks = environ.get("SLURM_NTASKS", "")
  if tasks.isdigit() and int(tasks) > 1:
    return f"SLURM_NTASKS={tasks}"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "MEGASCALE_COORDINATOR_ADDRESS is set (multislice)"
  return None


def _explicit_arguments(environ: Mapping[str, str]) -> dict:
  """num_processes / process_id from JAX_NUM_PROCESSES / JAX_PROCESS_ID (JAX itself reads only the
  coordinator address and JAX_LOCAL_DEVICE_IDS from the environment)."""
  arguments = {}
  for variable, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    value = environ.get(variable, "").strip()
    if value:
      if not value.isdigit():
        raise errors.InputError(f"{variable}={value!r} is not a non-negative integer")
      arguments[name] = int(value)
  return arguments


def initialize_from_environment(environ: Mapping[str, str] | None = None) -> bool:
  """Start JAX's distributed runtime where the environment asks for it; True if it runs."""
  environ = os.environ if environ is None else environ
  reason = multi_process_reason(environ)
  if reason is None:
    return False
  if jax.distributed.is_initialized():
    return True
  try:
    jax.distributed.initialize(**_explicit_arguments(environ))
  except (ValueError, TypeError) as e:
    # JAX could not tell the coordinator, the process count or this process's id.
    raise errors.InputError(
        f"{reason}, so this is one of several processes, but jax.distributed.initialize could not "
        f"start: {e}. Set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
        "JAX_PROCESS_ID, or MEDIM_DISTRIBUTED=0 for a single process") from None
  print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()} ({reason}); "
        f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
  return True


def is_main_process() -> bool:
  """The process that writes logs, metrics and reports (every process takes part in checkpoints)."""
  return jax.process_index() == 0
