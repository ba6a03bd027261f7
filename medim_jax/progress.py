"""Progress bars that redraw smoothly on a terminal and write a line every 30 s into log files."""

from __future__ import annotations

import sys

import tqdm


def bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
