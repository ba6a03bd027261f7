"""Building blocks in Gemma numerics: dense layers with logical axes, (1 + w) RMSNorm, RoPE.

Parameters are stored in float32 and cast to the compute dtype at use. Every parameter carries
``logical_axes`` metadata (e.g. ``("embed", "mlp")``); one rules table maps those names onto
mesh axes when the model is sharded.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx


def contract(x: jax.Array, w: jax.Array, axes: int = 1) -> jax.Array:
  """Contract the last ``axes`` axes of x with the first ``axes`` of w, as one 2-D matmul.

  x (..., *in) and w (*in, *out) -> (..., *out) in x's dtype; a bfloat16 / float16 w makes the
  matmul one of w's dtype accumulated in float32 (``matmul_f32_accumulate``). Flattening the
  leading axes first matters on XLA:CPU: the weight gradient of a 3-D ``x @ w`` contracts over
  (batch, length) and XLA materialises a transposed copy of both operands for it, where the 2-D
  form needs none.
  """
  inner = x.shape[x.ndim - axes:]
  if tuple(w.shape[:axes]) != tuple(inner):
    raise ValueError(f"cannot contract {x.shape} with {w.shape} over {axes} axes")
  outer = w.shape[axes:]
  # x's dtype is the activations' (float32 or w's): so is the result.
  flat = matmul(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1), False, x.dtype)
  return flat.reshape(*x.shape[:x.ndim - axes], *outer)


def is_low_precision(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def matmul(a: jax.Array, b: jax.Array, transpose_b: bool, out_dtype) -> jax.Array:
  """``a @ b`` (or ``a @ b.T``), 2-D, in ``out_dtype``: through ``matmul_f32_accumulate`` where b is
  bfloat16 / float16, a plain float32-output dot otherwise."""
  if is_low_precision(b.dtype):
    return matmul_f32_accumulate(a, b, transpose_b, out_dtype)
  return _dot(a, b, 1, 1 if transpose_b else 0).astype(out_dtype)


def _dot(a, b, contract_a: int, contract_b: int) -> jax.Array:
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul_f32_accumulate(a: jax.Array, b: jax.Array, transpose_b: bool, out_dtype) -> jax.Array:
  """``a @ b`` (a (M, K), b (K, N); or ``a @ b.T`` for b (N, K) with ``transpose_b``) for a
  bfloat16 or float16 ``b``: ``a`` is cast to b's dtype, the product accumulated and returned in
  float32, then cast to ``out_dtype``; the backward pass's two matmuls likewise, and a's gradient
  comes back in a's own dtype (a float32 residual stream is not rounded on the way back).
  Autodiff alone would give the backward a float32 cotangent against a bfloat16 operand. XLA:CPU
  runs a low-precision dot with float32 output on the CPU's bf16 units (AMX, AVX512-BF16), 4-6x
  the float32 matmul rate on a Sapphire Rapids core, while a dot with bfloat16 output is slower
  than float32 there (BENCHMARKS.md); a GPU accumulates in float32 either way, so the numbers are
  those of a plain bfloat16 dot."""
  return _dot(a.astype(b.dtype), b, 1, 1 if transpose_b else 0).astype(out_dtype)


def _matmul_fwd(a, b, transpose_b, out_dtype):
  low = a.astype(b.dtype)
  # The zero-size array carries a's dtype to the backward pass (residuals must be arrays).
  return _dot(low, b, 1, 1 if transpose_b else 0).astype(out_dtype), (low, b, jnp.zeros(0, a.dtype))


def _matmul_bwd(transpose_b, out_dtype, residuals, g):
  a, b, a_dtype = residuals
  g = g.astype(b.dtype)
  if transpose_b:  # y = a b^T: da = g b, db = g^T a
    da, db = _dot(g, b, 1, 0), _dot(g, a, 0, 0)
  else:            # y = a b: da = g b^T, db = a^T g
    da, db = _dot(g, b, 1, 1), _dot(a, g, 0, 0)
  return da.astype(a_dtype.dtype), db.astype(b.dtype)


matmul_f32_accumulate.defvjp(_matmul_fwd, _matmul_bwd)


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
    """x @ W with W in the matmul ``dtype``; the result in x's dtype (the activations')."""
    y = contract(x, self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
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
