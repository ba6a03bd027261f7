"""Convert pytorch-fid's Inception weights into the ``.npz`` that ``models/inception.py`` loads.

The input is the state dict pytorch-fid uses for FID (``pt_inception-2015-12-05-6726825d.pth``,
TensorFlow's 2015-12-05 Inception ported to PyTorch), fetched by the user; nothing is downloaded
here. Each ``X.conv.weight`` (OIHW, no bias) with its ``X.bn.{weight,bias,running_mean,
running_var}`` (eps 1e-3) becomes one convolution ``X/kernel`` (HWIO) and ``X/bias`` with the batch
norm folded in; ``fc.weight`` (1008, 2048) becomes ``fc/kernel`` (2048, 1008). The result must cover
every parameter of the FID InceptionV3 with the right shape. torchvision's ImageNet InceptionV3 is
not the FID network (1000 classes, other weights); its file is rejected on the ``fc`` shape.

Reading ``.pth`` needs torch (``pip install torch``, the CPU wheel); ``.npz`` and ``.safetensors``
state dicts with the same keys do not.

  python -m medim_jax.convert.inception_checkpoint pt_inception-2015-12-05-6726825d.pth fid.npz
"""

from __future__ import annotations

import argparse

import numpy as np

from medim_jax.convert import state_dict
from medim_jax.models import inception

BATCH_NORM_EPS = 1e-3  # TF-slim's, kept by pytorch-fid's BasicConv2d
BATCH_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")
IGNORED_PREFIXES = ("AuxLogits.",)  # torchvision's training-only auxiliary head
IGNORED_SUFFIXES = (".num_batches_tracked",)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  return state_dict.read(path, "Inception checkpoint", dtype=np.float64)


def fold_batch_norm(weight, gamma, beta, mean, var, conv_bias=None, eps: float = BATCH_NORM_EPS
                    ) -> tuple[np.ndarray, np.ndarray]:
  """conv (OIHW) then inference batch norm -> one HWIO kernel and bias computing the same map."""
  scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
  kernel = np.asarray(weight, np.float64).transpose(2, 3, 1, 0) * scale
  shift = np.asarray(mean, np.float64)
  if conv_bias is not None:  # pytorch-fid's convs have none; accepted for other exports
    shift = shift - np.asarray(conv_bias, np.float64)
  bias = np.asarray(beta, np.float64) - shift * scale
  return kernel.astype(np.float32), bias.astype(np.float32)


def convert_state_dict(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid keys -> our flat keys, for whatever layers ``state`` holds (no coverage check).

  A conv without its complete batch norm, or a key that is neither mapped nor known to be
  unneeded, is an error: a silently dropped tensor would give wrong features.
  """
  params, used = {}, set()
  layers = sorted(key[:-len(".conv.weight")] for key in state if key.endswith(".conv.weight"))
  for layer in layers:
    names = {field: f"{layer}.bn.{field}" for field in BATCH_NORM_FIELDS}
    missing = [name for name in names.values() if name not in state]
    if missing:
      raise ValueError(f"{layer}.conv.weight has no batch norm to fold: {missing} not found")
    conv_bias = state.get(f"{layer}.conv.bias")
    norm = [state[names[field]] for field in BATCH_NORM_FIELDS]
    kernel, bias = fold_batch_norm(state[f"{layer}.conv.weight"], *norm, conv_bias=conv_bias)
    target = layer.replace(".", "/")
    params[f"{target}/kernel"], params[f"{target}/bias"] = kernel, bias
    used |= {f"{layer}.conv.weight", f"{layer}.conv.bias", *names.values()}
  if "fc.weight" in state:
    params["fc/kernel"] = np.asarray(state["fc.weight"], np.float32).T
    used.add("fc.weight")
  if "fc.bias" in state:
    params["fc/bias"] = np.asarray(state["fc.bias"], np.float32)
    used.add("fc.bias")
  unknown = [key for key in state if key not in used and not key.startswith(IGNORED_PREFIXES)
             and not key.endswith(IGNORED_SUFFIXES)]
  if unknown:
    raise ValueError(f"keys not in pytorch-fid's Inception layout: {unknown[:12]}")
  return params


def convert_file(source: str, destination: str) -> dict[str, np.ndarray]:
  """Reads ``source``, checks the result covers the FID InceptionV3, writes ``destination``."""
  params = convert_state_dict(read_state_dict(source))
  inception.check_params(params, source=f"Inception checkpoint {source}")
  np.savez(destination, **params)
  return params


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("source", help="pytorch-fid state dict (.pth, or .npz/.safetensors)")
  parser.add_argument("destination", help="output .npz for medim_jax.models.inception")
  args = parser.parse_args(argv)
  params = convert_file(args.source, args.destination)
  count = sum(int(np.prod(value.shape)) for value in params.values())
  print(f"wrote {args.destination}: {len(params)} arrays, {count:,} parameters")


if __name__ == "__main__":
  main()
