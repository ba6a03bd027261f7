"""Two processes on one machine, joined by jax.distributed (gloo CPU collectives), each feeding only
its half of every batch: the global train step is the single-device one."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests import test_parallel
from tests.test_parallel import config_on, run_steps

dataset = test_parallel.dataset  # the fixture, shared with test_parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_each_with_half_the_batch_train_like_one_device(dataset, tmp_path):
  out, port = str(tmp_path / "two_processes.npz"), str(free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workers = [subprocess.Popen([sys.executable, "tests/multihost_worker.py", port, str(i), out],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
  logs = [w.communicate(timeout=300)[0] for w in workers]
  assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)
  got = np.load(out)
  _, state, losses = run_steps(config_on(), dataset)
  np.testing.assert_allclose(got["losses"], losses, rtol=2e-5)
  for path, value in jax.tree_util.tree_leaves_with_path(state.params):
    np.testing.assert_allclose(got[jax.tree_util.keystr(path)], np.asarray(value), rtol=2e-4,
                               atol=2e-6, err_msg=jax.tree_util.keystr(path))
