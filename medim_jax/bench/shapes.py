"""The shapes the benchmarks run (demo, paper, paper_cpu, tiny), random batches of them, and
the model FLOPs of a step: every matmul, attention in full (it is bidirectional)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend
import ml_collections
import numpy as np

from configs import demo as demo_config, medim_liquid7b
from medim_jax.models import transformer
from medim_jax.tokenizers.vocab import TokenLayout
from medim_jax.training import train


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  config: ml_collections.ConfigDict
  layout: TokenLayout
  timed_steps: int      # per framework and round, unless --steps says otherwise
  note: str


# The paper's token space (shared/docs/REFERENCE.md): 32,003 text ids (Llama-2 + <boi> <eoi> <eos>),
# MASK, 8,192 Chameleon VQ codes; 256 report + 32x32 image tokens.
PAPER_LAYOUT = TokenLayout(text_vocab_size=32_003, image_vocab_size=8_192, text_length=256,
                           image_length=1_024)

# What of the paper's shape fits a 2-core CPU step in seconds: its sequence, vocabulary, head size
# and MLP ratio; 2 layers of width 512 instead of 10 of 3072; batch 1 instead of 8.
PAPER_CPU_MODEL = dict(num_layers=2, d_model=512, num_heads=2, num_kv_heads=2, head_dim=256,
                       mlp_dim=4096)


def build_shape(name: str, model_overrides: dict, batch_size: int | None = None,
                num_devices: int | None = None) -> Shape:
  """A named shape; ``model_overrides`` (e.g. dtype, attention_impl) replace config.model keys."""
  if name == "demo":
    config = demo_config.get_config()
    config.model.image_embedding_init = "random"  # no tokenizer here; speed does not depend on it
    tokens_per_side = config.data.image_size // config.data.patch_pixels
    layout = TokenLayout(text_vocab_size=config.data.text_vocab_size,
                         image_vocab_size=config.vq.codebook_size,
                         text_length=config.data.text_length, image_length=tokens_per_side ** 2)
    shape = Shape(name, config, layout, 10, "configs/demo.py as trained by `make demo`")
  elif name == "tiny":  # configs/demo.py:tiny, for tests of the benchmarks themselves
    config = demo_config.get_config("tiny")
    config.model.image_embedding_init = "random"
    layout = TokenLayout(text_vocab_size=config.data.text_vocab_size,
                         image_vocab_size=config.data.image_codebook_size,
                         text_length=config.data.text_length, image_length=16)
    shape = Shape(name, config, layout, 2, "configs/demo.py:tiny (tests)")
  elif name in ("paper", "paper_cpu"):
    config = medim_liquid7b.get_config()
    note = "configs/medim_liquid7b.py"
    if name == "paper_cpu":
      config.model.update(PAPER_CPU_MODEL)
      config.train.batch_size = 1
      note += (" scaled to a CPU: " + ", ".join(f"{k}={v}" for k, v in PAPER_CPU_MODEL.items())
               + ", batch 1 (paper: 10 layers, d_model 3072, 16 heads, mlp 24576, batch 8)")
    shape = Shape(name, config, PAPER_LAYOUT, 3 if name == "paper_cpu" else 10, note)
  else:
    raise ValueError(f"unknown shape {name!r}; choose from demo, paper, paper_cpu, tiny")
  with shape.config.unlocked():
    shape.config.model.update({k: v for k, v in model_overrides.items() if v is not None})
    if batch_size:
      shape.config.train.batch_size = batch_size
    if num_devices:
      shape.config.mesh.num_devices = num_devices
  return shape


def model_config(shape: Shape) -> transformer.TransformerConfig:
  return train.Model(shape.config, shape.layout).config


def random_batch(layout: TokenLayout, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as the pipeline yields it (no padding: the configs train on padding)."""
  rng = np.random.default_rng(seed)
  tokens = layout.join(rng.integers(0, layout.text_vocab_size, (batch_size, layout.text_length)),
                       rng.integers(0, layout.image_vocab_size, (batch_size, layout.image_length)))
  return {"tokens": tokens, "valid": np.ones(tokens.shape, bool),
          "prompt_length": np.full((batch_size,), 3, np.int32)}


def forward_flops(cfg: transformer.TransformerConfig, batch: int, length: int) -> dict[str, int]:
  """Matmul FLOPs of one forward pass over (batch, length) tokens, by part.

  The blocks see the segment markers too (length + #segments positions); the LM head only the
  content positions. Attention is counted in full: every query attends to every key.
  """
  d, heads, kv_heads, head_dim = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  seq = length + len(cfg.segment_lengths)
  projections = 2 * d * (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim * d
  mlp = 3 * 2 * d * cfg.mlp_dim
  attention = 2 * 2 * seq * seq * heads * head_dim            # QK^T and AV, per example
  conditioning = 2 * (cfg.time_frequency_dim * d + d * d) + cfg.num_layers * 2 * d * 6 * d
  return {
      "dense": batch * cfg.num_layers * seq * (projections + mlp),
      "attention": batch * cfg.num_layers * attention,
      "head": batch * length * 2 * d * cfg.vocab_size,
      "conditioning": batch * conditioning,
  }


def train_step_flops(cfg: transformer.TransformerConfig, batch: int, length: int) -> int:
  """Forward + backward: the backward pass computes two matmuls for every forward one."""
  return 3 * sum(forward_flops(cfg, batch, length).values())


def dot_equations(jaxpr, repeat: int = 1):
  """(equation, times it runs) for every dot_general in ``jaxpr``, nested calls, branches and scans
  included (a scan's body runs ``length`` times; a while loop's body is counted once)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn, repeat
    inner = repeat * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from dot_equations(sub.jaxpr, inner)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from dot_equations(sub, inner)


def jaxpr_matmul_flops(fn, *args) -> int:
  """FLOPs of every dot_general in ``fn``'s jaxpr (``dot_equations``): a check of
  ``forward_flops`` against what the program actually multiplies."""
  total = 0
  for eqn, repeat in dot_equations(jax.make_jaxpr(fn)(*args).jaxpr):
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    total += repeat * 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
  return total
