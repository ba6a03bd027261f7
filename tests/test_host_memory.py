"""Importing medim_jax makes large freed blocks reusable from any thread (medim_jax/host_memory.py).

XLA:CPU's per-call temporaries are such blocks, allocated on its worker threads; BENCHMARKS.md
measures the effect on the demo's training step. Here a worker thread allocates, writes and frees a
128 MB block ten times, in a fresh interpreter (malloc's arenas are fixed once threads exist), and
counts the page faults of each round.
"""

import json
import os
import subprocess
import sys

import pytest

from medim_jax import host_memory

_FAULTS_PER_ROUND = """
import ctypes, json, resource, threading
import medim_jax
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def rounds():
  for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(128 << 20)
    ctypes.memset(block, 1, 128 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _faults_per_round(switch: str) -> list[int]:
  env = dict(os.environ, **{host_memory.SWITCH: switch})
  result = subprocess.run([sys.executable, "-c", _FAULTS_PER_ROUND], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.glibc() is None, reason="the malloc settings are glibc's")
def test_a_large_freed_block_is_reused_not_faulted_in_again():
  kept, default = _faults_per_round("1"), _faults_per_round("0")
  # Without the settings every round maps fresh memory, at least one fault per 2 MB (a transparent
  # huge page): what the module is for must be there. With them only the first round faults.
  assert min(default) >= (128 << 20) >> 21, default
  assert max(kept[1:]) * 20 < min(default), (kept, default)


def test_switched_off_by_the_environment(monkeypatch):
  monkeypatch.setenv(host_memory.SWITCH, "0")
  assert host_memory.keep_freed_memory() is False
