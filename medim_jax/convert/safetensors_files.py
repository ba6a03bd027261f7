"""A Hugging Face safetensors checkpoint on disk, one file or sharded with an index: which file holds
each tensor, its shape, and slices of it read as float32 (memory-mapped, so a device reads only its
own block)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from medim_jax.errors import InputError

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
  """Tensor name -> file of a (possibly sharded) safetensors checkpoint; reads slices as float32."""

  def __init__(self, checkpoint_dir: str):
    self.dir = checkpoint_dir
    self.files: dict[str, str] = {}    # tensor name -> file path
    self._handles: dict = {}
    index_path = os.path.join(checkpoint_dir, INDEX_FILE)
    if os.path.exists(index_path):
      self._read_index(index_path)
    else:
      self._scan_files()
    # GemmaForCausalLM saves "model.layers.0..."; a bare GemmaModel saves "layers.0...".
    self.prefix = "model." if "model.embed_tokens.weight" in self.files else ""

  def _read_index(self, index_path: str):
    self.where = index_path
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise InputError(f"{index_path} is not a safetensors index (no weight_map: {e})") from None
    for name, file in weight_map.items():
      path = os.path.join(self.dir, file)
      if not os.path.exists(path):
        raise InputError(f"{index_path} puts {name} in {file}, which is not in {self.dir}")
      self.files[name] = path

  def _scan_files(self):
    from safetensors import safe_open
    paths = sorted(glob.glob(os.path.join(self.dir, "*.safetensors")))
    if not paths:
      raise InputError(f"{self.dir} holds no *.safetensors files (PyTorch .bin checkpoints are "
                       f"not read: save them again with transformers' save_pretrained)")
    self.where = f"the *.safetensors files in {self.dir}"
    for path in paths:
      with safe_open(path, framework="numpy") as f:
        self.files.update({name: path for name in f.keys()})

  def name(self, short: str) -> str:
    return short if short == "lm_head.weight" else self.prefix + short

  def has(self, short: str) -> bool:
    return self.name(short) in self.files

  def _slice(self, short: str):
    name = self.name(short)
    if name not in self.files:
      raise InputError(f"{self.where}: no tensor {name}")
    path = self.files[name]
    if path not in self._handles:
      from safetensors import safe_open
      self._handles[path] = safe_open(path, framework="numpy")
    return self._handles[path].get_slice(name), path

  def shape(self, short: str) -> tuple[int, ...]:
    return tuple(self._slice(short)[0].get_shape())

  def check(self, shapes: dict[str, tuple[int, ...] | None]):
    """Raise one InputError listing every tensor that is missing or of another shape."""
    problems = []
    for short, shape in shapes.items():
      if not self.has(short):
        problems.append(f"{self.where}: no tensor {self.name(short)}")
        continue
      tensor, path = self._slice(short)
      found = tuple(tensor.get_shape())
      if shape is not None and found != tuple(shape):
        problems.append(f"{path}: tensor {self.name(short)} has shape {found}; the model config "
                        f"needs {tuple(shape)}")
    if problems:
      shown = "\n  ".join(problems[:12])
      more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
      raise InputError(f"the Gemma checkpoint does not fit ({len(problems)} problems):\n  "
                       f"{shown}{more}")

  def read(self, short: str, *index: slice) -> np.ndarray:
    """float32 copy of ``tensor[index]``; only those bytes are read (safetensors mmaps the file).
    bfloat16 tensors arrive as ml_dtypes.bfloat16 arrays (safetensors' numpy framework)."""
    tensor, _ = self._slice(short)
    return np.asarray(tensor[index], dtype=np.float32)

  def close(self):
    self._handles.clear()
