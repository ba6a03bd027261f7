"""Building blocks in Gemma numerics: dense layers with logical axes, (1 + w) RMSNorm, RoPE.

Parameters are stored in float32 and cast to the compute dtype at use. Every parameter carries
``logical_axes`` metadata (e.g. ``("embed", "mlp")``); one rules table maps those names onto
mesh axes when the model is sharded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def contract(x: jax.Array, w: jax.Array, axes: int = 1) -> jax.Array:
  """Contract the last ``axes`` axes of x with the first ``axes`` of w, as one 2-D matmul.

  x (..., *in) and w (*in, *out) -> (..., *out). Flattening the leading axes first matters on
  XLA:CPU: the weight gradient of a 3-D ``x @ w`` contracts over (batch, length) and XLA
  materialises a transposed copy of both operands for it, where the 2-D form needs none.
  """
  inner = x.shape[x.ndim - axes:]
  if tuple(w.shape[:axes]) != tuple(inner):
    raise ValueError(f"cannot contract {x.shape} with {w.shape} over {axes} axes")
  outer = w.shape[axes:]
  flat = jnp.dot(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1))
  return flat.reshape(*x.shape[:x.ndim - axes], *outer)


def normal_param(rngs: nnx.Rngs, shape, std: float, logical_axes) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=tuple(logical_axes))


class Dense(nnx.Module):
  """x @ W (+ b) over the last axis, W of shape (in, out)."""

  def __init__(self, in_features: int, out_features: int, logical_axes, init_std: float,
               use_bias: bool = False, *, rngs: nnx.Rngs):
    self.kernel = normal_param(rngs, (in_features, out_features), init_std, logical_axes)
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32), logical_axes=logical_axes[1:])
                 if use_bias else None)

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    y = contract(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class RMSNorm(nnx.Module):
  """``x * rsqrt(mean(x^2) + eps) * (1 + w)`` computed in float32, w initialised to zero (Gemma)."""

  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + self.scale[...])).astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Half-split rotary embedding (HF Gemma/Llama convention). x: (B, L, H, D), positions: (L,)."""
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
