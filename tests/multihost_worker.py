"""One process of a 2-process CPU run (tests/test_multihost.py): 2 train steps of the smoke model
on a mesh over both processes' devices, each process feeding only its half of every batch."""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: str, process_id: str, out_path: str):
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=int(process_id))
  import numpy as np
  from jax.experimental import multihost_utils

  from medim_jax.data import build as data_build
  from medim_jax.training import train
  from tests.test_parallel import config_on

  config = config_on((2, 2, 1))  # 4 devices: 2 per process
  config.mesh.num_devices = 0
  dataset = data_build.build_dataset(config)
  trainer = train.Trainer(config, dataset.layout)
  state, batches, losses = trainer.init_state(0), dataset.train_iterator(8, seed=0), []
  half = slice(4 * jax.process_index(), 4 * jax.process_index() + 4)
  for _ in range(2):
    batch = {key: value[half] for key, value in next(batches).items()}  # this host's rows only
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out_path, losses=np.asarray(losses), **flat)


if __name__ == "__main__":
  main(*sys.argv[1:])
