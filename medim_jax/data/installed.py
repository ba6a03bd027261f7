"""Files shipped inside installed packages (the medim-demo raw material), found without importing
the packages: their imports would pull torch."""

from __future__ import annotations

import importlib.util
import os


def package_file(package: str, relative: str, needed_for: str, install: str) -> str:
  """Path of ``relative`` inside ``package``; a clear error saying how to install it otherwise."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"{needed_for} needs the {package} package, which is not installed: "
                            f"{install} (or `make demo-data`)")
  path = os.path.join(spec.submodule_search_locations[0], relative)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the installed {package} package")
  return path
