"""Files the project writes: their sha256, and writing them so that a crash never leaves half a file.

Everything that is read back later (checkpoint seals, cache keys, result JSON) is written under a
temporary name and renamed, which is atomic on POSIX filesystems: a reader sees the old file or the
new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def files_sha256(paths) -> str:
  """One sha256 over several files: each file's name and bytes, in the order of their paths."""
  digest = hashlib.sha256()
  for path in sorted(paths):
    digest.update(os.path.basename(path).encode())
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


def write_text_atomically(path: str, text: str) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(temporary, path)


def read_jsonl(path: str) -> list[tuple[str, dict]]:
  """(line, row) for every line of a JSON-lines log that parses. A line that does not (the last
  line of a run killed while writing it, or a damaged one) is left out with a warning naming it."""
  import json
  rows = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if not isinstance(row, dict):
        print(f"warning: {path} line {number} is not a JSON object (cut short or damaged): left out")
        continue
      rows.append((line if line.endswith("\n") else line + "\n", row))
  return rows
