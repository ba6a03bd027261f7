"""The dataset a config names: the smoke set (made in memory) or the shards --mode tokenize wrote.

Kept apart from ``base`` (the batch interface), so that the interface imports none of its
implementations.
"""

from __future__ import annotations

from medim_jax import errors


def build_dataset(config, workdir: str | None = None):
  """The smoke set (made in memory), or the shards that --mode tokenize wrote for the config."""
  if config.data.name == "smoke":
    from medim_jax.data import smoke
    return smoke.build(config)
  from medim_jax.data import tokenize
  if config.data.name in tokenize.SHARD_SOURCES:
    from medim_jax.data import pipeline
    directories = tokenize.shards_dirs(config, workdir or ".")
    if config.data.verify_shards:
      from medim_jax.data import shards
      for directory in directories:
        shards.verify(directory)
    dataset = pipeline.ShardDataset(
        directories, weights={k: v.get("weight", 1.0) for k, v in config.data.datasets.items()},
        train_on_padding=config.data.train_on_padding, read_threads=config.data.read_threads,
        worker_count=config.data.worker_count,
        finding_oversample=config.data.finding_oversample)
    made_with = dataset.manifests[directories[0]].get("settings", {})
    now = tokenize.settings(config)
    changed = sorted(k for k in set(made_with) | set(now) if made_with.get(k) != now.get(k))
    if changed:
      raise errors.InputError(
          f"the shards in {directories[0]} were made with other data settings "
          f"({', '.join('data.' + k for k in changed)}): use the settings they were made "
          "with, or tokenize into a new data.shards_dir (or delete the old shards)")
    return dataset
  raise errors.InputError(f"unknown config.data.name {config.data.name!r}: expected smoke or one "
                          f"of {', '.join(tokenize.SHARD_SOURCES)}")
