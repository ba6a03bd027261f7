"""Installs WordNet 3.0 for nltk without network at run time and without root.

nltk's METEOR looks words up in WordNet, and ``nltk.download`` cannot reach its server from these
machines. Debian ships the same WordNet 3.0 database in two packages, ``wordnet-base`` (data, index and
exception files) and ``wordnet-sense-index`` (``index.sense``, ``cntlist``); nltk reads their files
as they are, given one more file Debian leaves out: ``lexnames``, the fixed table of WordNet 3.0's 45
lexicographer files (man page lexnames(5WN)). So the install step is: take the dict files from the
system (``/usr/share/wordnet``, when those packages are installed) or from ``apt-get download`` +
``dpkg-deb -x`` (neither needs root), copy them to ``<nltk_data>/corpora/wordnet/``, write
``lexnames`` and check that nltk reports version 3.0.

    python -m medim_jax.evaluation.wordnet [--nltk-data DIR]

The default DIR is the repository's git-ignored ``.cache/nltk_data``, which ``report_metrics`` adds
to ``nltk.data.path``, so no environment variable is needed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings

DEFAULT_NLTK_DATA = pathlib.Path(__file__).resolve().parents[2] / ".cache" / "nltk_data"
SYSTEM_DICT = pathlib.Path("/usr/share/wordnet")
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
# What nltk's reader opens (the rest of Debian's dict files are copied along but optional).
REQUIRED_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
                       ) + ("noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense")

# lexnames(5WN) for WordNet 3.0: file number = position; the syntactic category follows the prefix.
LEXICOGRAPHER_FILES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_text() -> str:
  return "".join(f"{number:02d}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                 for number, name in enumerate(LEXICOGRAPHER_FILES))


def wordnet_dir(nltk_data: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(nltk_data) / "corpora" / "wordnet"


def has_dict_files(directory: pathlib.Path) -> bool:
  return all((directory / name).is_file() for name in REQUIRED_FILES)


def is_installed(nltk_data: str | os.PathLike = DEFAULT_NLTK_DATA) -> bool:
  directory = wordnet_dir(nltk_data)
  return has_dict_files(directory) and (directory / "lexnames").is_file()


def wordnet_version(nltk_data: str | os.PathLike) -> str:
  """The version nltk reads from ``<nltk_data>/corpora/wordnet``."""
  import nltk
  from nltk.corpus.reader.wordnet import WordNetCorpusReader
  # nltk 3.9's reader maps itself onto the corpus named "wordnet" found on nltk.data.path (it compares
  # its version with that name), so the directory checked must be first on that path.
  nltk.data.path.insert(0, str(nltk_data))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "multilingual functions are not available": we need English only
      return WordNetCorpusReader(str(wordnet_dir(nltk_data)), None).get_version()
  finally:
    nltk.data.path.remove(str(nltk_data))


def _debian_dict_files(workdir: pathlib.Path) -> pathlib.Path:
  """apt-get download + dpkg-deb -x into ``workdir``; returns the extracted usr/share/wordnet."""
  for tool in ("apt-get", "dpkg-deb"):
    if shutil.which(tool) is None:
      raise RuntimeError(f"`{tool}` not found: WordNet comes from Debian packages "
                         f"({', '.join(DEBIAN_PACKAGES)}); install them or copy their files by hand")
  download = subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=workdir,
                            capture_output=True, text=True)
  if download.returncode != 0:
    raise RuntimeError(f"`apt-get download {' '.join(DEBIAN_PACKAGES)}` failed (the package lists "
                       f"may need `apt-get update`):\n{download.stderr.strip()}")
  root = workdir / "root"
  for deb in sorted(workdir.glob("*.deb")):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
  return root / "usr" / "share" / "wordnet"


def install(nltk_data: str | os.PathLike = DEFAULT_NLTK_DATA, system_dict: pathlib.Path = SYSTEM_DICT,
            verbose: bool = True) -> pathlib.Path:
  """Puts WordNet 3.0 under ``<nltk_data>/corpora/wordnet`` (a no-op when already there)."""
  target = wordnet_dir(nltk_data)
  say = print if verbose else (lambda *_: None)
  if is_installed(nltk_data):
    say(f"WordNet already installed in {target}")
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same filesystem: the rename is atomic
    tmp = pathlib.Path(tmp)
    if has_dict_files(system_dict):
      source = system_dict
      say(f"copying WordNet from {source}")
    else:
      say(f"fetching {', '.join(DEBIAN_PACKAGES)} with apt-get download")
      source = _debian_dict_files(tmp)
      if not has_dict_files(source):
        raise RuntimeError(f"the Debian packages lack some of {REQUIRED_FILES}")
    staged = wordnet_dir(tmp / "nltk_data")
    shutil.copytree(source, staged)
    if not (staged / "lexnames").is_file():
      (staged / "lexnames").write_text(lexnames_text())
    version = wordnet_version(tmp / "nltk_data")
    if version != "3.0":
      raise RuntimeError(f"expected WordNet 3.0, nltk reads version {version!r} from {source}")
    if target.exists():  # a partial earlier copy
      shutil.rmtree(target)
    staged.rename(target)
  say(f"WordNet {version} installed in {target}")
  return target


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nltk-data", default=str(DEFAULT_NLTK_DATA),
                      help="nltk data directory (default: the repository's .cache/nltk_data)")
  args = parser.parse_args(argv)
  try:
    install(args.nltk_data)
  except (RuntimeError, subprocess.CalledProcessError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
