"""The XLA flags of the tests, and the environment of the command lines they start.

Compiling is most of the suite's time, and the tests' programs are tiny, so XLA's backend (LLVM)
optimisation is off: the whole suite (`make test`) took 638 s instead of 1,045 s on an idle 2-core
Intel Xeon (2026-12-07, one run each), test_sampler.py + test_vq.py 313 s instead of 562 s on 2 busy
cores, and test_cli's first folder job 62 s instead of 128 s (the VQ tokenizer's init alone 3 s
instead of 27 s). The same computations run, unoptimised; every comparison a test makes is between
two results computed this way, or within a tolerance.
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def cli_env() -> dict:
  """A command line's environment: one CPU device (not the tests' 8 fake ones), ``TEST_XLA_FLAGS``."""
  return dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")
