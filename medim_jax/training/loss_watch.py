"""Per-step losses read on the host: non-finite steps and loss spikes.

The jitted train step never applies a non-finite update (it keeps the previous params, optimizer
state and EMA, see ``train.Trainer``); this watch decides what happens next. ``skip`` carries on
(and gives up after ``max_consecutive_nonfinite`` bad steps in a row, which no longer looks like a
rare bad batch); ``stop`` ends the run at once, before anything is checkpointed after the bad step.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from medim_jax import errors

ON_NONFINITE = ("skip", "stop")


class LossWatch:

  def __init__(self, on_nonfinite: str = "skip", max_consecutive_nonfinite: int = 10,
               spike_sigma: float = 6.0, history: int = 200, min_history: int = 20):
    if on_nonfinite not in ON_NONFINITE:
      raise errors.InputError(f"config.train.on_nonfinite must be one of {ON_NONFINITE}, got "
                              f"{on_nonfinite!r}")
    self.on_nonfinite, self.max_consecutive = on_nonfinite, max_consecutive_nonfinite
    self.spike_sigma, self.min_history = spike_sigma, min_history
    self.recent = collections.deque(maxlen=history)
    self.consecutive = 0
    self.skipped = 0

  @classmethod
  def from_config(cls, train_config) -> "LossWatch":
    return cls(train_config.on_nonfinite, train_config.max_consecutive_nonfinite,
               train_config.loss_spike_sigma)

  def observe(self, step: int, loss: float, nonfinite: bool) -> str | None:
    """A line to log about this step, if any; raises NonFiniteError when the run must stop."""
    if nonfinite:
      self.consecutive += 1
      self.skipped += 1
      what = f"non-finite loss or gradient at step {step} (loss={loss})"
      if self.on_nonfinite == "stop":
        raise errors.NonFiniteError(
            f"{what}: the update was not applied and nothing was saved after it. Lower "
            "config.train.learning_rate, check the data near this step, or set "
            "config.train.on_nonfinite=skip")
      if self.consecutive > self.max_consecutive:
        raise errors.NonFiniteError(
            f"{what}: {self.consecutive} non-finite steps in a row (more than "
            "config.train.max_consecutive_nonfinite); the params are those before the first of them")
      return f"step {step}: {what}; update skipped ({self.consecutive} in a row, {self.skipped} in all)"
    self.consecutive = 0
    note = None
    if self.spike_sigma > 0 and len(self.recent) >= self.min_history:
      mean, std = float(np.mean(self.recent)), float(np.std(self.recent))
      if loss > mean + self.spike_sigma * max(std, 1e-6) and math.isfinite(loss):
        note = (f"step {step}: loss spike {loss:.4g} (mean {mean:.4g}, std {std:.3g} over the last "
                f"{len(self.recent)} steps)")
    self.recent.append(loss)
    return note


def applied_if_finite(finite, new, old):
  """``new`` where ``finite`` (a traced bool) holds, else ``old``, leaf by leaf: how a jitted step
  keeps its previous state after a non-finite loss or gradient."""
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def read_and_watch(watch: LossWatch, unread, checkpointer, on_note=None) -> list[dict]:
  """Host copies of the metrics of ``unread`` [(step, device metrics)], after ``watch`` has seen
  each step; ``on_note(step, note, metrics)`` gets its log lines. Reading waits for those steps.
  A NonFiniteError that ends the run names the last checkpoint, which holds no bad update."""
  import jax
  read = jax.device_get([metrics for _, metrics in unread])
  for (step, _), metrics in zip(unread, read):
    try:
      note = watch.observe(step, float(metrics["loss"]), bool(metrics["nonfinite"]))
    except errors.NonFiniteError as e:
      latest = checkpointer.latest_step()
      where = f"{checkpointer.directory}/{latest}" if latest is not None else "none yet"
      raise errors.NonFiniteError(f"{e}. Last checkpoint: {where}") from None
    if note and on_note:
      on_note(step, note, metrics)
  return read
