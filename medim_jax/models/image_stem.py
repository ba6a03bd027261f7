"""A convolutional stem over the image tokens' embeddings: a spatial prior in front of the backbone.

The backbone sees the image as a flat sequence of code embeddings and has to learn from the pairs
alone which positions neighbour which; on the 1,449 radiographs of medim-demo it learns to read a
finding like cardiomegaly far less well than a small CNN on the same tokens' reconstructions does
(docs/reading_study.md). Each stem layer is a residual ``x + W_out gelu(conv3x3(norm(x)))`` over the
image segment laid out as its (side x side) grid, so from step 0 every image position mixes its
neighbours' embeddings. Not in the original (its backbone is a pretrained 7B MLLM over VQGAN codes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from medim_jax.models import layers


def grid_side(image_length: int) -> int:
  side = math.isqrt(image_length)
  if side * side != image_length:
    raise ValueError(f"the image conv stem needs a square token grid; the image segment has "
                     f"{image_length} tokens")
  return side


class StemLayer(nnx.Module):
  def __init__(self, d_model: int, norm_eps: float, init_std: float, *, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(d_model, norm_eps)
    self.conv = layers.normal_param(rngs, (3, 3, d_model, d_model), init_std,
                                    ("conv_window", "conv_window", "embed", "embed_out"))
    self.out = layers.Dense(d_model, d_model, ("embed_out", "embed"), init_std, rngs=rngs)

  def __call__(self, grid: jax.Array, dtype) -> jax.Array:
    """grid (B, side, side, d) -> the same shape and dtype; ``dtype``: the matmul operands'."""
    mixed = jax.lax.conv_general_dilated(
        self.norm(grid).astype(dtype), self.conv[...].astype(dtype), window_strides=(1, 1),
        padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32).astype(grid.dtype)
    return grid + self.out(jax.nn.gelu(mixed, approximate=True), dtype)


class ImageConvStem(nnx.Module):
  """``num_layers`` residual 3x3 conv layers over an image segment of ``image_length`` tokens."""

  def __init__(self, num_layers: int, image_length: int, d_model: int, norm_eps: float,
               init_std: float, *, rngs: nnx.Rngs):
    self.side = grid_side(image_length)
    self.layers = nnx.List([StemLayer(d_model, norm_eps, init_std, rngs=rngs)
                            for _ in range(num_layers)])

  def __call__(self, image: jax.Array, dtype) -> jax.Array:
    """image (B, image_length, d) embeddings in raster order -> the same shape."""
    batch, length, width = image.shape
    grid = image.reshape(batch, self.side, self.side, width)
    for layer in self.layers:
      grid = layer(grid, dtype)
    return grid.reshape(batch, length, width)
