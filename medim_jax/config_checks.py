"""Checks of the command line's config overrides, so that a typo is one clear line, not a traceback."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys


def load_config(spec: str):
  """Load ``path/to/config.py[:arg]`` the way ml_collections' config flag does."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_medim_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flatten_keys(config, prefix="") -> list[str]:
  keys = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    keys.append(name)
    if hasattr(value, "items"):
      keys.extend(flatten_keys(value, name + "."))
  return keys


def exit_on_unknown_overrides(argv: list[str]) -> None:
  """Exit with one ``error:`` line per misspelt ``--config.KEY``, before any flag parsing."""
  problems = unknown_overrides(argv)
  if problems:
    sys.exit("error: " + "\n       ".join(problems))


def unknown_overrides(argv: list[str]) -> list[str]:
  """Messages for every ``--config.KEY=VALUE`` whose KEY the config file does not define."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if spec is None:
    return []
  return unknown_keys(load_config(spec), argv, spec)


def unknown_keys(config, argv: list[str], source: str) -> list[str]:
  """Messages for every ``--config.KEY=VALUE`` of ``argv`` whose KEY ``config`` does not define."""
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if not overrides:
    return []
  known = flatten_keys(config)
  messages = []
  for key in overrides:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      messages.append(f"unknown config key {key!r} in {source}{hint}")
  return messages
