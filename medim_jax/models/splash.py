"""Splash attention (the Pallas TPU flash-attention kernel) with our key-padding mask.

Full (bidirectional) attention with padding is splash's segment-id masking: every query is in
segment 0, valid keys in segment 0 and padded keys in segment 1, so no query sees a padded key.
The sequence is padded to the kernel's block size the same way. Off TPU the kernel runs in
Pallas interpret mode (slow; for tests). Inside a mesh (``jax.set_mesh``) the kernel runs per
shard under ``shard_map``: batch over (data, fsdp), heads over tensor.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

BLOCK = 128


@functools.lru_cache(maxsize=None)
def _kernel(num_heads: int, length: int, interpret: bool):
  block = kernels.BlockSizes(
      block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK, block_kv_dkv=BLOCK,
      block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
  full = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(num_heads)])
  return kernels.make_splash_mha(full, head_shards=1, q_seq_shards=1, block_sizes=block,
                                 interpret=interpret)


def _local_attention(q, k, v, key_mask):
  """q (B, L, H, D), k/v (B, L, KV, D), key_mask (B, L) bool or None -> (B, L, H, D)."""
  batch, length, heads, head_dim = q.shape
  padded = -(-length // BLOCK) * BLOCK
  groups = heads // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)

  def to_kernel(x):  # (B, L, H, D) -> (B, H, padded, D)
    return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  valid = jnp.ones((batch, length), bool) if key_mask is None else key_mask
  key_segments = jnp.pad(jnp.where(valid, 0, 1), ((0, 0), (0, padded - length)),
                         constant_values=1).astype(jnp.int32)
  query_segments = jnp.zeros((batch, padded), jnp.int32)
  kernel = _kernel(heads, padded, jax.default_backend() != "tpu")
  scale = jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
  out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=kernels.SegmentIds(q=qs, kv=ks)))(
      to_kernel(q) * scale, to_kernel(k), to_kernel(v), query_segments, key_segments)
  return out.transpose(0, 2, 1, 3)[:, :length]


def splash_attention(q, k, v, key_mask):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _local_attention(q, k, v, key_mask)
  batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  heads_axis = "tensor" if "tensor" in mesh.axis_names else None
  qkv = PartitionSpec(batch_axes, None, heads_axis, None)
  mask_spec = PartitionSpec(batch_axes, None)
  if key_mask is None:
    key_mask = jnp.ones(q.shape[:2], bool)
  return jax.shard_map(_local_attention, mesh=mesh, in_specs=(qkv, qkv, qkv, mask_spec),
                       out_specs=qkv, check_vma=False)(q, k, v, key_mask)
