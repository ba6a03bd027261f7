"""Diffusion-time conditioning: a sinusoidal embedding of sigma(t) through an MLP, and AdaLN-zero."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from medim_jax.models import layers


def sinusoidal_embedding(sigma: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """(B,) -> (B, dim) float32, ``[cos(sigma * f_i), sin(sigma * f_i)]`` with cos first, as in the original."""
  if dim % 2:
    raise ValueError(f"timestep embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = sigma.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nnx.Module):
  """sigma (B,) -> conditioning vector (B, d_model): sinusoid, Linear, SiLU, Linear."""

  def __init__(self, d_model: int, frequency_dim: int, max_period: float, scale: float,
               init_std: float, *, rngs: nnx.Rngs):
    self.frequency_dim = frequency_dim
    self.max_period = max_period
    # The original feeds raw sigma in [0, ~7] to a sinusoid with max period 1e4, so most
    # frequencies barely move; `scale` > 1 spreads them (1.0 reproduces the original).
    self.scale = scale
    self.fc1 = layers.Dense(frequency_dim, d_model, ("time_freq", "embed"), init_std, use_bias=True,
                            rngs=rngs)
    self.fc2 = layers.Dense(d_model, d_model, ("embed", "embed_out"), init_std, use_bias=True,
                            rngs=rngs)

  def __call__(self, sigma: jax.Array, dtype) -> jax.Array:
    emb = sinusoidal_embedding(sigma * self.scale, self.frequency_dim, self.max_period)
    return self.fc2(jax.nn.silu(self.fc1(emb, dtype)), dtype)


class AdaLNModulation(nnx.Module):
  """Conditioning (B, d) -> shift, scale and gate for the attention and MLP branches of a block.

  Zero-initialised (AdaLN-zero): every gate is 0 at init, so each block starts as the identity.
  With ``gate_init='open'`` the gate bias starts at 1 instead, so a pretrained backbone is
  active from step 0 (shift = scale = 0, gate = 1 makes the block exactly a non-causal Gemma block).
  """

  NUM_CHUNKS = 6  # shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp

  def __init__(self, d_model: int, gate_init: str, *, rngs: nnx.Rngs):
    if gate_init not in ("zero", "open"):
      raise ValueError(f"adaln_gate_init must be 'zero' or 'open', got {gate_init!r}")
    self.d_model = d_model
    self.kernel = nnx.Param(jnp.zeros((d_model, self.NUM_CHUNKS, d_model), jnp.float32),
                            logical_axes=("embed", "adaln_chunk", "embed_out"))
    bias = jnp.zeros((self.NUM_CHUNKS, d_model), jnp.float32)
    if gate_init == "open":
      bias = bias.at[2].set(1.0).at[5].set(1.0)
    self.bias = nnx.Param(bias, logical_axes=("adaln_chunk", "embed_out"))

  def __call__(self, cond: jax.Array, dtype) -> tuple[jax.Array, ...]:
    # No SiLU before the projection: the original applies it to the time embedding directly.
    out = jnp.einsum("bd,dce->bce", cond.astype(dtype), self.kernel[...].astype(dtype))
    out = out + self.bias[...].astype(dtype)
    return tuple(out[:, None, i, :] for i in range(self.NUM_CHUNKS))  # each (B, 1, d)
