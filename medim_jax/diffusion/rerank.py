"""Best of N: draw several samples per row and keep the one the model itself finds most likely.

A sampler draws a report token by token; the model's likelihood of a whole report given the image
ranks reports by the image better than those draws follow it (docs/reading_study.md: reading AUC
0.82 for cardiomegaly while sampled reports fall below retrieval). So: sample N candidates per row
with sample seeds ``N seed, N seed + 1, ...`` (the candidate sets of seeds 0, 1, ... do not overlap),
score each by the log-probability of its generated tokens under one forward pass at t = 1 (every
generated position masked, the condition given, no guidance), and keep the best. With N = 1 the
sampler's draw is returned as it is. A row's choice depends only on its own candidates: batch-size
invariance is kept.

The plain likelihood log p(candidate | condition) prefers short, common reports whatever the image
(the reading probe saw the same when ranking training reports). ``score="pmi"`` ranks by the
pointwise mutual information log p(candidate | condition) - log p(candidate) instead: the second
term from one more pass with the condition masked too, the unconditional row classifier-free
guidance uses. It keeps the candidate the condition raises most. ``pmi_weight`` w scales the
second term (log p(candidate | condition) - w log p(candidate)): 0 is the plain likelihood, 1 the
PMI, values between temper the PMI's preference for rare words.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medim_jax.diffusion import loss as loss_lib


SCORES = ("likelihood", "pmi")


def target_log_likelihood(apply_fn, params, schedule, layout, inputs: np.ndarray,
                          candidates: np.ndarray, batch_size: int,
                          scored: np.ndarray | None = None) -> np.ndarray:
  """(N, B): for each of N candidate token rows (N, B, L), the summed log-probability of its tokens
  at the positions ``scored`` (B, L; default: those ``inputs`` masks), under the model given
  ``inputs`` at t = 1."""
  inputs, candidates = np.asarray(inputs), np.asarray(candidates)
  scored = inputs == layout.mask_id if scored is None else np.asarray(scored, bool)

  @jax.jit
  def scores(params, rows, rows_candidates, rows_scored):
    sigma = jnp.full((rows.shape[0],), schedule.sigma(jnp.float32(1.0)), jnp.float32)
    log_probs = loss_lib.subs_log_probs(apply_fn(params, rows, sigma), layout)  # (b, L, V)
    picked = jnp.take_along_axis(log_probs[None], rows_candidates[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(rows_scored[None], picked, 0.0), axis=-1)  # (N, b)

  out = [np.asarray(scores(params, jnp.asarray(inputs[s]), jnp.asarray(candidates[:, s]),
                           jnp.asarray(scored[s])))
         for s in (slice(i, i + batch_size) for i in range(0, len(inputs), batch_size))]
  return np.concatenate(out, axis=1)


def candidate_scores(apply_fn, params, schedule, layout, inputs: np.ndarray,
                     candidates: np.ndarray, batch_size: int, score: str = "likelihood",
                     pmi_weight: float = 1.0) -> np.ndarray:
  """(N, B): what best of N ranks by, ``score`` one of SCORES (see the module's docstring)."""
  if score not in SCORES:
    raise ValueError(f"rerank score must be one of {SCORES}, got {score!r}")
  conditional = target_log_likelihood(apply_fn, params, schedule, layout, inputs, candidates,
                                      batch_size)
  if score == "likelihood":
    return conditional
  inputs = np.asarray(inputs)
  unconditional = target_log_likelihood(apply_fn, params, schedule, layout,
                                        np.full_like(inputs, layout.mask_id), candidates,
                                        batch_size, scored=inputs == layout.mask_id)
  return conditional - pmi_weight * unconditional


def pick_best(candidate_outputs: list, scores: np.ndarray):
  """The rows of the highest-scoring candidate (first on ties), from N outputs with NumPy leaves."""
  best = np.argmax(np.asarray(scores), axis=0)  # (B,)
  rows = np.arange(best.shape[0])
  return jax.tree.map(lambda *leaves: np.stack(leaves)[best, rows], *candidate_outputs)
