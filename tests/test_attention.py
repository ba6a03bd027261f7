"""The default attention (models/attention.py): its hand-written backward against autodiff."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medim_jax.models import attention


def autodiff_attention(q, k, v, key_mask):
  """Plain softmax attention, differentiated by JAX: repeat KV heads, mask keys, f32 softmax."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  scores = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), k.astype(jnp.float32))
  scores = scores / math.sqrt(q.shape[-1])
  if key_mask is not None:
    scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqs,bshd->bqhd", probs, v.astype(jnp.float32))


def inputs(heads, kv_heads, dtype, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  batch, length, head_dim = 3, 7, 8
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
  cotangent = jax.random.normal(keys[3], (batch, length, heads, head_dim), jnp.float32)
  return q, k, v, cotangent


MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1]], bool)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_autodiff(heads, kv_heads, masked):
  q, k, v, cotangent = inputs(heads, kv_heads, jnp.float32)
  key_mask = jnp.asarray(MASK) if masked else None

  def pulled(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, key_mask), q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))

  ours, reference = pulled(jax.jit(attention.attention)), pulled(autodiff_attention)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)


def test_masked_keys_get_no_weight_and_no_gradient():
  q, k, v, cotangent = inputs(2, 2, jnp.float32)
  key_mask = jnp.asarray(MASK)
  changed = jnp.where(key_mask[:, :, None, None], v, 1e6)
  np.testing.assert_array_equal(attention.attention(q, k, v, key_mask),
                                attention.attention(q, k, changed, key_mask))
  _, vjp = jax.vjp(lambda k, v: attention.attention(q, k, v, key_mask), k, v)
  dk, dv = vjp(cotangent)
  hidden = ~MASK[:, :, None, None]
  assert not np.any(np.where(hidden, dk, 0)) and not np.any(np.where(hidden, dv, 0))


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
  q, k, v, cotangent = inputs(4, 2, jnp.float32)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, vjp = jax.vjp(lambda *a: attention.attention(*a, None), *low)
  grads = vjp(cotangent.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  _, vjp32 = jax.vjp(lambda *a: autodiff_attention(*a, None), *low)
  for g, g32 in zip(grads, vjp32(cotangent)):
    np.testing.assert_allclose(np.asarray(g, np.float32), g32, rtol=0.05, atol=0.05)


def test_query_heads_must_share_kv_heads_evenly():
  q, k, v, _ = inputs(4, 4, jnp.float32)
  with pytest.raises(ValueError, match="4 query heads cannot share 3 KV heads"):
    attention.attention(q, k[:, :, :3], v[:, :, :3], None)
