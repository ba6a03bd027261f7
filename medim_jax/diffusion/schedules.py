"""Masking schedules of the absorbing-state forward process, with analytic derivatives.

``alpha(t)`` is the probability that a token is still clean at time t in [0, 1]; the mask rate is
``1 - alpha(t)``. The model is conditioned on ``sigma(t) = -log alpha(t)`` (as the original does);
the continuous-time ELBO weights the cross-entropy of a masked token by ``-alpha'(t) / (1 - alpha(t))``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskingSchedule:
  eps: float = 1e-3

  def alpha(self, t):
    raise NotImplementedError

  def dalpha(self, t):
    raise NotImplementedError

  def mask_rate(self, t):
    return 1.0 - self.alpha(t)

  def sigma(self, t):
    """The noise level fed to the timestep embedding."""
    return -jnp.log(self.alpha(t))

  def weight(self, t):
    """Continuous-time ELBO weight of a masked token's cross-entropy: -alpha'(t) / (1 - alpha(t))."""
    return -self.dalpha(t) / self.mask_rate(t)


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule(MaskingSchedule):
  """The paper's schedule: sigma(t) = -log(1 - (1-eps) t), so the mask rate is (1-eps) t; weight 1/t."""

  def alpha(self, t):
    return 1.0 - (1.0 - self.eps) * t

  def dalpha(self, t):
    return jnp.full_like(jnp.asarray(t, jnp.float32), -(1.0 - self.eps))

  def sigma(self, t):
    return -jnp.log1p(-(1.0 - self.eps) * t)


@dataclasses.dataclass(frozen=True)
class LinearSchedule(MaskingSchedule):
  """md4's linear schedule: alpha(t) = (1 - 2 eps)(1 - t) + eps."""

  def alpha(self, t):
    return (1.0 - 2.0 * self.eps) * (1.0 - t) + self.eps

  def dalpha(self, t):
    return jnp.full_like(jnp.asarray(t, jnp.float32), -(1.0 - 2.0 * self.eps))


@dataclasses.dataclass(frozen=True)
class CosineSchedule(MaskingSchedule):
  """md4's cosine schedule: alpha(t) = (1 - 2 eps)(1 - cos(pi/2 (1 - t))) + eps."""

  def alpha(self, t):
    return (1.0 - 2.0 * self.eps) * (1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))) + self.eps

  def dalpha(self, t):
    return -(1.0 - 2.0 * self.eps) * 0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))


SCHEDULES = {"loglinear": LogLinearSchedule, "linear": LinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str, eps: float) -> MaskingSchedule:
  if name not in SCHEDULES:
    raise ValueError(f"unknown masking schedule {name!r}; choose one of {sorted(SCHEDULES)}")
  return SCHEDULES[name](eps=eps)


TIME_WARPS = ("none", "maskgit")


def stratified_times(key: jax.Array, batch_size: int, t_min: float, warp: str = "none") -> jax.Array:
  """Low-discrepancy times over the batch: u_i = (v_i + i) / n, warped, mapped onto [t_min, 1].

  ``warp="none"`` gives uniform t, the ELBO's own weighting of noise levels (the paper).
  ``warp="maskgit"`` draws t = sin(pi/2 u), MaskGIT's cosine mask-ratio distribution: more
  training on heavily masked states, where generation starts. It biases the objective away from
  the ELBO on purpose (better samples from small models); the loss weights are not changed.
  """
  if warp not in TIME_WARPS:
    raise ValueError(f"time warp must be one of {TIME_WARPS}, got {warp!r}")
  u = (jax.random.uniform(key, (batch_size,)) + jnp.arange(batch_size)) / batch_size
  t = jnp.sin(0.5 * math.pi * u) if warp == "maskgit" else u
  return t_min + (1.0 - t_min) * t
