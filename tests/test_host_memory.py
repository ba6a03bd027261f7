"""Importing medim_jax makes XLA:CPU reuse its large per-call temporaries (medim_jax/host_memory.py).

Each case runs in a fresh interpreter, since malloc's arenas are fixed once threads exist.
"""

import ctypes
import os
import subprocess
import sys

import pytest

from medim_jax import host_memory

# A jitted call whose temporary (the 4,096 x 4,096 float32 product, 64 MB) is above the 64 MB / 32 MB
# sizes glibc would serve from a thread's own arena or its adaptive mmap threshold.
_PAGE_FAULTS_PER_CALL = """
import resource
import medim_jax
import jax, jax.numpy as jnp
x = jnp.ones((4096, 512), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).max() + jnp.cumsum(x @ x.T, axis=1).max())
f(x).block_until_ready(); f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _on_glibc() -> bool:
  try:
    ctypes.CDLL(None).gnu_get_libc_version
    return True
  except (OSError, AttributeError):
    return False


def _page_faults_per_call(switch: str) -> float:
  env = dict(os.environ, **{host_memory.SWITCH: switch})
  result = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_PER_CALL], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _on_glibc(), reason="the malloc settings are glibc's")
def test_large_temporaries_are_reused_not_faulted_in_again():
  kept = _page_faults_per_call("1")
  default = _page_faults_per_call("0")
  pages_of_the_product = 4096 * 4096 * 4 // 4096
  assert default > pages_of_the_product / 2, default  # what the setting is for: it must be there
  assert kept < pages_of_the_product / 50, (kept, default)


def test_switched_off_by_the_environment(monkeypatch):
  monkeypatch.setenv(host_memory.SWITCH, "0")
  assert host_memory.keep_freed_memory() is False
