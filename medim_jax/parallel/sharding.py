"""Logical axis names -> mesh axes (one rules table in config.mesh.rules) -> NamedShardings.

Every parameter names its axes (``("embed", "mlp")``, see models/layers.py). The rules map each name
to mesh axes ("fsdp", "tensor", "data,fsdp") or to "" (replicated). A dimension that its mesh axes
do not divide is replicated instead, and said once: e.g. 1 KV head cannot be split 2 ways.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medim_jax import errors
from medim_jax.parallel import mesh as mesh_lib


def rules_from_config(rules_config) -> dict[str, tuple[str, ...]]:
  rules = {}
  for name, axes in rules_config.items():
    rules[name] = tuple(a.strip() for a in str(axes).split(",") if a.strip())
    unknown = [a for a in rules[name] if a not in mesh_lib.AXES]
    if unknown:
      raise errors.InputError(f"config.mesh.rules.{name}={axes!r} names {unknown}; mesh axes are "
                              f"{mesh_lib.AXES}")
  return rules


def logical_axes(model) -> dict:
  """The logical axis names of every parameter of an (abstract) NNX model, as a pure dict.

  Blocks stacked for a scan over layers have one more dimension than their names: "layers".
  """
  def names(variable):
    axes = tuple(variable.get_metadata().get("logical_axes") or ())
    return ("layers",) * (len(variable.shape) - len(axes)) + axes
  return nnx.to_pure_dict(jax.tree.map(names, nnx.state(model),
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def spec_for(shape, names, rules, mesh, where: str, replicated_notes: list) -> PartitionSpec:
  parts = []
  for size, name in zip(shape, names):
    axes = rules.get(name, ())
    split = math.prod(mesh.shape[a] for a in axes)
    if axes and size % split:
      replicated_notes.append(f"{where} ({name}={size} over {'x'.join(axes)}={split})")
      axes = ()
    parts.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*parts)


def param_shardings(abstract_params, names, rules, mesh) -> dict:
  """NamedShardings for a pure params dict, from each parameter's logical axis names."""
  notes = []
  specs = jax.tree_util.tree_map_with_path(
      lambda path, leaf, n: spec_for(leaf.shape, n, rules, mesh, jax.tree_util.keystr(path), notes),
      abstract_params, names, is_leaf=lambda x: isinstance(x, tuple))
  if notes:
    print(f"sharding: {len(notes)} parameter dimensions are replicated because their mesh axes do "
          f"not divide them, e.g. {notes[0]}")
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def optimizer_shardings(tx, abstract_opt_state, abstract_params, params_shardings, mesh):
  """The optimizer's param-shaped state (Adam moments) like the params; counters, and statistics
  of another shape than their parameter's (factored second moments, a few rows or columns),
  replicated."""
  def like_param(leaf, param, param_sharding):
    return param_sharding if tuple(leaf.shape) == tuple(param.shape) else replicated(mesh)
  return optax.tree_map_params(tx, like_param, abstract_opt_state, abstract_params,
                               params_shardings, transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, (NamedSharding, jax.ShapeDtypeStruct)))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES))


def place_batch(batch: dict, mesh) -> dict:
  """This host's rows of a batch -> global arrays split over the batch axes (scalars replicated).

  Every host passes its own slice (data/pipeline.py reads one per host); the global batch is their
  concatenation, in process order.
  """
  def place(local):
    local = np.asarray(local)
    if local.ndim == 0:
      return jax.device_put(local, replicated(mesh))
    shards = mesh_lib.batch_shards(mesh)
    global_rows = local.shape[0] * jax.process_count()
    if global_rows % shards:
      raise errors.InputError(f"a batch of {global_rows} rows cannot be split over the mesh's "
                              f"{shards} data x fsdp shards: make the batch size a multiple of "
                              f"{shards}")
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
  return {key: place(value) for key, value in batch.items()}
