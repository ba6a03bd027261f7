"""Load a Hugging Face Gemma-7B / Liquid_V1_7B ``safetensors`` checkpoint into our parameters.

The checkpoint is a local directory with ``config.json`` and ``*.safetensors`` files (sharded ones
listed in ``model.safetensors.index.json``). Its first ``cfg.num_layers`` decoder layers, final norm
and token embedding become our params; everything the checkpoint does not have (AdaLN, the
timestep MLP, segment markers, learned positions) stays as our model initialises it.

Conventions (HF ``modeling_gemma.py``; checked against it by tests/test_hf_gemma.py):
  - ``nn.Linear`` stores (out, in) and computes ``x @ W.T``; our Dense kernels are (in, out): W.T.
  - q/k/v_proj (heads * head_dim, d) -> ours (d, heads, head_dim); o_proj (d, heads * head_dim) ->
    ours (heads, head_dim, d). Head h owns rows/columns [h * head_dim, (h + 1) * head_dim), and
    query head h reads KV head h // (heads / kv_heads), as our grouped reshape does.
  - RMSNorm weights are used as (1 + w) on both sides, so they are copied unchanged.
  - The LM head is tied to the embedding (Gemma's default); embeddings are scaled by sqrt(d) on
    both sides, so no weight absorbs it.

Embedding rows follow our joint vocabulary ``text | MASK | image`` (tokenizers/vocab.py): text row i
is checkpoint row i; image code c is checkpoint row ``image_token_offset + c`` when the checkpoint
has image rows (Liquid appends its 8,192 VQ codes after Gemma's 256,000 text tokens, so 256000);
the MASK row, image rows without an offset and text rows beyond the checkpoint's vocabulary are
drawn fresh from N(0, init_std^2), the same for a given seed whatever the sharding.

Nothing is materialised whole on one host: every array is built with
``jax.make_array_from_callback`` straight into its target sharding, and each callback reads only the
rows and columns its shard needs from the memory-mapped safetensors file (a shard split along
head_dim reads its heads' full head_dim and slices it in memory).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from medim_jax.convert.safetensors_files import Checkpoint
from medim_jax.errors import InputError
from medim_jax.models import transformer
from medim_jax.tokenizers.vocab import TokenLayout

CONFIG_FILE = "config.json"
# Activations computing tanh-approximate GELU, which our GeGLU uses. Gemma's released configs say
# "gelu" (with hidden_activation null), which HF maps to the tanh approximation.
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


# ------------------------------------------------------------------------------------------------
# config.json


def read_hf_config(checkpoint_dir: str) -> dict:
  if not os.path.isdir(checkpoint_dir):
    raise InputError(f"Gemma checkpoint directory {checkpoint_dir} does not exist")
  path = os.path.join(checkpoint_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise InputError(f"{path} does not exist: a Hugging Face checkpoint directory needs its "
                     f"config.json beside the *.safetensors files")
  try:
    with open(path) as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path} is not valid JSON ({e})") from None
  _check_architecture(hf_config, path)
  return hf_config


def _check_architecture(hf_config: dict, path: str):
  model_type = hf_config.get("model_type")
  if model_type != "gemma":
    raise InputError(f"{path}: model_type {model_type!r}; only Gemma (v1, e.g. gemma-7b or "
                     f"Liquid_V1_7B) checkpoints fit this model")
  activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act", "gelu")
  if hf_config.get("hidden_activation") is None and activation == "gelu":
    activation = "gelu_pytorch_tanh"  # HF's legacy reading of Gemma's released configs
  if activation not in TANH_GELU:
    raise InputError(f"{path}: activation {activation!r}; our MLP computes tanh-approximate GELU")
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise InputError(f"{path}: rope type {rope_type!r}; our model computes plain RoPE only")
  if hf_config.get("attention_bias"):
    raise InputError(f"{path}: attention_bias is true; our attention has no biases")


def model_fields(hf_config: dict) -> dict:
  """Our model config fields implied by a Gemma config.json (the parsed dict), e.g. for
  ``config.model.update(model_fields(read_hf_config(path)))``."""
  heads = hf_config["num_attention_heads"]
  rope = hf_config.get("rope_parameters") or {}
  return {
      "d_model": hf_config["hidden_size"],
      "num_heads": heads,
      "num_kv_heads": hf_config.get("num_key_value_heads") or heads,
      "head_dim": hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
      "mlp_dim": hf_config["intermediate_size"],
      "rope_base": float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))),
      "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
  }


def check_config(cfg: transformer.TransformerConfig, hf_config: dict, where: str):
  """Raise InputError listing every field where ``cfg`` and the checkpoint's config disagree."""
  try:
    fields = model_fields(hf_config)
    available = hf_config["num_hidden_layers"]
  except KeyError as e:
    raise InputError(f"{where}: no field {e}") from None
  if not cfg.tie_embeddings:
    del fields["tie_embeddings"]  # an untied head of ours starts from a tied checkpoint's embedding
  problems = [f"{name}: {getattr(cfg, name)} in our config, {value} in the checkpoint"
              for name, value in fields.items() if getattr(cfg, name) != value]
  if cfg.num_layers > available:
    problems.append(f"num_layers: {cfg.num_layers} requested, the checkpoint has {available}")
  if problems:
    raise InputError(f"{where} does not fit the model config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------
# One reader per parameter: index (a tuple of slices of our array) -> that block as float32.


def _bounds(index, shape) -> list[slice]:
  return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


def _length(s: slice) -> int:
  return s.stop - s.start


def _heads_in(ckpt: Checkpoint, name: str, head_dim: int):
  """q/k/v_proj (heads * head_dim, d) -> ours (d, heads, head_dim)."""
  def read(index, shape):
    d, heads, dims = _bounds(index, shape)
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    w = ckpt.read(name, rows, d).reshape(_length(heads), head_dim, _length(d))
    return w[:, dims].transpose(2, 0, 1)
  return read


def _heads_out(ckpt: Checkpoint, name: str, head_dim: int):
  """o_proj (d, heads * head_dim) -> ours (heads, head_dim, d)."""
  def read(index, shape):
    heads, dims, d = _bounds(index, shape)
    cols = slice(heads.start * head_dim, heads.stop * head_dim)
    w = ckpt.read(name, d, cols).reshape(_length(d), _length(heads), head_dim)
    return w[:, :, dims].transpose(1, 2, 0)
  return read


def _transposed(ckpt: Checkpoint, name: str):
  """nn.Linear (out, in) -> our kernel (in, out)."""
  def read(index, shape):
    rows, cols = _bounds(index, shape)
    return ckpt.read(name, cols, rows).T
  return read


def _vector(ckpt: Checkpoint, name: str):
  def read(index, shape):
    return ckpt.read(name, *_bounds(index, shape))
  return read


def fresh_rows(rows: np.ndarray, cols: slice, width: int, std: float, seed: int, stream: int):
  """N(0, std^2) rows, each drawn from its own (seed, stream, row) generator: any shard of the
  table gets the values a whole-table draw would."""
  out = np.empty((len(rows), _length(cols)), np.float32)
  for i, row in enumerate(rows):
    values = np.random.default_rng([seed, stream, int(row)]).standard_normal(width)
    out[i] = (std * values[cols]).astype(np.float32)
  return out


def embedding_sources(layout: TokenLayout, hf_vocab: int, image_token_offset: int | None):
  """For each of our rows, the checkpoint row it copies, or -1 for a freshly drawn row."""
  sources = np.full(layout.vocab_size, -1, np.int64)
  text = min(layout.text_vocab_size, hf_vocab)
  sources[:text] = np.arange(text)
  if image_token_offset is not None:
    image = slice(layout.image_offset, layout.vocab_size)
    sources[image] = image_token_offset + np.arange(layout.image_vocab_size)
  return sources


def _runs(values: np.ndarray):
  """Split into runs of consecutive values (each run becomes one contiguous read)."""
  breaks = np.flatnonzero(np.diff(values) != 1) + 1
  return np.split(np.arange(len(values)), breaks)


def _embedding_table(ckpt: Checkpoint, name: str, sources: np.ndarray, width: int, std: float,
                     seed: int, stream: int, transpose: bool):
  """Our (vocab, d) embedding, or the (d, vocab) untied head with ``transpose``."""
  def read(index, shape):
    if transpose:
      cols, rows = _bounds(index, shape)
    else:
      rows, cols = _bounds(index, shape)
    wanted = sources[rows]
    out = np.empty((len(wanted), _length(cols)), np.float32)
    fresh = np.flatnonzero(wanted < 0)
    out[fresh] = fresh_rows(fresh + rows.start, cols, width, std, seed, stream)
    copied = np.flatnonzero(wanted >= 0)
    for run in _runs(wanted[copied]) if len(copied) else []:
      first = wanted[copied[run[0]]]
      out[copied[run]] = ckpt.read(name, slice(first, first + len(run)), cols)
    return out.T if transpose else out
  return read


# ------------------------------------------------------------------------------------------------
# Loading


def _readers(ckpt: Checkpoint, cfg: transformer.TransformerConfig, layout: TokenLayout,
             image_token_offset: int | None, seed: int) -> dict[tuple, Callable]:
  """Our parameter path -> reader, for every parameter the checkpoint provides; shapes checked."""
  d, h, kv, hd, mlp = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  expected = {"embed_tokens.weight": None, "norm.weight": (d,)}
  readers = {("final_norm", "scale"): _vector(ckpt, "norm.weight")}
  for i in range(cfg.num_layers):
    layer = f"layers.{i}."
    shapes = {"self_attn.q_proj.weight": (h * hd, d), "self_attn.k_proj.weight": (kv * hd, d),
              "self_attn.v_proj.weight": (kv * hd, d), "self_attn.o_proj.weight": (d, h * hd),
              "mlp.gate_proj.weight": (mlp, d), "mlp.up_proj.weight": (mlp, d),
              "mlp.down_proj.weight": (d, mlp), "input_layernorm.weight": (d,),
              "post_attention_layernorm.weight": (d,)}
    expected.update({layer + name: shape for name, shape in shapes.items()})
    block = ("blocks", i)
    readers.update({
        block + ("attn", "q"): _heads_in(ckpt, layer + "self_attn.q_proj.weight", hd),
        block + ("attn", "k"): _heads_in(ckpt, layer + "self_attn.k_proj.weight", hd),
        block + ("attn", "v"): _heads_in(ckpt, layer + "self_attn.v_proj.weight", hd),
        block + ("attn", "o"): _heads_out(ckpt, layer + "self_attn.o_proj.weight", hd),
        block + ("mlp", "gate", "kernel"): _transposed(ckpt, layer + "mlp.gate_proj.weight"),
        block + ("mlp", "up", "kernel"): _transposed(ckpt, layer + "mlp.up_proj.weight"),
        block + ("mlp", "down", "kernel"): _transposed(ckpt, layer + "mlp.down_proj.weight"),
        block + ("attn_norm", "scale"): _vector(ckpt, layer + "input_layernorm.weight"),
        block + ("mlp_norm", "scale"): _vector(ckpt, layer + "post_attention_layernorm.weight"),
    })
  if cfg.scan_layers:
    readers = _stacked_layers(readers, cfg.num_layers)
  if ckpt.has("embed_tokens.weight"):
    expected["embed_tokens.weight"] = (ckpt.shape("embed_tokens.weight")[0], d)
  ckpt.check(expected)
  hf_vocab = expected["embed_tokens.weight"][0]
  if image_token_offset is not None and (
      image_token_offset < 0 or image_token_offset + layout.image_vocab_size > hf_vocab):
    raise InputError(
        f"{ckpt.files[ckpt.name('embed_tokens.weight')]}: image rows [{image_token_offset}, "
        f"{image_token_offset + layout.image_vocab_size}) asked for, but the embedding has "
        f"{hf_vocab} rows (Liquid_V1_7B's VQ codes start at row 256000)")
  sources = embedding_sources(layout, hf_vocab, image_token_offset)
  readers[("embedding",)] = _embedding_table(ckpt, "embed_tokens.weight", sources, d,
                                             cfg.init_std, seed, stream=0, transpose=False)
  if not cfg.tie_embeddings:
    # A tied checkpoint stores no head (or a copy of the embedding): the embedding is its head.
    head = "lm_head.weight" if ckpt.has("lm_head.weight") else "embed_tokens.weight"
    ckpt.check({head: (hf_vocab, d)})
    readers[("lm_head",)] = _embedding_table(ckpt, head, sources, d, cfg.init_std, seed,
                                             stream=1, transpose=True)
  return readers


def _stacked_layers(readers: dict[tuple, Callable], num_layers: int) -> dict[tuple, Callable]:
  """Per-layer readers ("blocks", i, ...) -> readers of the scanned model's stacked leaves
  ("blocks", ...) of shape (num_layers, ...): a device reads its layers' slices only."""
  def stacked(per_layer):
    def read(index, shape):
      layers = range(*index[0].indices(shape[0]))
      return np.stack([per_layer[i](index[1:], shape[1:]) for i in layers])
    return read

  result = {path: read for path, read in readers.items() if path[0] != "blocks"}
  for rest in {path[2:] for path in readers if path[0] == "blocks"}:
    result[("blocks",) + rest] = stacked([readers[("blocks", i) + rest] for i in range(num_layers)])
  return result


def _path(key_path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load(checkpoint_dir: str, cfg: transformer.TransformerConfig, layout: TokenLayout, *,
         seed: int = 0, shardings=None, image_token_offset: int | None = None,
         init_params=None) -> dict:
  """Our pure params dict for ``cfg`` from a HF Gemma checkpoint directory.

  shardings: a pytree of ``jax.sharding.Sharding`` matching the params (None: the default device).
  image_token_offset: the checkpoint row of image code 0 (Liquid_V1_7B: 256000); None draws the
    image rows fresh.
  init_params: our initial params (e.g. ``Model.init(seed)``) to take the parameters the
    checkpoint lacks from; None initialises just those, as ``MeDiMTransformer`` with ``seed`` would.
  """
  hf_config = read_hf_config(checkpoint_dir)
  check_config(cfg, hf_config, os.path.join(checkpoint_dir, CONFIG_FILE))
  if cfg.vocab_size != layout.vocab_size:
    raise ValueError(f"model vocab_size {cfg.vocab_size} != token layout's {layout.vocab_size}")
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(seed)))))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  paths = [_path(key_path) for key_path, _ in leaves]
  targets = _target_shardings(shardings, treedef, len(paths))
  ckpt = Checkpoint(checkpoint_dir)
  try:
    readers = _readers(ckpt, cfg, layout, image_token_offset, seed)
    arrays = [_from_checkpoint(readers[path], leaf.shape, target) if path in readers else None
              for path, (_, leaf), target in zip(paths, leaves, targets)]
  finally:
    ckpt.close()
  new = [i for i, array in enumerate(arrays) if array is None]
  new_paths, new_targets = [paths[i] for i in new], [targets[i] for i in new]
  if init_params is None:
    values = _initialised(cfg, seed, new_paths, new_targets)
  else:
    values = [jax.device_put(_get(init_params, p), t) for p, t in zip(new_paths, new_targets)]
  for i, value in zip(new, values):
    arrays[i] = value
  return jax.tree_util.tree_unflatten(treedef, arrays)


def _from_checkpoint(read, shape, sharding) -> jax.Array:
  # Called once per addressable device with that device's index into the global array.
  return jax.make_array_from_callback(shape, sharding, lambda index: read(index, shape))


def _target_shardings(shardings, treedef, count: int) -> list:
  if shardings is None:
    return [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * count
  targets = treedef.flatten_up_to(shardings)
  if len(targets) != count or not all(isinstance(s, jax.sharding.Sharding) for s in targets):
    raise ValueError("shardings must be a pytree of jax.sharding.Sharding matching the params")
  return targets


def _initialised(cfg, seed: int, paths: list[tuple], shardings: list) -> list[jax.Array]:
  """Our model's own initial values of ``paths``, exactly as ``MeDiMTransformer(cfg, Rngs(seed))``
  draws them; under jit, so the big weights drawn alongside are dead code and never exist."""
  def init():
    params = nnx.to_pure_dict(nnx.state(transformer.MeDiMTransformer(cfg, rngs=nnx.Rngs(seed))))
    return [_get(params, path) for path in paths]
  return jax.jit(init, out_shardings=shardings)()
