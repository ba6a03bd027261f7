"""The MeDiM backbone: a Gemma-style transformer with full (non-causal) attention and AdaLN-zero.

The model maps noisy tokens x_t (B, L) and the noise level sigma(t) (B,) to float32 logits over
the joint vocabulary (B, L, V). Restricting those logits per position (text slots -> text ids,
image slots -> image ids, never MASK) is the job of ``diffusion.loss.restrict_logits``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from medim_jax.models import attention, conditioning, image_stem, layers

# xla: models/attention.py, einsums with f32 softmax and a hand-written backward (any backend);
# jax_dot_product: jax.nn.dot_product_attention, which picks cuDNN flash attention on GPU where it
# can; splash: the Pallas TPU kernel (models/splash.py).
ATTENTION_IMPLS = ("xla", "jax_dot_product", "splash")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a block keeps for the backward pass (the rest is recomputed): "none" keeps everything,
# "full" only the block's input, "dots" the matmul results (recomputing norms and activations).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  time_frequency_dim: int = 256
  time_max_period: float = 10_000.0
  time_scale: float = 1.0
  tie_embeddings: bool = True
  adaln_gate_init: str = "zero"
  init_std: float = 0.02
  dtype: str = "float32"
  # The residual stream's and the elementwise work's dtype ("" = dtype): "float32" with a bfloat16
  # dtype keeps only the matmul operands in bfloat16 (faster on a CPU, whose bfloat16 elementwise
  # work is converted to float32 and back; on an accelerator it doubles the activations' memory).
  activation_dtype: str = ""
  attention_impl: str = "xla"
  remat_policy: str = "none"
  # One block traced and compiled once, run num_layers times by lax.scan over stacked weights
  # (params["blocks"] leaves get a leading layer axis); compiles in constant time in depth.
  scan_layers: bool = False
  # Lengths of the sequence's segments (report, image). When set, a learned marker token is put
  # before each segment: with rotary (relative) positions only, a fixed anchor is what lets a
  # bidirectional model know where in the image a position is (the original's <boi>/<eoi> do this).
  segment_lengths: tuple[int, ...] = ()
  # > 0 adds a learned absolute position embedding over that many positions (markers included).
  # Off for a pretrained Gemma backbone (it has none); a model trained from scratch learns image
  # geometry much faster with it than from rotary offsets to the markers alone.
  learned_positions: int = 0
  # > 0 adds a finding head: that many logits per position from the final hidden states, trained
  # by the auxiliary finding loss (diffusion/loss.py) where the data has labels. Not in the original.
  num_findings: int = 0
  # > 0: that many residual 3x3 conv layers over the image segment's token grid before the blocks
  # (models/image_stem.py). ``image_segment`` (start, length): where the image is in the tokens.
  image_conv_layers: int = 0
  image_segment: tuple[int, int] = ()
  # Training only: the chance that an element of each block's attention and MLP output is zeroed
  # (inverted dropout, before the AdaLN gate) when ``hidden`` gets a dropout key. Not in the
  # original; a regulariser for a model trained from scratch on few reports.
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.dtype not in _DTYPES:
      raise ValueError(f"model dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.activation_dtype not in ("", *_DTYPES):
      raise ValueError(f"model activation_dtype must be '' (the dtype) or one of {sorted(_DTYPES)}, "
                       f"got {self.activation_dtype!r}")
    if self.remat_policy != "none" and self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be 'none' or one of {sorted(REMAT_POLICIES)}, got "
                       f"{self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.image_conv_layers and len(self.image_segment) != 2:
      raise ValueError("image_conv_layers > 0 needs image_segment (start, length) of the image tokens")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

  @classmethod
  def from_config(cls, model_config, vocab_size: int,
                  segment_lengths: tuple[int, ...]) -> "TransformerConfig":
    derived = {"vocab_size", "segment_lengths", "learned_positions", "num_findings", "image_segment"}
    fields = {f.name for f in dataclasses.fields(cls)} - derived
    segments = tuple(segment_lengths) if model_config.segment_markers else ()
    length = sum(segment_lengths) + len(segments)
    return cls(vocab_size=vocab_size, segment_lengths=segments,
               learned_positions=length if model_config.learned_position_embedding else 0,
               num_findings=len(finding_names(model_config)),
               image_segment=(sum(segment_lengths[:-1]), segment_lengths[-1]),
               **{k: model_config[k] for k in fields if k in model_config})

  @property
  def compute_dtype(self):
    """The matmul operands' dtype."""
    return _DTYPES[self.dtype]

  @property
  def activations(self):
    """The residual stream's dtype."""
    return _DTYPES[self.activation_dtype or self.dtype]


class Attention(nnx.Module):
  """Multi-head attention (grouped KV heads optional), RoPE, float32 softmax, key-padding mask only."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q = layers.normal_param(rngs, (d, h, hd), cfg.init_std, ("embed", "heads", "head_dim"))
    self.k = layers.normal_param(rngs, (d, kv, hd), cfg.init_std, ("embed", "kv_heads", "head_dim"))
    self.v = layers.normal_param(rngs, (d, kv, hd), cfg.init_std, ("embed", "kv_heads", "head_dim"))
    self.o = layers.normal_param(rngs, (h, hd, d), cfg.init_std, ("heads", "head_dim", "embed"))

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    return self.attend(x, positions, key_mask)[0]

  def attend(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array | None,
             context: tuple[jax.Array, jax.Array] | None = None):
    """(output, (k, v) of x's positions, rotated). ``context``: keys and values (B, S, K, D) of
    positions outside x, already rotated, attended beside x's own (the sampler's condition cache;
    no key mask then)."""
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    q = layers.contract(x, self.q[...].astype(dtype))  # q, k, v in the activations' dtype
    k = layers.contract(x, self.k[...].astype(dtype))
    v = layers.contract(x, self.v[...].astype(dtype))
    q = layers.rotary_embedding(q, positions, cfg.rope_base)
    k = layers.rotary_embedding(k, positions, cfg.rope_base)
    own = (k, v)
    if context is not None:
      if key_mask is not None:
        raise ValueError("attention with a context of cached keys takes no key mask")
      k = jnp.concatenate([context[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([context[1].astype(v.dtype), v], axis=1)
    q, k, v = (a.astype(dtype) for a in (q, k, v))  # the kernel's matmuls in the compute dtype
    if cfg.attention_impl == "jax_dot_product":
      mask = None if key_mask is None else key_mask[:, None, None, :]
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    elif cfg.attention_impl == "splash":
      from medim_jax.models import splash
      out = splash.splash_attention(q, k, v, key_mask)
    else:
      out = attention.attention(q, k, v, key_mask)
    return layers.contract(out.astype(x.dtype), self.o[...].astype(dtype), axes=2), own


class GeGLU(nnx.Module):
  """``down(gelu_tanh(gate(x)) * up(x))`` without biases."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.gate = layers.Dense(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg.init_std, rngs=rngs)
    self.up = layers.Dense(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg.init_std, rngs=rngs)
    self.down = layers.Dense(cfg.mlp_dim, cfg.d_model, ("mlp", "embed"), cfg.init_std, rngs=rngs)

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    return self.down(jax.nn.gelu(self.gate(x, dtype), approximate=True) * self.up(x, dtype), dtype)


class Block(nnx.Module):
  """``h = x + g_a * Attn(norm(x)(1+s_a)+b_a)``; ``y = h + g_m * MLP(norm(h)(1+s_m)+b_m)``."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = GeGLU(cfg, rngs=rngs)
    self.adaln = conditioning.AdaLNModulation(cfg.d_model, cfg.adaln_gate_init, rngs=rngs)

  def __call__(self, x, cond, positions, key_mask):
    return self.run(x, cond, positions, key_mask)[0]

  def run(self, x, cond, positions, key_mask, context=None, dropout_key=None):
    """(output, (k, v) of x's positions); ``context`` as in ``Attention.attend``; ``dropout_key``:
    drop elements of the attention and MLP outputs at cfg.dropout_rate (training)."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(cond, self.cfg.activations)
    attended, kv = self.attn.attend(self.attn_norm(x) * (1 + scale_a) + shift_a, positions, key_mask,
                                    context)
    mlp_key = None
    if dropout_key is not None:
      attention_key, mlp_key = jax.random.split(dropout_key)
      attended = _dropout(attended, self.cfg.dropout_rate, attention_key)
    h = x + gate_a * attended
    mlp_out = self.mlp(self.mlp_norm(h) * (1 + scale_m) + shift_m, self.cfg.compute_dtype)
    if mlp_key is not None:
      mlp_out = _dropout(mlp_out, self.cfg.dropout_rate, mlp_key)
    return h + gate_m * mlp_out, kv


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout: each element zeroed with probability ``rate``, the rest scaled by 1/(1-rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def finding_names(model_config) -> tuple[str, ...]:
  """config.model.finding_names ("a,b,c") as a tuple; empty: no finding head."""
  return tuple(n.strip() for n in model_config.get("finding_names", "").split(",") if n.strip())


class MeDiMTransformer(nnx.Module):
  """Noisy tokens (B, L) + sigma (B,) -> float32 logits (B, L, vocab_size); with a finding head,
  ``findings(hidden(...))`` gives (B, L, num_findings) finding logits from the same pass."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = layers.normal_param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std,
                                         ("vocab", "embed"))
    self.time_embedder = conditioning.TimestepEmbedder(
        cfg.d_model, cfg.time_frequency_dim, cfg.time_max_period, cfg.time_scale, cfg.init_std,
        rngs=rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked_blocks(rngs):
        return Block(cfg, rngs=rngs)
      self.blocks = stacked_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.markers = (layers.normal_param(rngs, (len(cfg.segment_lengths), cfg.d_model), cfg.init_std,
                                        ("segment", "embed")) if cfg.segment_lengths else None)
    self.positions = (layers.normal_param(rngs, (cfg.learned_positions, cfg.d_model), cfg.init_std,
                                          ("length", "embed")) if cfg.learned_positions else None)
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps)
    self.lm_head = (None if cfg.tie_embeddings else
                    layers.normal_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std,
                                        ("embed", "vocab")))
    self.finding_head = (layers.normal_param(rngs, (cfg.d_model, cfg.num_findings), cfg.init_std,
                                             ("embed", "findings")) if cfg.num_findings else None)
    self.image_stem = (image_stem.ImageConvStem(cfg.image_conv_layers, cfg.image_segment[1],
                                                cfg.d_model, cfg.norm_eps, cfg.init_std, rngs=rngs)
                       if cfg.image_conv_layers else None)

  def embed(self, tokens: jax.Array) -> jax.Array:
    dtype = self.cfg.activations
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)
    return x * jnp.asarray(math.sqrt(self.cfg.d_model), dtype)

  def _insert_markers(self, x, key_mask):
    """[seg_0 | seg_1 | ...] -> [m_0 seg_0 | m_1 seg_1 | ...]; markers are always attended to."""
    if sum(self.cfg.segment_lengths) != x.shape[1]:
      raise ValueError(f"sequence length {x.shape[1]} does not match the model's segments "
                       f"{self.cfg.segment_lengths}")
    batch = x.shape[0]
    markers = self.markers[...].astype(x.dtype) * jnp.asarray(math.sqrt(self.cfg.d_model), x.dtype)
    pieces, mask_pieces, start = [], [], 0
    for i, length in enumerate(self.cfg.segment_lengths):
      pieces += [jnp.broadcast_to(markers[i], (batch, 1, x.shape[2])), x[:, start:start + length]]
      if key_mask is not None:
        mask_pieces += [jnp.ones((batch, 1), bool), key_mask[:, start:start + length]]
      start += length
    return jnp.concatenate(pieces, 1), (jnp.concatenate(mask_pieces, 1) if key_mask is not None else None)

  def _remove_markers(self, x):
    keep, start = [], 0
    for length in self.cfg.segment_lengths:
      keep.append(x[:, start + 1:start + 1 + length])
      start += 1 + length
    return jnp.concatenate(keep, 1)

  def __call__(self, tokens: jax.Array, sigma: jax.Array,
               key_mask: jax.Array | None = None) -> jax.Array:
    """tokens (B, L) int, sigma (B,) float, key_mask (B, L) bool of keys to attend (None: all)."""
    return self.logits(self.hidden(tokens, sigma, key_mask))

  def logits(self, hidden: jax.Array, ids: tuple[int, int] | None = None) -> jax.Array:
    """(..., d_model) -> float32 logits over the whole vocabulary, or over ids [lo, hi) only
    (``ids=(lo, hi)``: what the loss needs of a segment whose positions hold only those ids)."""
    dtype = self.cfg.compute_dtype
    lo, hi = (0, self.cfg.vocab_size) if ids is None else ids
    flat = hidden.reshape(-1, hidden.shape[-1])
    if self.lm_head is None:
      # Against the (V, d) embedding as stored: no transposed copy of it, nor of the
      # (tokens, V) logits gradient in the backward pass.
      weight, transpose = self.embedding[...][lo:hi].astype(dtype), True
    else:
      weight, transpose = self.lm_head[...][:, lo:hi].astype(dtype), False
    out = layers.matmul(flat, weight, transpose, jnp.float32)
    return out.reshape(*hidden.shape[:-1], out.shape[-1])

  def findings(self, hidden: jax.Array) -> jax.Array:
    if self.finding_head is None:
      raise ValueError("this model has no finding head (config.model.finding_names is empty)")
    return jnp.dot(hidden, self.finding_head[...].astype(self.cfg.compute_dtype),
                   preferred_element_type=jnp.float32)

  def hidden(self, tokens: jax.Array, sigma: jax.Array, key_mask: jax.Array | None = None,
             dropout_key: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states (B, L, d_model) both heads read. ``dropout_key`` (training):
    dropout at cfg.dropout_rate in every block; None, or a rate of 0, runs without."""
    cond = self.time_embedder(sigma, self.cfg.compute_dtype)  # in float32 (the sinusoid's dtype)
    x, positions, key_mask = self._embed_sequence(tokens, key_mask)
    if self.cfg.dropout_rate == 0.0:
      dropout_key = None
    x, _ = self._run_blocks(x, cond, positions, key_mask, dropout_key=dropout_key)
    if self.markers is not None:
      x = self._remove_markers(x)
    return self.final_norm(x)

  # -- the sampler's condition cache --------------------------------------------------------------
  # While a sampler generates one segment (the query), the other (the condition) never changes; its
  # keys and values still do a little from step to step (they attend to the generated tokens and
  # see t through AdaLN), so reusing them is an approximation, refreshed as often as the sampler
  # says. Between refreshes only the query positions are computed.

  def hidden_and_context(self, tokens: jax.Array, sigma: jax.Array, query: tuple[int, int]):
    """``hidden(tokens, sigma)`` and the context of the query range ``tokens[:, query[0]:query[1]]``:
    per layer the rotated keys and values of every other position (segment markers included),
    stacked into (num_layers, B, S, kv_heads, head_dim) each."""
    start, stop = self._sequence_range(query)
    cond = self.time_embedder(sigma, self.cfg.compute_dtype)
    x, positions, _ = self._embed_sequence(tokens, None)
    outside = lambda a: jnp.concatenate([a[:, :start], a[:, stop:]], axis=1)
    x, context = self._run_blocks(x, cond, positions, None, keep=lambda kv: jax.tree.map(outside, kv))
    if self.markers is not None:
      x = self._remove_markers(x)
    return self.final_norm(x), context

  def query_hidden(self, tokens: jax.Array, sigma: jax.Array, query: tuple[int, int],
                   context) -> jax.Array:
    """Hidden states (B, stop - start, d_model) of the query range only, its positions attending to
    each other and to ``context`` (from ``hidden_and_context``) for the rest of the sequence. With a
    context computed from the same tokens and sigma this equals ``hidden(...)[:, start:stop]``."""
    dtype = self.cfg.compute_dtype
    start, stop = self._sequence_range(query)
    cond = self.time_embedder(sigma, dtype)
    x = self._embed_tokens(tokens[:, query[0]:query[1]], query[0])
    if self.positions is not None:
      x = x + self._position_embedding(start, stop)
    x, _ = self._run_blocks(x, cond, jnp.arange(start, stop), None, context=context)
    return self.final_norm(x)

  def _sequence_range(self, query: tuple[int, int]) -> tuple[int, int]:
    """A token range's positions in the sequence the blocks see (segment markers inserted)."""
    start, stop = query
    if not 0 <= start < stop:
      raise ValueError(f"query range {query} is empty or negative")
    segment_start = 0
    for i, length in enumerate(self.cfg.segment_lengths):
      if segment_start <= start and stop <= segment_start + length:
        return start + i + 1, stop + i + 1
      segment_start += length
    if self.cfg.segment_lengths:
      raise ValueError(f"query range {query} is not within one of the segments "
                       f"{self.cfg.segment_lengths}")
    return start, stop

  def _embed_tokens(self, tokens: jax.Array, start: int = 0) -> jax.Array:
    """Embeddings of ``tokens`` (B, n), the token range [start, start + n) of a row, through the
    image stem where the range holds the image; a range that cuts the image is refused."""
    x = self.embed(tokens)
    if self.image_stem is None:
      return x
    image_start, image_length = self.cfg.image_segment
    stop, image_stop = start + tokens.shape[1], image_start + image_length
    if stop <= image_start or start >= image_stop:
      return x
    if start > image_start or stop < image_stop:
      raise ValueError(f"tokens [{start}, {stop}) cut the image segment [{image_start}, "
                       f"{image_stop}), which the image stem needs whole")
    lo, hi = image_start - start, image_stop - start
    image = self.image_stem(x[:, lo:hi], self.cfg.compute_dtype)
    return jnp.concatenate([x[:, :lo], image, x[:, hi:]], axis=1)

  def _embed_sequence(self, tokens, key_mask):
    """Token embeddings with the segment markers and learned positions: (x, positions, key_mask)."""
    x = self._embed_tokens(tokens)
    if self.markers is not None:
      x, key_mask = self._insert_markers(x, key_mask)
    positions = jnp.arange(x.shape[1])
    if self.positions is not None:
      if x.shape[1] != self.cfg.learned_positions:
        raise ValueError(f"sequence of {x.shape[1]} positions; the position embedding has "
                         f"{self.cfg.learned_positions}")
      x = x + self._position_embedding(0, x.shape[1])
    return x, positions, key_mask

  def _position_embedding(self, start: int, stop: int) -> jax.Array:
    """The learned position embedding of sequence positions [start, stop), (1, stop - start, d)."""
    scaled = self.positions[...][start:stop] * math.sqrt(self.cfg.d_model)
    return scaled.astype(self.cfg.activations)[None]

  def _run_blocks(self, x, cond, positions, key_mask, context=None, keep=None, dropout_key=None):
    """The blocks over x: (x, what ``keep`` takes of each layer's (k, v), stacked over layers, or
    None). ``context``: per layer (stacked) keys/values of positions outside x; ``dropout_key``:
    split into one key per layer."""
    def run_block(block, x, cond, positions, key_mask, layer_context, layer_key):
      x, kv = block.run(x, cond, positions, key_mask, layer_context, layer_key)
      return x, (keep(kv) if keep else None)

    layer_keys = (None if dropout_key is None else
                  jax.random.split(dropout_key, self.cfg.num_layers))
    if self.cfg.remat_policy != "none":
      run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.cfg.remat_policy])
    if self.cfg.scan_layers:
      context_axis = None if context is None else 0
      key_axis = None if layer_keys is None else 0
      scanned = nnx.scan(run_block, in_axes=(0, nnx.Carry, None, None, None, context_axis, key_axis),
                         out_axes=(nnx.Carry, 0))
      return scanned(self.blocks, x, cond, positions, key_mask, context, layer_keys)
    kept = []
    for i, block in enumerate(self.blocks):
      layer_context = None if context is None else jax.tree.map(lambda a: a[i], context)
      layer_key = None if layer_keys is None else layer_keys[i]
      x, layer_kept = run_block(block, x, cond, positions, key_mask, layer_context, layer_key)
      kept.append(layer_kept)
    return x, (jax.tree.map(lambda *a: jnp.stack(a), *kept) if keep else None)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
