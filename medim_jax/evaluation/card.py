"""The evaluation card: everything needed to regenerate a table of numbers with one command."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece",
            "nltk", "pycocoevalcap", "rouge")


def file_sha256(path: str) -> str | None:
  """None for a file that is not there (the card records what exists)."""
  from medim_jax import integrity
  return integrity.file_sha256(path) if os.path.exists(path) else None


def package_versions(names=PACKAGES) -> dict[str, str]:
  versions = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def command_line() -> str:
  """The command that produced this run, as typed (module form for ``python -m``)."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join("medim_jax", "main.py")):
    argv[0] = "python -m medim_jax.main"
  return " ".join(argv)


def evaluation_card(config, shards_dirs: list[str], checkpoint_step: int, split: str,
                    example_ids) -> dict:
  import jax
  return {
      "checkpoint_step": checkpoint_step,
      "split": split,
      "examples": len(example_ids),
      "example_ids_sha256": hashlib.sha256(",".join(map(str, example_ids)).encode()).hexdigest(),
      "split_manifest_sha256": {d: file_sha256(os.path.join(d, "manifest.json")) for d in shards_dirs},
      "sample_seed": int(config.sample.seed),
      "train_seed": int(config.seed),
      "data_seed": int(config.data.get("demo_seed", 0)),
      "command": command_line(),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})",
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
      "packages": package_versions(),
      "config": str(config),
  }
