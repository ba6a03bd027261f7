"""Meshes on 8 fake CPU devices: the sharded train step equals the single-device one, checkpoints
move between meshes, and impossible mesh shapes are one clear error."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import smoke
from medim_jax import errors
from medim_jax.data import build as data_build
from medim_jax.parallel import mesh as mesh_lib, sharding
from medim_jax.training import checkpointing, train


def config_on(mesh=(1, 1, 1)):
  """A tiny model whose every sharded dimension divides by 2 and 4, on a (data, fsdp, tensor) mesh."""
  config = smoke.get_config("tiny")
  config.model.num_heads, config.model.num_kv_heads, config.model.head_dim = 4, 2, 8
  config.model.d_model, config.model.mlp_dim, config.model.num_layers = 32, 64, 1
  config.train.batch_size = 8
  config.train.ema_decay = 0.9
  config.mesh.num_devices = int(np.prod(mesh))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


@pytest.fixture(scope="module")
def dataset():
  return data_build.build_dataset(config_on())


def run_steps(config, dataset, steps=2):
  trainer = train.Trainer(config, dataset.layout)
  state, batches, losses = trainer.init_state(0), dataset.train_iterator(8, seed=0), []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, next(batches))
    losses.append(float(metrics["loss"]))
  return trainer, state, losses


@pytest.fixture(scope="module")
def single_device_run(dataset):
  return run_steps(config_on(), dataset)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_train_steps_match_the_single_device_steps(dataset, single_device_run, mesh):
  _, reference, reference_losses = single_device_run
  trainer, state, losses = run_steps(config_on(mesh), dataset)
  np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The state really is spread as the rules say: q is (embed, heads, head_dim) -> (fsdp, tensor, -).
  q = state.params["blocks"][0]["attn"]["q"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(32 // mesh[1], 4 // mesh[2], 8)}
  mu = state.opt_state[1][0].mu["blocks"][0]["attn"]["q"]  # Adam's first moment, sharded like q
  assert mu.sharding == q.sharding


def test_factored_second_moments_shard_and_match_the_single_device_steps(dataset):
  # d_model 128: the (128, 128) MLP kernels are factored; their row/column statistics are replicated.
  def config(mesh):
    config = config_on(mesh)
    config.model.d_model = config.model.mlp_dim = 128
    config.train.second_moment = "factored"
    return config
  _, reference, reference_losses = run_steps(config((1, 1, 1)), dataset)
  trainer, state, losses = run_steps(config((2, 4, 1)), dataset)
  np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  factored = state.opt_state[1].v_row["blocks"][0]["mlp"]["gate"]["kernel"]
  assert factored.shape == (128,) and factored.sharding.is_fully_replicated
  assert not state.params["blocks"][0]["mlp"]["gate"]["kernel"].sharding.is_fully_replicated


def test_a_checkpoint_saved_on_one_mesh_restores_on_another(dataset, tmp_path):
  trainer, state, _ = run_steps(config_on((2, 2, 2)), dataset, steps=1)
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1)
  checkpointer.save(1, state)
  checkpointer.wait()
  other = train.Trainer(config_on((1, 8, 1)), dataset.layout)
  restored = checkpointer.restore(other.abstract_state())
  checkpointer.close()
  for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                               jax.tree.leaves(other.state_shardings)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == target


@pytest.mark.parametrize("sizes, devices, message", [
    ((3, 1, 1), 8, r"needs 3 devices, but the run has 8"),
    ((-1, 3, 1), 8, r"cannot use 8 devices: 8 is not a multiple of 3"),
    ((-1, -1, 1), 8, r"at most one may be -1"),
    ((0, 1, 1), 8, r"each axis needs a positive size"),
])
def test_impossible_mesh_shapes_are_one_clear_error(sizes, devices, message):
  mesh_config = ml_collections.ConfigDict(dict(zip(mesh_lib.AXES, sizes)))
  with pytest.raises(errors.InputError, match=message):
    mesh_lib.mesh_shape(mesh_config, devices)


def test_mesh_errors_from_the_config(dataset):
  config = config_on((2, 2, 2))
  config.mesh.num_devices = 16
  with pytest.raises(errors.InputError, match="num_devices=16, but only 8"):
    train.Trainer(config, dataset.layout)
  config = config_on((8, 1, 1))
  trainer = train.Trainer(config, dataset.layout)
  with pytest.raises(errors.InputError, match="batch of 4 rows cannot be split over the mesh's 8"):
    trainer.train_step(trainer.init_state(0), next(dataset.train_iterator(4, seed=0)))
  config.mesh.rules.embed = "fsdp,model"
  with pytest.raises(errors.InputError, match=r"rules.embed='fsdp,model' names \['model'\]"):
    train.Trainer(config, dataset.layout)


def test_a_dimension_the_mesh_does_not_divide_is_replicated(dataset, capsys):
  config = config_on((1, 1, 8))  # 4 heads and 2 KV heads cannot be split 8 ways
  trainer = train.Trainer(config, dataset.layout)
  assert "replicated because their mesh axes do not divide them" in capsys.readouterr().out
  q = trainer.state_shardings.params["blocks"][0]["attn"]["q"]
  mlp = trainer.state_shardings.params["blocks"][0]["mlp"]["up"]["kernel"]
  assert q.spec == jax.sharding.PartitionSpec("fsdp", None, None)  # fsdp has size 1 here
  assert mlp.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharding.batch_sharding(trainer.mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_layers_scanned_over_stacked_weights_shard_like_the_loop(dataset):
  config = config_on((2, 2, 2))
  config.model.scan_layers, config.model.num_layers = True, 2
  trainer = train.Trainer(config, dataset.layout)
  q = trainer.state_shardings.params["blocks"]["attn"]["q"]  # (layers, embed, heads, head_dim)
  assert q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  state, metrics = trainer.train_step(trainer.init_state(0), next(dataset.train_iterator(8, seed=0)))
  assert state.params["blocks"]["attn"]["q"].shape == (2, 32, 4, 8)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0


def test_splash_attention_runs_per_shard_and_matches_the_single_device_step(dataset,
                                                                           single_device_run):
  """The Pallas TPU kernel (interpret mode on CPU) under shard_map, with grouped KV heads and padded
  reports, forward and backward, against the einsum path on one device."""
  config = config_on((2, 2, 2))
  config.model.attention_impl = "splash"
  _, state, losses = run_steps(config, dataset)
  _, reference, reference_losses = single_device_run
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=2e-5)


def test_sampling_split_over_the_mesh_equals_one_device(dataset, single_device_run):
  from medim_jax.diffusion import sampler as sampler_lib
  trainer, state, _ = single_device_run
  split = dataset.eval.subset(np.arange(5))  # 5 rows: padded to 8 on the mesh
  inputs = sampler_lib.task_inputs("joint", split.tokens, split.prompt_length, dataset.layout)
  config = sampler_lib.SamplerConfig(text_steps=4, image_steps=4, cfg_scale=2.0)
  one_device = sampler_lib.Sampler(trainer.model.apply, dataset.layout, trainer.schedule, config)
  want = one_device(state.params, inputs, split.example_id).tokens
  mesh_trainer = train.Trainer(config_on((4, 2, 1)), dataset.layout)
  params = jax.device_put(state.params, mesh_trainer.state_shardings.params)
  on_mesh = sampler_lib.Sampler(mesh_trainer.model.apply, dataset.layout, trainer.schedule, config,
                                batch_sharding=sharding.batch_sharding(mesh_trainer.mesh))
  got = on_mesh(params, inputs, split.example_id).tokens
  assert got.shape == want.shape and len(got.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
