"""A PyTorch-style state dict from a local file: ``.npz``, ``.safetensors`` or a torch pickle.

torch is imported only for ``.pt`` / ``.pth`` / ``.ckpt`` files, and loads with ``weights_only=True``:
a checkpoint holding other pickled objects is refused with a way to export its weights.
"""

from __future__ import annotations

import os
import pickle

import numpy as np


def read(path: str, what: str, wrappers: tuple[str, ...] = ("state_dict",),
         dtype=np.float32) -> dict[str, np.ndarray]:
  """{name: array} of the file; the first of ``wrappers`` found around the dict is unwrapped
  (``what`` names the checkpoint in errors, e.g. "VQ checkpoint")."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs torch: pip install torch (the CPU wheel is enough)"
                      ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path} holds pickled objects besides the weights (e.g. Lightning callbacks), which are not "
        f"loaded for safety ({e}). Export the state dict once, e.g. torch.save(torch.load(path, "
        f"weights_only=False)['state_dict'], 'weights.pt') in a trusted session, and load that"
        ) from None
  for key in wrappers:
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  return {key: value.double().numpy().astype(dtype) for key, value in state.items()
          if hasattr(value, "numpy")}
