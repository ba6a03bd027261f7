"""What each --mode of the command line does, as plain functions of (config, workdir)."""

from __future__ import annotations

import os

from medim_jax import sample
from medim_jax.data import build as data_build
from medim_jax.data.tokenize import SHARD_SOURCES
from medim_jax.training import train


def run(config, workdir: str, mode: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.txt"), "w") as f:
    f.write(str(config))
  if mode == "data":
    build_data(config)
    return
  if mode == "train_vq":
    from medim_jax.training import train_vq
    train_vq.train_vq(config, workdir)
    return
  if mode == "eval":
    from medim_jax import evaluate
    evaluate.evaluate(config, workdir)
    return
  if mode == "all" and config.data.name in SHARD_SOURCES:
    run_all_stages(config, workdir)
    return
  if mode == "tokenize" or (mode == "all" and needs_tokenize(config, workdir)):
    from medim_jax.data import tokenize
    tokenize.tokenize(config, workdir)
  if mode == "tokenize":
    return
  dataset = data_build.build_dataset(config, workdir)
  if mode in ("train", "all"):
    train.train_and_evaluate(config, workdir, dataset)
  if mode in ("sample", "all"):
    sample.generate(config, workdir, dataset)
  if mode == "score" or (mode == "all" and config.data.name == "smoke"):
    score(config, workdir, dataset)


def run_all_stages(config, workdir: str) -> None:
  """The main job on shard data. Each stage is skipped when its output is there for these inputs:
  data (cached by its settings), VQ tokenizer (when data.image_tokenizer=vq), shards, MeDiM
  training (resumes; nothing to do once num_steps are done), evaluation (generations cached)."""
  from medim_jax import evaluate
  if config.data.name == "medim_demo":
    build_data(config)
  if config.data.image_tokenizer == "vq":
    from medim_jax.training import train_vq
    if train_vq.is_trained(config, workdir):
      print(f"VQ tokenizer: reusing {train_vq.tokenizer_path(workdir)}")
    else:
      train_vq.train_vq(config, workdir)
  if needs_tokenize(config, workdir):
    from medim_jax.data import tokenize
    tokenize.tokenize(config, workdir)
  dataset = data_build.build_dataset(config, workdir)
  train.train_and_evaluate(config, workdir, dataset)
  evaluate.evaluate(config, workdir, dataset)


def needs_tokenize(config, workdir: str) -> bool:
  """Shard data whose shards are not written yet (an existing set is reused as it is)."""
  if config.data.name not in SHARD_SOURCES:
    return False
  from medim_jax.data import shards, tokenize
  return not os.path.exists(os.path.join(tokenize.shards_dirs(config, workdir)[0], shards.MANIFEST))


def build_data(config) -> None:
  """--mode data: build medim-demo (or check the configured folders) and say what is there."""
  if config.data.name == "medim_demo":
    from medim_jax.data import demo
    demo.build(config.data)
  elif config.data.name == "folders":
    from medim_jax.data import folders, tokenize
    for name, source in tokenize.source_folders(config).items():
      for split in tokenize.SPLITS:
        if source[split] and source.get("text_only"):
          print(f"{name}/{split}: {source[split]}: {len(folders.scan_reports(source[split]))} "
                "reports (text only)")
        elif source[split]:
          pairs, missing = folders.scan(source[split])
          print(f"{name}/{split}: {source[split]}: {len(pairs)} pairs"
                + (f", {len(missing)} files without a partner; first: {missing[0]}" if missing else ""))
  else:
    raise ValueError(f"--mode data builds medim_demo or checks folders; config.data.name is "
                     f"{config.data.name!r} (smoke data is made in memory)")


def score(config, workdir: str, dataset) -> dict:
  if config.data.name != "smoke":
    raise ValueError(f"--mode score knows the smoke data only; config.data.name is {config.data.name!r}")
  from medim_jax.evaluation.demo import smoke_scoring
  return smoke_scoring.score_workdir(workdir, dataset)
