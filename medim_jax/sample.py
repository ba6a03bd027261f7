"""The sampling job: load the latest checkpoint, generate every task, write PNG grids and reports."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from medim_jax import errors, progress, visualize
from medim_jax.data import base as data_base, build as data_build
from medim_jax.diffusion import rerank, sampler as sampler_lib
from medim_jax.parallel import sharding
from medim_jax.training import checkpointing, train


def load_sampling_params(config, workdir: str, trainer: train.Trainer, step: int | None = None):
  """Params of checkpoint ``step`` (default: the latest); EMA params when trained with EMA and
  config.sample.use_ema."""
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            config.train.max_checkpoints_to_keep)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train first "
                              "(--mode train or --mode all)")
    if step is not None and step not in checkpointer.all_steps():
      raise FileNotFoundError(f"no checkpoint {step} in {checkpointer.directory}; there are "
                              f"{checkpointer.all_steps()}")
    state = checkpointer.restore(trainer.abstract_state(), step=step)
  finally:
    checkpointer.close()
  use_ema = config.sample.use_ema and state.ema_params is not None
  return (state.ema_params if use_ema else state.params), int(state.step)


def tasks_from_config(config) -> list[str]:
  tasks = [t.strip() for t in config.sample.tasks.split(",") if t.strip()]
  for task in tasks:
    if task not in sampler_lib.GENERATION_TASKS:
      raise ValueError(f"config.sample.tasks names {task!r}; known tasks are "
                       f"{sampler_lib.GENERATION_TASKS}")
  return tasks


def generate(config, workdir: str, dataset: data_base.PairedDataset | None = None) -> dict:
  """Generate config.sample.num_examples per task from the eval split; returns tokens per task."""
  dataset = dataset or data_build.build_dataset(config, workdir)
  trainer = train.Trainer(config, dataset.layout)
  params, step = load_sampling_params(config, workdir, trainer)
  split = dataset.eval
  split = split.subset(np.arange(min(config.sample.num_examples, len(split))))
  results = {}
  for task in tasks_from_config(config):
    results[task] = generate_task(config, trainer, params, dataset.layout, split, task)
    write_task(os.path.join(workdir, "samples", task), task, results[task], split, dataset, step)
  print(f"Samples of checkpoint {step} written to {os.path.join(workdir, 'samples')}")
  return results


def sample_in_batches(sampler: sampler_lib.Sampler, params, mesh, inputs: np.ndarray,
                      example_ids: np.ndarray, batch_size: int, seed: int, segment_steps,
                      bar_name: str | None = None) -> sampler_lib.SampleOutput:
  """Every row of ``inputs`` through ``sampler``, ``batch_size`` rows a call; the outputs of all
  calls concatenated as NumPy arrays. A progress bar named ``bar_name`` when given."""
  outputs = []
  bar = progress.bar(-(-len(inputs) // batch_size), bar_name or "", "batch", bar_name is not None)
  for start in range(0, len(inputs), batch_size):
    rows = slice(start, start + batch_size)
    with jax.set_mesh(mesh):  # params live on the trainer's mesh
      out = sampler(params, inputs[rows], example_ids[rows], seed=seed, segment_steps=segment_steps)
    outputs.append(jax.tree.map(np.asarray, out))
    bar.update(1)
  bar.close()
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def generate_task(config, trainer: train.Trainer, params, layout, split: data_base.PairedSplit,
                  task: str, with_confidence: bool = False):
  """Generated token rows for every row of ``split`` (the prompts come from its tokens); with
  ``with_confidence``, also the probability each token had when it was drawn (NaN where given)."""
  sampler = sampler_lib.Sampler(trainer.model.apply, layout, trainer.schedule,
                                sampler_lib.SamplerConfig.from_config(config.sample),
                                batch_sharding=sharding.batch_sharding(trainer.mesh),
                                cache_model=trainer.model)
  inputs = sampler_lib.task_inputs(task, split.tokens, split.prompt_length, layout)
  count = int(config.sample.get("rerank_candidates", 1))
  if count < 1:
    raise errors.InputError(f"config.sample.rerank_candidates must be >= 1, got {count}")
  score = config.sample.get("rerank_score", "likelihood")
  if score not in rerank.SCORES:
    raise errors.InputError(f"config.sample.rerank_score must be one of {rerank.SCORES}, got {score!r}")
  if task not in [t.strip() for t in config.sample.get("rerank_tasks", task).split(",")]:
    count = 1
  candidates = [sample_in_batches(
      sampler, params, trainer.mesh, inputs, split.example_id, config.sample.batch_size,
      config.sample.seed * count + c, sampler.steps_for_task(task),
      f"sample {task}" + (f" ({c + 1}/{count})" if count > 1 else "")) for c in range(count)]
  out = candidates[0]
  if count > 1:
    with jax.set_mesh(trainer.mesh):
      scores = rerank.candidate_scores(trainer.model.apply, params, trainer.schedule, layout,
                                       inputs, np.stack([c.tokens for c in candidates]),
                                       config.sample.batch_size, score,
                                       float(config.sample.get("rerank_pmi_weight", 1.0)))
    out = rerank.pick_best(candidates, scores)
  return (out.tokens, out.reveal_prob) if with_confidence else out.tokens


def task_prompts(task: str, split: data_base.PairedSplit, dataset) -> list[str]:
  """The report text each row of ``split`` is conditioned on in ``task`` ('' when none)."""
  layout = dataset.layout
  inputs = sampler_lib.task_inputs(task, split.tokens, split.prompt_length, layout)
  return [dataset.text_tokenizer.decode(ids[ids != layout.mask_id]) if (ids != layout.mask_id).any()
          else "" for ids in inputs[:, layout.text_slice]]


def write_task(out_dir, task, tokens, split, dataset, step) -> None:
  os.makedirs(out_dir, exist_ok=True)
  layout, text_tok, image_tok = dataset.layout, dataset.text_tokenizer, dataset.image_tokenizer
  text_ids, codes = layout.split(tokens)
  images = image_tok.decode(np.asarray(codes))
  reports = [text_tok.decode(ids) for ids in text_ids]
  prompts = task_prompts(task, split, dataset)
  np.save(os.path.join(out_dir, "tokens.npy"), tokens)
  with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
    for i, report in enumerate(reports):
      f.write(json.dumps({"example_id": int(split.example_id[i]), "checkpoint_step": step,
                          "prompt": prompts[i], "generated_report": report,
                          "reference_report": split.reports[i]}) + "\n")
  if task == "image_to_report":
    captions = [[f"gen: {r}", f"ref: {split.reports[i]}"] for i, r in enumerate(reports)]
  elif task == "report_to_image":
    captions = [[f"prompt: {p}"] for p in prompts]
  else:
    captions = [[f"prompt: {p}", f"gen: {r}"] for p, r in zip(prompts, reports)]
  visualize.sample_grid(images, captions, os.path.join(out_dir, "grid.png"))
