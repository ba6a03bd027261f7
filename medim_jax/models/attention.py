"""Softmax attention in plain XLA with a hand-written backward pass (the default ``xla`` impl).

Autodiff of ``softmax(q k^T) v`` gives XLA a backward pass that, on a CPU, spends most of its time
in layout copies around small batched matmuls: transposed copies of the (L, L) probability and
score gradients, materialised broadcasts of scalar constants, and a 5-D grouped layout. Here
the backward is written out (dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K,
dK = dS^T Q) on head-major arrays, with the grouped query heads of a KV head folded into the query
axis so that every matmul is one plain batched matmul over (batch, kv_heads). On the 2-core CPU
this halves the attention's gradient (BENCHMARKS.md); the values are the same up to float
rounding (tests/test_attention.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _scale(q: jax.Array) -> jax.Array:
  return jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(q, k, v, key_mask):
  """q (B, K, M, D), k/v (B, K, S, D), key_mask (B, S) bool or None -> out (B, K, M, D), probs."""
  # Scaling q (M x D) instead of the scores (M x S) is the cheaper of the two equal products.
  scores = _matmul("bkmd,bksd->bkms", q * _scale(q), k)
  if key_mask is not None:
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = _matmul("bkms,bksd->bkmd", probs.astype(v.dtype), v).astype(v.dtype)
  return out, probs


@jax.custom_vjp
def _head_major_attention(q, k, v, key_mask):
  return _forward(q, k, v, key_mask)[0]


def _attention_fwd(q, k, v, key_mask):
  out, probs = _forward(q, k, v, key_mask)
  return out, (q, k, v, probs, out)


def _attention_bwd(residuals, d_out):
  q, k, v, probs, out = residuals
  d_probs = _matmul("bkmd,bksd->bkms", d_out, v)
  # sum_s P dP = sum_d dO O: the softmax's Jacobian-vector product without a (M, S) reduction.
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs * (d_probs - row_dot)).astype(q.dtype)  # of the scores before q's scale
  d_q = (_matmul("bkms,bksd->bkmd", d_scores, k) * _scale(q)).astype(q.dtype)
  d_k = _matmul("bksm,bkmd->bksd", jnp.swapaxes(d_scores, 2, 3), q * _scale(q)).astype(k.dtype)
  d_v = _matmul("bksm,bkmd->bksd", jnp.swapaxes(probs.astype(d_out.dtype), 2, 3),
                d_out).astype(v.dtype)
  return d_q, d_k, d_v, None


_head_major_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Full (non-causal) softmax attention, float32 softmax.

  q (B, L, H, D); k, v (B, S, K, D) with H a multiple of K (grouped KV heads); key_mask (B, S) bool
  of the keys to attend, or None for all. Returns (B, L, H, D) in v's dtype.
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
  groups = heads // kv_heads
  # (B, L, K, G, D) -> (B, K, G * L, D): a KV head's query heads are one longer query axis.
  q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * length, head_dim)
  out = _head_major_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), key_mask)
  out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, length, heads, head_dim)
