"""Tests run on the JAX CPU backend with 8 fake devices (set before JAX initialises a backend).

Many tests build the same small models; a compilation cache shared by the whole session (and the
command-line subprocesses it starts) compiles each program once. It lives in a fresh temporary
folder, so no run ever reads another run's cache.

XLA's backend optimisation is off for the tests (cli_env.py says why).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from cli_env import TEST_XLA_FLAGS  # noqa: E402  (tests/ is on the path, as for helpers)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS}"
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="medim-jax-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
