"""The PyTorch baseline of the benchmarks: the MeDiM backbone written by hand in torch.

The same model as ``models/transformer.py`` (Gemma numerics: (1 + w) RMSNorm in float32, half-split
RoPE, multi-head attention with a key-padding mask only, GeGLU with tanh GELU, sqrt(d) embedding
scale, sinusoidal timestep MLP, AdaLN-zero modulation in every block, segment markers, optional
learned positions, LM head tied to the embedding), the same parameter count, and weights that can
be copied from our params (``load_jax_params``), so the two compute the same function.

The training step is what a PyTorch user would run: ``torch.optim.AdamW`` after clipping the global
gradient norm, on a masked-diffusion loss of the same shape as ours (every valid position masked
with probability t, cross-entropy of the masked positions restricted to their modality's ids,
weighted 1/t, averaged over the noised positions). It leaves out our task mix (which positions stay
clean), a difference of a few elementwise ops per step.

Torch is a bench-only dependency: nothing outside ``medim_jax/bench/`` imports this module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medim_jax.models.transformer import TransformerConfig
from medim_jax.tokenizers.vocab import TokenLayout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RMSNorm(nn.Module):
  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.scale = nn.Parameter(torch.zeros(dim))

  def forward(self, x):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
    return (normed * (1.0 + self.scale)).to(x.dtype)


def normal_linear(in_features: int, out_features: int, std: float, bias: bool = False) -> nn.Linear:
  """A Linear initialised like our Dense: N(0, std) weight, zero bias."""
  layer = nn.Linear(in_features, out_features, bias=bias)
  nn.init.normal_(layer.weight, std=std)
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def rotary_tables(length: int, head_dim: int, base: float):
  """cos, sin of shape (1, 1, L, D) for the half-split convention (HF Gemma/Llama)."""
  inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
  angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
  angles = torch.cat([angles, angles], dim=-1)
  return angles.cos()[None, None], angles.sin()[None, None]


def apply_rotary(x, cos, sin):
  """x: (B, H, L, D)."""
  first, second = x.float().chunk(2, dim=-1)
  rotated = torch.cat([-second, first], dim=-1)
  return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
  def __init__(self, cfg: TransformerConfig):
    super().__init__()
    self.cfg = cfg
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = normal_linear(d, h * hd, cfg.init_std)
    self.k = normal_linear(d, kv * hd, cfg.init_std)
    self.v = normal_linear(d, kv * hd, cfg.init_std)
    self.o = normal_linear(h * hd, d, cfg.init_std)

  def forward(self, x, cos, sin, attn_mask):
    cfg = self.cfg
    batch, length, _ = x.shape
    heads = lambda y, n: y.view(batch, length, n, cfg.head_dim).transpose(1, 2)
    q = apply_rotary(heads(self.q(x), cfg.num_heads), cos, sin)
    k = apply_rotary(heads(self.k(x), cfg.num_kv_heads), cos, sin)
    v = heads(self.v(x), cfg.num_kv_heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                         enable_gqa=cfg.num_kv_heads != cfg.num_heads)
    return self.o(out.transpose(1, 2).reshape(batch, length, cfg.num_heads * cfg.head_dim))


class GeGLU(nn.Module):
  def __init__(self, cfg: TransformerConfig):
    super().__init__()
    self.gate = normal_linear(cfg.d_model, cfg.mlp_dim, cfg.init_std)
    self.up = normal_linear(cfg.d_model, cfg.mlp_dim, cfg.init_std)
    self.down = normal_linear(cfg.mlp_dim, cfg.d_model, cfg.init_std)

  def forward(self, x):
    return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class Block(nn.Module):
  def __init__(self, cfg: TransformerConfig):
    super().__init__()
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = GeGLU(cfg)
    # AdaLN-zero: one projection to 6 chunks (shift, scale, gate for attention, then for the MLP).
    self.adaln = nn.Linear(cfg.d_model, 6 * cfg.d_model)
    nn.init.zeros_(self.adaln.weight)
    nn.init.zeros_(self.adaln.bias)
    if cfg.adaln_gate_init == "open":
      with torch.no_grad():
        self.adaln.bias.view(6, cfg.d_model)[[2, 5]] = 1.0

  def forward(self, x, cond, cos, sin, attn_mask):
    chunks = self.adaln(cond).view(cond.shape[0], 6, 1, -1).unbind(1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = chunks
    h = x + gate_a * self.attn(self.attn_norm(x) * (1 + scale_a) + shift_a, cos, sin, attn_mask)
    return h + gate_m * self.mlp(self.mlp_norm(h) * (1 + scale_m) + shift_m)


class TimestepEmbedder(nn.Module):
  def __init__(self, cfg: TransformerConfig):
    super().__init__()
    self.cfg = cfg
    self.fc1 = normal_linear(cfg.time_frequency_dim, cfg.d_model, cfg.init_std, bias=True)
    self.fc2 = normal_linear(cfg.d_model, cfg.d_model, cfg.init_std, bias=True)

  def forward(self, sigma):
    cfg, half = self.cfg, self.cfg.time_frequency_dim // 2
    freqs = torch.exp(-math.log(cfg.time_max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = (sigma.float() * cfg.time_scale)[:, None] * freqs[None, :]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return self.fc2(F.silu(self.fc1(emb)))


class MeDiMTorch(nn.Module):
  """Noisy tokens (B, L) + sigma (B,) -> float32 logits (B, L, V), as ``MeDiMTransformer``."""

  def __init__(self, cfg: TransformerConfig):
    super().__init__()
    if not cfg.tie_embeddings:
      raise ValueError("the torch baseline implements the tied LM head only")
    self.cfg = cfg
    self.embedding = nn.Parameter(cfg.init_std * torch.randn(cfg.vocab_size, cfg.d_model))
    self.time_embedder = TimestepEmbedder(cfg)
    self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
    num_markers = len(cfg.segment_lengths)
    self.markers = (nn.Parameter(cfg.init_std * torch.randn(num_markers, cfg.d_model))
                    if num_markers else None)
    self.positions = (nn.Parameter(cfg.init_std * torch.randn(cfg.learned_positions, cfg.d_model))
                      if cfg.learned_positions else None)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

  def _insert_markers(self, x, key_mask):
    scale = math.sqrt(self.cfg.d_model)
    batch, pieces, mask_pieces, start = x.shape[0], [], [], 0
    for i, length in enumerate(self.cfg.segment_lengths):
      pieces += [(self.markers[i] * scale).to(x.dtype).expand(batch, 1, -1), x[:, start:start + length]]
      mask_pieces += [key_mask.new_ones(batch, 1), key_mask[:, start:start + length]]
      start += length
    return torch.cat(pieces, 1), torch.cat(mask_pieces, 1)

  def _remove_markers(self, x):
    keep, start = [], 0
    for length in self.cfg.segment_lengths:
      keep.append(x[:, start + 1:start + 1 + length])
      start += 1 + length
    return torch.cat(keep, 1)

  def forward(self, tokens, sigma, key_mask):
    cfg = self.cfg
    cond = self.time_embedder(sigma)
    x = self.embedding[tokens] * math.sqrt(cfg.d_model)
    if self.markers is not None:
      x, key_mask = self._insert_markers(x, key_mask)
    if self.positions is not None:
      x = x + self.positions * math.sqrt(cfg.d_model)
    cos, sin = rotary_tables(x.shape[1], cfg.head_dim, cfg.rope_base)
    attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, L): which keys every query may attend to
    for block in self.blocks:
      x = block(x, cond, cos, sin, attn_mask)
    if self.markers is not None:
      x = self._remove_markers(x)
    return (self.final_norm(x) @ self.embedding.to(x.dtype).T).float()


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def load_jax_params(model: MeDiMTorch, params) -> None:
  """Copy a pure dict of our params (``Model.init``) into the torch module, in place."""
  cfg = model.cfg
  if cfg.scan_layers:
    raise ValueError("load_jax_params reads one params entry per block, not scan_layers' stack")
  as_torch = lambda a: torch.from_numpy(np.array(a, np.float32))

  def weight(kernel, in_features):
    """Our kernels are (in, ...out axes); a torch Linear's weight is (out, in)."""
    return as_torch(np.asarray(kernel).reshape(in_features, -1)).T

  with torch.no_grad():
    model.embedding.copy_(as_torch(params["embedding"]))
    for name in ("fc1", "fc2"):
      layer, p = getattr(model.time_embedder, name), params["time_embedder"][name]
      layer.weight.copy_(weight(p["kernel"], layer.in_features))
      layer.bias.copy_(as_torch(p["bias"]))
    if model.markers is not None:
      model.markers.copy_(as_torch(params["markers"]))
    if model.positions is not None:
      model.positions.copy_(as_torch(params["positions"]))
    model.final_norm.scale.copy_(as_torch(params["final_norm"]["scale"]))
    for index, block in enumerate(model.blocks):
      p = params["blocks"][index]
      block.attn_norm.scale.copy_(as_torch(p["attn_norm"]["scale"]))
      block.mlp_norm.scale.copy_(as_torch(p["mlp_norm"]["scale"]))
      for name in ("q", "k", "v", "o"):
        layer = getattr(block.attn, name)
        layer.weight.copy_(weight(p["attn"][name], layer.in_features))
      for name in ("gate", "up", "down"):
        layer = getattr(block.mlp, name)
        layer.weight.copy_(weight(p["mlp"][name]["kernel"], layer.in_features))
      block.adaln.weight.copy_(weight(p["adaln"]["kernel"], cfg.d_model))
      block.adaln.bias.copy_(as_torch(p["adaln"]["bias"]).reshape(-1))


class TorchTrainer:
  """The baseline's training step: masked-diffusion loss, clip to a global norm, AdamW."""

  def __init__(self, cfg: TransformerConfig, layout: TokenLayout, train_config, eps: float = 1e-3,
               seed: int = 0, fused_adamw: bool = True):
    torch.manual_seed(seed)
    self.model = MeDiMTorch(cfg)
    self.layout, self.eps = layout, eps
    self.autocast_dtype = None if cfg.dtype == "float32" else _DTYPES[cfg.dtype]
    self.grad_clip_norm = train_config.grad_clip_norm
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(), lr=train_config.learning_rate, betas=(train_config.b1, train_config.b2),
        eps=train_config.adam_eps, weight_decay=train_config.weight_decay, fused=fused_adamw)
    lo, hi = layout.allowed_id_range()
    ids = np.arange(layout.vocab_size)[None, :]
    self.allowed = torch.from_numpy((ids >= lo[:, None]) & (ids < hi[:, None]))  # (L, V)
    self.generator = torch.Generator().manual_seed(seed)

  def loss(self, tokens, valid):
    batch = tokens.shape[0]
    # Stratified times in [1e-3, 1] and the log-linear schedule, as in our training step.
    u = (torch.rand(batch, generator=self.generator) + torch.arange(batch)) / batch
    t = 1e-3 + (1.0 - 1e-3) * u
    mask_rate = (1.0 - self.eps) * t
    masked = valid & (torch.rand(tokens.shape, generator=self.generator) < mask_rate[:, None])
    noisy = torch.where(masked, self.layout.mask_id, tokens)
    sigma = -torch.log1p(-mask_rate)
    with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                        enabled=self.autocast_dtype is not None):
      logits = self.model(noisy, sigma, valid)
    log_probs = torch.where(self.allowed[None], logits.float(), -1e9).log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[..., None])[..., 0]
    weighted = nll * (1.0 / t)[:, None] * masked
    return weighted.sum() / valid.sum().clamp(min=1)

  def train_step(self, tokens, valid) -> torch.Tensor:
    loss = self.loss(tokens, valid)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    return loss.detach()
