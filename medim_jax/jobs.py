"""What each --mode of the command line does, as plain functions of (config, workdir)."""

from __future__ import annotations

import os

from medim_jax import sample, train
from medim_jax.data import base as data_base


def run(config, workdir: str, mode: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.txt"), "w") as f:
    f.write(str(config))
  dataset = data_base.build_dataset(config)
  if mode in ("train", "all"):
    train.train_and_evaluate(config, workdir, dataset)
  if mode in ("sample", "all"):
    sample.generate(config, workdir, dataset)
  if mode in ("score", "all"):
    score(config, workdir, dataset)


def score(config, workdir: str, dataset) -> dict:
  if config.data.name != "smoke":
    raise ValueError(f"--mode score knows the smoke data only; config.data.name is {config.data.name!r}")
  from medim_jax.evaluation import smoke_scoring
  return smoke_scoring.score_workdir(workdir, dataset)
