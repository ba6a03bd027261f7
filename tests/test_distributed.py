"""jax.distributed starts only where the environment says there are several processes."""

import jax
import pytest

from medim_jax import errors
from medim_jax.parallel import distributed


@pytest.mark.parametrize("environ, reason", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, "JAX_COORDINATOR_ADDRESS=10.0.0.2:1234"),
    ({"SLURM_NTASKS": "16"}, "SLURM_NTASKS=16"),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, "TPU_WORKER_HOSTNAMES lists 2 hosts"),
    ({"MEDIM_DISTRIBUTED": "1"}, "MEDIM_DISTRIBUTED=1"),
    ({"MEDIM_DISTRIBUTED": "0", "SLURM_NTASKS": "16"}, None),
])
def test_the_environment_decides(environ, reason):
  assert distributed.multi_process_reason(environ) == reason


def test_a_single_process_is_left_alone(monkeypatch):
  monkeypatch.setattr(jax.distributed, "initialize", lambda **_: pytest.fail("initialized"))
  assert not distributed.initialize_from_environment({"SLURM_NTASKS": "1"})
  assert distributed.is_main_process()


def test_several_processes_initialize_with_the_environment_s_numbers(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": "0"}
  assert distributed.initialize_from_environment(environ)
  assert calls == [{"num_processes": 2, "process_id": 0}]


def test_an_incomplete_environment_is_one_clear_error(monkeypatch):
  def initialize(**_):
    raise ValueError("Number of processes must be defined.")
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  with pytest.raises(errors.InputError, match="JAX_NUM_PROCESSES"):
    distributed.initialize_from_environment({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
  with pytest.raises(errors.InputError, match="MEDIM_DISTRIBUTED"):
    distributed.multi_process_reason({"MEDIM_DISTRIBUTED": "yes"})
