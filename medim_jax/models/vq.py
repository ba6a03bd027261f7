"""A VQGAN image tokenizer in Flax NNX: convolutional encoder, vector quantiser, decoder.

The architecture and the parameter names follow the taming-transformers VQGAN that the Chameleon
tokenizer uses (``encoder.down[i].block[j].norm1`` ...), with the options of the LlamaGen VQ
tokenizers (l2-normalised low-dimensional codes, attention only at chosen levels), so converted
PyTorch weights load one to one (``medim_jax/convert/vq_checkpoint.py``). Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class VQConfig:
  channels: int = 64                   # width of the first level ("ch")
  channel_mult: tuple = (1, 2, 2, 4)   # per level; each level after the first halves the size
  num_res_blocks: int = 1
  attention_levels: tuple = ()         # levels whose res blocks are followed by self-attention
  mid_attention: bool = True
  z_channels: int = 64
  embed_dim: int = 8                   # code vector size
  codebook_size: int = 512
  l2_normalize: bool = True            # LlamaGen: cosine-similarity codes
  commitment_beta: float = 0.25
  num_groups: int = 32
  in_channels: int = 3

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  @classmethod
  def from_config(cls, vq_cfg) -> "VQConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vq_cfg.items() if k in fields}
    for key in ("channel_mult", "attention_levels"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)


# The published tokenizers MeDiM builds on, as VQConfigs (weights load through the converter).
CHAMELEON = VQConfig(channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                     attention_levels=(), z_channels=256, embed_dim=256, codebook_size=8192,
                     l2_normalize=False)
LLAMAGEN_DS16 = VQConfig(channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                         attention_levels=(4,), z_channels=256, embed_dim=8, codebook_size=16384,
                         l2_normalize=True)
LLAMAGEN_DS8 = dataclasses.replace(LLAMAGEN_DS16, channel_mult=(1, 2, 2, 4), attention_levels=(3,))


def swish(x):
  return x * jax.nn.sigmoid(x)


def conv(cin, cout, kernel, rngs, stride=1, padding="SAME"):
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, rngs=rngs)


class ResnetBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, num_groups=min(groups, cin), epsilon=1e-6, rngs=rngs)
    self.conv1 = conv(cin, cout, 3, rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=min(groups, cout), epsilon=1e-6, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, rngs)
    self.nin_shortcut = conv(cin, cout, 1, rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions of a feature map (1x1-conv projections)."""

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(channels, num_groups=min(groups, channels), epsilon=1e-6, rngs=rngs)
    self.q, self.k, self.v = (conv(channels, channels, 1, rngs) for _ in range(3))
    self.proj_out = conv(channels, channels, 1, rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm(x)
    q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * c ** -0.5, axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class Level(nnx.Module):
  """One resolution level: res blocks (each optionally followed by attention) and a resampler."""

  def __init__(self, cin, cout, count, attention, groups, resample, *, rngs):
    self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs)
                           for i in range(count)])
    self.attn = nnx.List([AttnBlock(cout, groups, rngs=rngs) for _ in range(count)] if attention
                         else [])
    if resample == "down":  # taming pads right/bottom by one, then a stride-2 3x3 conv
      self.downsample = conv(cout, cout, 3, rngs, stride=2, padding=((0, 1), (0, 1)))
    elif resample == "up":
      self.upsample = conv(cout, cout, 3, rngs)
    self.resample = resample

  def __call__(self, x):
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    if self.resample == "down":
      x = self.downsample(x)
    elif self.resample == "up":
      b, h, w, c = x.shape
      x = self.upsample(jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest"))
    return x


class Mid(nnx.Module):

  def __init__(self, channels, groups, attention, *, rngs):
    self.block_1 = ResnetBlock(channels, channels, groups, rngs=rngs)
    self.attn_1 = AttnBlock(channels, groups, rngs=rngs) if attention else None
    self.block_2 = ResnetBlock(channels, channels, groups, rngs=rngs)

  def __call__(self, x):
    x = self.block_1(x)
    if self.attn_1 is not None:
      x = self.attn_1(x)
    return self.block_2(x)


class Encoder(nnx.Module):

  def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
    widths = [cfg.channels * m for m in cfg.channel_mult]
    last = len(widths) - 1
    self.conv_in = conv(cfg.in_channels, cfg.channels, 3, rngs)
    self.down = nnx.List([
        Level(cfg.channels if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks,
              i in cfg.attention_levels, cfg.num_groups, "down" if i < last else None, rngs=rngs)
        for i in range(len(widths))])
    self.mid = Mid(widths[-1], cfg.num_groups, cfg.mid_attention, rngs=rngs)
    self.norm_out = nnx.GroupNorm(widths[-1], num_groups=min(cfg.num_groups, widths[-1]),
                                  epsilon=1e-6, rngs=rngs)
    self.conv_out = conv(widths[-1], cfg.z_channels, 3, rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down:
      x = level(x)
    return self.conv_out(swish(self.norm_out(self.mid(x))))


class Decoder(nnx.Module):
  """``up[i]`` works at the resolution of encoder level i and runs from the coarsest (taming order)."""

  def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
    widths = [cfg.channels * m for m in cfg.channel_mult]
    self.conv_in = conv(cfg.z_channels, widths[-1], 3, rngs)
    self.mid = Mid(widths[-1], cfg.num_groups, cfg.mid_attention, rngs=rngs)
    self.up = nnx.List([
        Level(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1,
              i in cfg.attention_levels, cfg.num_groups, "up" if i > 0 else None, rngs=rngs)
        for i in range(len(widths))])
    self.norm_out = nnx.GroupNorm(widths[0], num_groups=min(cfg.num_groups, widths[0]),
                                  epsilon=1e-6, rngs=rngs)
    self.conv_out = conv(widths[0], cfg.in_channels, 3, rngs)

  def __call__(self, z):
    x = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      x = level(x)
    return self.conv_out(swish(self.norm_out(x)))


def l2_normalize(x, eps: float = 1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class Quantizer(nnx.Module):
  """Nearest-code lookup with the straight-through gradient; codebook and commitment losses."""

  def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
    scale = 1.0 / cfg.codebook_size
    self.embedding = nnx.Param(jax.random.uniform(rngs.params(), (cfg.codebook_size, cfg.embed_dim),
                                                  jnp.float32, -scale, scale))
    self.l2, self.beta = cfg.l2_normalize, cfg.commitment_beta

  def codebook(self):
    codes = self.embedding[...]
    return l2_normalize(codes) if self.l2 else codes

  def lookup(self, indices):
    return self.codebook()[indices]

  def nearest(self, z):
    """z (..., D) -> code indices (...), comparing in the codebook's space."""
    codes = self.codebook()
    z = l2_normalize(z) if self.l2 else z
    distance = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ codes.T
                + jnp.sum(codes * codes, -1))
    return jnp.argmin(distance, axis=-1)

  def __call__(self, z):
    """z (B, h, w, D) -> (straight-through quantised z, indices, losses)."""
    z = l2_normalize(z) if self.l2 else z
    indices = self.nearest(z)
    quantised = self.lookup(indices)
    losses = {"codebook_loss": jnp.mean((quantised - jax.lax.stop_gradient(z)) ** 2),
              "commitment_loss": self.beta * jnp.mean((jax.lax.stop_gradient(quantised) - z) ** 2)}
    return z + jax.lax.stop_gradient(quantised - z), indices, losses


class VQModel(nnx.Module):

  def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = conv(cfg.z_channels, cfg.embed_dim, 1, rngs)
    self.quantize = Quantizer(cfg, rngs=rngs)
    self.post_quant_conv = conv(cfg.embed_dim, cfg.z_channels, 1, rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def encode_latents(self, images):
    return self.quant_conv(self.encoder(images))

  def encode(self, images):
    """(B, H, W, 3) in [-1, 1] -> (B, H/f, W/f) code indices."""
    return self.quantize.nearest(self.encode_latents(images))

  def decode_latents(self, quantised):
    return self.decoder(self.post_quant_conv(quantised))

  def decode(self, indices):
    """(B, h, w) code indices -> (B, h*f, w*f, 3) images in about [-1, 1]."""
    return self.decode_latents(self.quantize.lookup(indices))

  def __call__(self, images):
    """Reconstruction, code indices, quantiser losses, and the pre-quantisation latents."""
    latents = self.encode_latents(images)
    quantised, indices, losses = self.quantize(latents)
    return self.decode_latents(quantised), indices, losses, latents
