"""The forward (masking) process with per-example tasks.

Each training example draws a task that says which positions are kept clean, which are fully
masked, and which are noised at the schedule's rate:

| task              | clean                         | fully masked | noised at rate 1 - alpha(t) |
|-------------------|-------------------------------|--------------|-----------------------------|
| ``joint``         | the report's prompt, w.p. p   | -            | everything else             |
| ``report_to_image`` | the report                  | -            | the image                   |
| ``image_to_report`` | the image                   | -            | the report                  |
| ``drop_report``   | -                             | the report   | the image                   |
| ``drop_image``    | -                             | the image    | the report                  |

With ``whole_target_prob`` p > 0, a ``report_to_image`` or ``image_to_report`` example is, with
probability p, moved to t = 1 and its whole target segment masked: the state generation starts
from. IU reports state a finding twice (findings and impression), so in a partly masked report a
masked finding word is often predictable from a visible one; only a whole-masked report makes the
image the only source (not in the original).

The two ``drop_*`` tasks teach the unconditional predictions that classifier-free guidance
contrasts with (the original never trains them: its whole-modality masking is dead code).
Only positions that the schedule masked carry loss; fully masked positions are conditioning
dropout, not targets.

A row with no valid image position (a report without an image, from a text-only dataset:
data/pipeline.py) is always ``drop_image``: its image segment is MASK, as in classifier-free
guidance's unconditional row, and its report is noised, so it trains the report side alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medim_jax.diffusion.schedules import MaskingSchedule
from medim_jax.tokenizers.vocab import IMAGE, TEXT, TokenLayout

TASKS = ("joint", "report_to_image", "image_to_report", "drop_report", "drop_image")


@dataclasses.dataclass(frozen=True)
class TaskMix:
  """Probabilities of the training tasks, and of keeping the report prompt clean in ``joint``."""

  probs: tuple[float, ...]
  keep_prompt_prob: float = 0.1
  whole_target_prob: float = 0.0

  @classmethod
  def from_config(cls, cfg) -> "TaskMix":
    unknown = set(cfg.task_probs.keys()) - set(TASKS)
    if unknown:
      raise ValueError(f"unknown training tasks {sorted(unknown)} in config.diffusion.task_probs; "
                       f"known tasks are {TASKS}")
    probs = tuple(float(cfg.task_probs.get(name, 0.0)) for name in TASKS)
    if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
      raise ValueError(f"config.diffusion.task_probs must be non-negative and sum to 1, got "
                       f"{dict(zip(TASKS, probs))}")
    whole = float(cfg.get("whole_target_prob", 0.0))
    if not 0.0 <= whole <= 1.0:
      raise ValueError(f"config.diffusion.whole_target_prob must lie in [0, 1], got {whole}")
    return cls(probs=probs, keep_prompt_prob=float(cfg.keep_prompt_prob), whole_target_prob=whole)


@dataclasses.dataclass(frozen=True)
class Corruption:
  noisy: jax.Array       # (B, L) int32: x_t, with MASK where masked
  is_masked: jax.Array   # (B, L) bool
  noised: jax.Array      # (B, L) bool: the positions the schedule acts on (the ELBO's terms)
  loss_mask: jax.Array   # (B, L) bool: noised and masked (the terms that carry loss)
  t: jax.Array           # (B,) the time of each example's state (the given t, or 1 for a whole target)


jax.tree_util.register_dataclass(
    Corruption, data_fields=["noisy", "is_masked", "noised", "loss_mask", "t"], meta_fields=[])


def corrupt(key: jax.Array, tokens: jax.Array, valid: jax.Array, prompt_length: jax.Array,
            t: jax.Array, schedule: MaskingSchedule, layout: TokenLayout,
            task_mix: TaskMix) -> Corruption:
  """Sample a task per example and mask ``tokens`` (B, L) at times ``t`` (B,).

  ``valid`` (B, L) marks real positions: invalid ones are never masked and carry no loss.
  ``prompt_length`` (B,) is the number of leading report tokens that form the prompt.
  """
  batch, length = tokens.shape
  task_key, prompt_key, mask_key = jax.random.split(key, 3)
  task = jax.random.choice(task_key, len(TASKS), (batch,), p=jnp.asarray(task_mix.probs))
  keep_prompt = jax.random.bernoulli(prompt_key, task_mix.keep_prompt_prob, (batch,))

  modality = jnp.asarray(layout.modality())[None, :]
  is_text, is_image = modality == TEXT, modality == IMAGE
  has_image = (valid & is_image).any(axis=1)
  task = jnp.where(has_image, task, TASKS.index("drop_image"))
  task_is = lambda name: (task == TASKS.index(name))[:, None]
  in_prompt = jnp.arange(length)[None, :] < prompt_length[:, None]

  clean = ((task_is("joint") & keep_prompt[:, None] & in_prompt & is_text)
           | (task_is("report_to_image") & is_text)
           | (task_is("image_to_report") & is_image))
  forced = (task_is("drop_report") & is_text) | (task_is("drop_image") & is_image)
  noised = valid & ~clean & ~forced

  draw = jax.random.uniform(mask_key, (batch, length)) < schedule.mask_rate(t)[:, None]
  if task_mix.whole_target_prob > 0:
    conditional = (task_is("report_to_image") | task_is("image_to_report"))[:, 0]
    whole = conditional & jax.random.bernoulli(jax.random.fold_in(key, 1),
                                               task_mix.whole_target_prob, (batch,))
    draw = draw | whole[:, None]
    t = jnp.where(whole, 1.0, t)
  loss_mask = noised & draw
  is_masked = loss_mask | (forced & (valid | ~has_image[:, None]))
  noisy = jnp.where(is_masked, layout.mask_id, tokens).astype(jnp.int32)
  return Corruption(noisy=noisy, is_masked=is_masked, noised=noised, loss_mask=loss_mask, t=t)
