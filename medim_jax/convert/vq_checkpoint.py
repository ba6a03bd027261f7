"""Load a PyTorch VQ tokenizer checkpoint (Chameleon ``vqgan.ckpt``, LlamaGen ``vq_ds*.pt``) into
the parameters of ``models/vq.py``, from a local file.

Both use the taming-transformers VQGAN; LlamaGen renames its modules (``conv_blocks.i.res.j`` for
``down.i.block.j``, ``mid.0/1/2``, and numbers decoder levels from the coarsest). Keys are mapped
onto our names, convolution kernels go from OIHW to HWIO, GroupNorm weights become scales. Every
parameter of the model must be found with the right shape; otherwise the error lists what is
missing or mismatched. Reading ``.pt``/``.ckpt`` needs torch (``pip install torch``, CPU wheel);
``.npz`` and ``.safetensors`` state dicts do not.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from medim_jax.convert import state_dict
from medim_jax.models import vq

IGNORED_PREFIXES = ("loss.", "discriminator.", "perceptual", "quantize.codebook_used",
                    "quantize.ema", "quantize.cluster_size")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  # LlamaGen keeps EMA weights beside the raw ones (EMA first); Lightning wraps in state_dict.
  return state_dict.read(path, "VQ checkpoint", wrappers=("ema", "model", "state_dict"))


def llamagen_to_taming(key: str, num_levels: int) -> str:
  key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", key)
  key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.", r"encoder.down.\1.", key)
  mid = {"0": "block_1", "1": "attn_1", "2": "block_2"}
  key = re.sub(r"^(encoder|decoder)\.mid\.([012])\.", lambda m: f"{m[1]}.mid.{mid[m[2]]}.", key)

  def up(match):
    level = num_levels - 1 - int(match[1])
    rest = match[2].replace("res.", "block.", 1) if match[2].startswith("res.") else match[2]
    return f"decoder.up.{level}.{rest}"
  return re.sub(r"^decoder\.conv_blocks\.(\d+)\.(.*)$", up, key)


def target_path(key: str) -> tuple | None:
  """A taming-style key -> the path of our parameter (None for keys that are not model weights)."""
  if key.startswith(IGNORED_PREFIXES):
    return None
  *modules, leaf = key.split(".")
  if len(modules) >= 2 and modules[-1] == "conv" and modules[-2] in ("downsample", "upsample"):
    modules = modules[:-1]  # taming wraps the resampling convolution in a module of its own
  path = tuple(int(m) if m.isdigit() else m for m in modules)
  if path == ("quantize", "embedding"):
    return path
  is_norm = bool(modules) and (modules[-1].startswith("norm"))
  name = {"weight": "scale" if is_norm else "kernel", "bias": "bias"}.get(leaf)
  return None if name is None else path + (name,)


def convert(state: dict[str, np.ndarray], cfg: vq.VQConfig) -> dict:
  """A PyTorch state dict -> our pure params dict for ``cfg``; strict about coverage and shapes."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: vq.VQModel(cfg, rngs=nnx.Rngs(0)))))
  expected = {tuple(_key(p) for p in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  llamagen = any(k.startswith("encoder.conv_blocks.") for k in state)
  params, problems = {}, []
  for key, value in state.items():
    taming_key = llamagen_to_taming(key, len(cfg.channel_mult)) if llamagen else key
    path = target_path(taming_key)
    if path is None:
      continue
    if path not in expected:
      problems.append(f"{key}: no such parameter in this VQ config")
      continue
    array = np.asarray(value, np.float32)
    if path[-1] == "kernel" and array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.shape != expected[path]:
      problems.append(f"{key}: shape {array.shape} here, {expected[path]} in this VQ config")
      continue
    params[path] = array
  problems += [f"{'/'.join(map(str, p))}: not in the checkpoint" for p in expected if p not in params]
  if problems:
    shown = "\n  ".join(problems[:12])
    raise ValueError(f"the checkpoint does not fit this VQ config ({len(problems)} problems):\n  "
                     f"{shown}")
  tree: dict = {}
  for path, array in params.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array
  return tree


def _flat(tree, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value})
  return out


def _key(entry):
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  raise TypeError(entry)


def load(path: str, cfg: vq.VQConfig) -> dict:
  return convert(read_state_dict(path), cfg)
