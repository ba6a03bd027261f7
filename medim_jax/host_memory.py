"""Keep the host memory XLA:CPU frees for its next call instead of handing it back to the kernel.

XLA:CPU allocates each call's temporaries as one block (466 MB for the demo's training step) on one
of its worker threads. glibc serves a block that large with a fresh ``mmap`` on any thread but the
main one (a thread's own malloc arena grows to 64 MB at most) and unmaps it when it is freed, so
every call faults the whole block in again, page by page: 115,000 page faults and a quarter of the
CPU time of each demo step (BENCHMARKS.md). With one malloc arena, no ``mmap`` for large blocks and a
high trim threshold, the block is carved from the heap (a few of them while calls overlap) and
reused by later calls: no page faults in the demo's steady state. The price: the process keeps
its peak host memory instead of returning it, and all threads share one arena (negligible next to
a training step's matmuls).

It must run before JAX, or any library that starts threads, allocates: a thread that already owns
an arena keeps it. ``medim_jax/__init__.py`` calls it on import; MEDIM_JAX_KEEP_FREED_MEMORY=0 in
the environment leaves malloc as it is. C libraries other than glibc are left alone.
"""

import ctypes
import os

SWITCH = "MEDIM_JAX_KEEP_FREED_MEMORY"

# mallopt's parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_UP_TO_BYTES = 2**31 - 1  # mallopt takes a C int


def glibc() -> ctypes.CDLL | None:
  """The C library this Python runs on if it is glibc (whose mallopt parameters are the above)."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version
    libc.mallopt
  except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
    return None
  return libc


def keep_freed_memory() -> bool:
  """Sets glibc's malloc up to reuse large freed blocks; False off glibc or when switched off."""
  libc = glibc()
  if os.environ.get(SWITCH, "1") == "0" or libc is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_UP_TO_BYTES))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
