"""SUBS parameterisation and the continuous-time weighted cross-entropy (MDLM / MD4).

SUBS: the model never predicts MASK, each position predicts only ids of its own modality, and
unmasked positions copy their input (they carry no loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medim_jax.diffusion.corruption import Corruption
from medim_jax.diffusion.schedules import MaskingSchedule
from medim_jax.tokenizers.vocab import IMAGE, MODALITY_NAMES, TEXT, TokenLayout

# Finite, so that a real NaN/Inf in the model's output stays distinguishable from a masked-out id.
NEG_INF = -1e9
# "elbo": the continuous-time ELBO weight -alpha'(t) / (1 - alpha(t)) (1/t for the paper's
# schedule); "flat": weight 1, MaskGIT's plain masked cross-entropy, which counts the heavily
# masked states generation starts from as much as the nearly clean ones.
LOSS_WEIGHTINGS = ("elbo", "flat")


def allowed_ids(layout: TokenLayout) -> jax.Array:
  """(L, V) bool: which ids each position may hold (its own modality's ids, never MASK)."""
  lo, hi = layout.allowed_id_range()
  ids = jnp.arange(layout.vocab_size)[None, :]
  return (ids >= jnp.asarray(lo)[:, None]) & (ids < jnp.asarray(hi)[:, None])


def restrict_logits(logits: jax.Array, layout: TokenLayout) -> jax.Array:
  """Per-position vocabulary restriction of (B, L, V) logits."""
  return jnp.where(allowed_ids(layout)[None], logits, NEG_INF)


def subs_log_probs(logits: jax.Array, layout: TokenLayout) -> jax.Array:
  return jax.nn.log_softmax(restrict_logits(logits, layout), axis=-1)


def target_nll(logits: jax.Array, tokens: jax.Array, layout: TokenLayout):
  """From (B, L, V) logits: -log p(x0) per position under SUBS (B, L), and whether x0 has the
  highest probability (B, L) bool."""
  log_probs = subs_log_probs(logits, layout)
  target = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  return -target, target >= log_probs.max(axis=-1)


def segment_target_nll(segment_logits, tokens: jax.Array, layout: TokenLayout):
  """``target_nll`` from each segment's logits over its own modality's ids only (B, L_s, V_s),
  in ``layout.segments()`` order: the same values without a (B, L, V) array or a softmax over ids
  a position can never hold (the training step's head and loss cost about half as much)."""
  nll, best = [], []
  for logits, (positions, lo, _) in zip(segment_logits, layout.segments()):
    target_logit = jnp.take_along_axis(logits, (tokens[:, positions] - lo)[..., None], axis=-1)[..., 0]
    nll.append(jax.nn.logsumexp(logits, axis=-1) - target_logit)
    best.append(target_logit >= logits.max(axis=-1))
  return jnp.concatenate(nll, axis=1), jnp.concatenate(best, axis=1)


def diffusion_loss(logits: jax.Array, tokens: jax.Array, corruption: Corruption, t: jax.Array,
                   schedule: MaskingSchedule, layout: TokenLayout,
                   modality_weights: tuple[float, float] = (1.0, 1.0), weighting: str = "elbo"):
  """``weighted_diffusion_loss`` of (B, L, V) logits."""
  nll, best = target_nll(logits, tokens, layout)
  return weighted_diffusion_loss(nll, best, corruption, t, schedule, layout, modality_weights,
                                 weighting)


def weighted_diffusion_loss(nll: jax.Array, best: jax.Array, corruption: Corruption, t: jax.Array,
                            schedule: MaskingSchedule, layout: TokenLayout,
                            modality_weights: tuple[float, float] = (1.0, 1.0),
                            weighting: str = "elbo"):
  """Weighted masked cross-entropy per ELBO term, with separate text and image metrics.

  nll and best are ``target_nll``'s (B, L) arrays. The loss is
  ``sum_masked w(t) * m_weight * -log p(x0) / #noised``: the NELBO per token of the noised region
  (unmasked noised positions contribute 0 under SUBS). Accuracy counts a masked position whose x0
  has the highest probability. Returns (loss, metrics).
  """
  if weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
  time_weight = schedule.weight(t) if weighting == "elbo" else jnp.ones_like(t)
  weighted = nll * time_weight[:, None] * corruption.loss_mask
  correct = best & corruption.loss_mask

  modality = jnp.asarray(layout.modality())[None, :]
  weight_per_position = jnp.where(modality == TEXT, modality_weights[TEXT], modality_weights[IMAGE])
  num_terms = jnp.maximum(corruption.noised.sum(), 1)
  loss = (weighted * weight_per_position).sum() / num_terms

  metrics = {"loss": loss, "masked_fraction": corruption.loss_mask.sum() / num_terms}
  for index, name in enumerate(MODALITY_NAMES):
    in_modality = modality == index
    terms = jnp.maximum((corruption.noised & in_modality).sum(), 1)
    masked = jnp.maximum((corruption.loss_mask & in_modality).sum(), 1)
    metrics[f"{name}_loss"] = (weighted * in_modality).sum() / terms
    metrics[f"{name}_accuracy"] = (correct & in_modality).sum() / masked
  return loss, metrics


def positive_weights(labels, max_weight: float = 20.0) -> np.ndarray:
  """(K,) float32: each finding's negatives / positives over the label rows (N, K), capped at
  ``max_weight``. Most examples have no finding, so its positives would otherwise barely count."""
  labels = np.asarray(labels, np.float32)
  positives = labels.sum(axis=0)
  return np.minimum((len(labels) - positives) / np.maximum(positives, 1),
                    max_weight).astype(np.float32)


def weighted_bce(logits: jax.Array, labels: jax.Array, positive_weight: jax.Array) -> jax.Array:
  """Elementwise weighted binary cross-entropy ``-(w y log s(z) + (1 - y) log s(-z))``."""
  return -(positive_weight * labels * jax.nn.log_sigmoid(logits)
           + (1.0 - labels) * jax.nn.log_sigmoid(-logits))


def finding_loss(finding_logits: jax.Array, labels: jax.Array, known: jax.Array,
                 corruption: Corruption, layout: TokenLayout, positive_weight: jax.Array):
  """The auxiliary finding loss (not in the original): every masked report position of an example
  whose image is whole and whose labels are known predicts the example's findings.

  The generative loss gives a backbone trained from scratch little reason to read the image (a
  finding is one or two of a report's tokens); this puts what the image shows into the report
  positions' hidden states, where the token head can use it. Per position and finding the
  ``weighted_bce`` of the finding classifier, averaged over findings and positions.
  finding_logits (B, L, K), labels (B, K) in {0, 1}, known (B,) bool, positive_weight (K,).
  Returns (loss, metrics).
  """
  modality = jnp.asarray(layout.modality())[None, :]
  image_whole = ~(corruption.is_masked & (modality == IMAGE)).any(axis=1)
  positions = corruption.is_masked & (modality == TEXT) & (known & image_whole)[:, None]
  per_finding = weighted_bce(finding_logits, labels[:, None, :], positive_weight)
  count = positions.sum()
  loss = (per_finding.mean(axis=-1) * positions).sum() / jnp.maximum(count, 1)
  return loss, {"finding_loss": loss, "finding_positions": count.astype(jnp.float32)}
