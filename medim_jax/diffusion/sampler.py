"""Generation: one jitted loop that unmasks tokens step by step.

The task is only a matter of which positions start as MASK: report->image masks the image
segment, image->report the text segment, joint both (optionally keeping a report prompt), and
infilling any other pattern. Positions that are not MASK at the start are the condition and are
never changed; a revealed token is never changed again.

Strategies:
- ``confidence``: the original MeDiM/MaskGIT sampler. At each step a token is drawn at every
  masked position; ``log p(token) + gumbel_scale * t * Gumbel`` ranks them, and the top-k of each
  segment are revealed, k following a reveal schedule (arccos, cosine or linear).
- ``ancestral``: MDLM/MD4. Each masked position is revealed with probability
  ``(alpha(s) - alpha(t)) / (1 - alpha(t))`` when time moves from t to s.

Image and text segments may use their own step counts: both run in one loop of
``max(steps)`` iterations, each segment's reveals spread evenly over it.

Adaptive strategies reveal as many tokens per step as the model is sure of, so easy samples take
fewer model calls; ``max(steps)`` is then only the most a row may take (the last step reveals all
that is left). Each reveals at least one token per row and segment per step:
- ``threshold`` (Fast-dLLM): every masked position whose drawn token has probability above
  ``reveal_threshold``;
- ``margin``: every position whose top-1 minus top-2 probability is above ``reveal_threshold``;
- ``entropy_bound`` (EB-sampler): positions in order of increasing entropy, as long as the
  entropies revealed add up to at most ``reveal_threshold`` nats.
With ``early_exit`` the loop ends once no row has a MASK left (a ``while_loop``); a finished row
never changes, so this returns what running every step returns. ``SampleOutput.model_calls`` counts
the steps each row used.

The condition cache (``condition_cache_every = K > 0``, for image->report and report->image: one
segment given whole in every row): the model computes every position once every K steps and keeps
each layer's keys and values of the given segment; the steps between compute only the generated
segment, attending to those. The given tokens never change, but their keys and values do a little
(they attend to the generated tokens and see t through AdaLN), so this is an approximation (the
dKV-Cache / Fast-dLLM idea); K = 1 recomputes every step and gives exactly the uncached samples.
An exact cache does not exist for this model: in a bidirectional transformer with AdaLN no layer's
keys of the condition are independent of the step. Tasks without a whole given segment (joint,
unconditional) run uncached.

Each generated segment draws only over its own ids (a report position can only hold a text id, an
image position an image code), with the key of its row and step folded with the segment's index.
Randomness is per example: the key of example ``i`` at step ``j`` is
``fold_in(fold_in(PRNGKey(seed), example_id[i]), j)``, so a sample does not depend on the batch
it is generated in. Non-finite model outputs are recorded per example and raised by
:func:`check_finite` (called by :class:`Sampler`), never silently zeroed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medim_jax.diffusion.schedules import MaskingSchedule
from medim_jax.tokenizers.vocab import IMAGE, MODALITY_NAMES, TEXT, TokenLayout

FIXED_STRATEGIES = ("confidence", "ancestral")           # a set number of tokens per step
ADAPTIVE_STRATEGIES = ("threshold", "margin", "entropy_bound")  # as many as the model is sure of
STRATEGIES = FIXED_STRATEGIES + ADAPTIVE_STRATEGIES
REVEAL_SCHEDULES = ("arccos", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  strategy: str = "confidence"
  text_steps: int = 128
  image_steps: int = 128
  reveal_schedule: str = "arccos"      # confidence: how many tokens each step reveals
  cfg_scale: float = 5.0               # 0 disables classifier-free guidance
  cfg_ramp: bool = True                # w(t) = cfg_scale * (1 - t) as in the original; else constant
  gumbel_scale: float = 10.0           # confidence noise = gumbel_scale * t * Gumbel (original: 10)
  image_gumbel_scale: float = -1.0     # the image positions' scale instead, when >= 0
  temperature: float = 1.0             # of the token draw
  time_input: str = "mask_ratio"       # "mask_ratio": sigma from the actual masked fraction; "nominal"
  final_t: float = 1e-5
  reveal_threshold: float = 0.9        # adaptive strategies: probability, margin, or entropy (nats)
  early_exit: bool = True              # stop the loop once every row is finished
  condition_cache_every: int = 0       # K > 0: recompute the condition's keys/values every K steps

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"sampler strategy must be one of {STRATEGIES}, got {self.strategy!r}")
    if self.reveal_schedule not in REVEAL_SCHEDULES:
      raise ValueError(f"reveal_schedule must be one of {REVEAL_SCHEDULES}, got {self.reveal_schedule!r}")
    if self.time_input not in ("mask_ratio", "nominal"):
      raise ValueError(f"time_input must be 'mask_ratio' or 'nominal', got {self.time_input!r}")
    if min(self.text_steps, self.image_steps) < 1:
      raise ValueError("text_steps and image_steps must be >= 1")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be positive, got {self.temperature}")
    if self.condition_cache_every < 0:
      raise ValueError(f"condition_cache_every must be >= 0 (0: no cache), got {self.condition_cache_every}")
    if self.reveal_threshold < 0:
      raise ValueError(f"reveal_threshold must be >= 0, got {self.reveal_threshold}")
    if self.gumbel_scale < 0:
      raise ValueError(f"gumbel_scale must be >= 0, got {self.gumbel_scale}")

  @classmethod
  def from_config(cls, cfg) -> "SamplerConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: cfg[k] for k in names if k in cfg})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleOutput:
  tokens: jax.Array          # (B, L) int32, no MASK left
  reveal_step: jax.Array     # (B, L) int32: loop step that revealed the position; -1 if given;
                             # num_steps if filled by the final argmax pass
  nonfinite_step: jax.Array  # (B,) int32: first step with a non-finite model output, -1 if none
  reveal_prob: jax.Array     # (B, L) float32: the probability the (guided, tempered) distribution
                             # gave the token when it was revealed; NaN where the token was given
  model_calls: jax.Array     # (B,) int32: model evaluations the row took (loop steps with a MASK
                             # left, plus the final argmax pass); each is 2 forward passes with CFG


def cumulative_reveal_fraction(schedule: str, steps: int) -> np.ndarray:
  """(steps + 1,) fraction of a segment's masked tokens revealed after k of its steps (0 -> 1)."""
  k = np.arange(steps + 1, dtype=np.float64)
  if schedule == "linear":
    frac = k / steps
  elif schedule == "cosine":  # MaskGIT: mask ratio cos(pi/2 * k/steps)
    frac = 1.0 - np.cos(0.5 * math.pi * k / steps)
  elif schedule == "arccos":  # the original: per-step share proportional to arccos(r), r: 1 -> 0
    share = np.arccos(np.linspace(1.0, 0.0, steps + 1)[1:]) / (0.5 * math.pi)
    frac = np.concatenate([[0.0], np.cumsum(share) / share.sum()])
  else:
    raise ValueError(f"unknown reveal schedule {schedule!r}")
  frac[-1] = 1.0
  return frac.astype(np.float32)


def confidence_reveal(candidates, confidence, initial_masked, fraction_after, steps_after):
  """The confidence sampler's choice for one segment: reveal its most confident masked positions
  until ``fraction_after`` of the ``initial_masked`` (B,) are revealed (at least ``steps_after``
  tokens, so every step of the segment's schedule reveals one). candidates: (B, L) still masked."""
  target = jnp.maximum(jnp.round(initial_masked * fraction_after),
                       jnp.minimum(steps_after, initial_masked)).astype(jnp.int32)
  count = target - (initial_masked - candidates.sum(1))
  ranked = jnp.where(candidates, confidence, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-ranked, axis=1, stable=True), axis=1)
  return candidates & (rank < count[:, None])


def adaptive_reveal(candidates, score, strategy: str, threshold: float):
  """An adaptive strategy's choice for one segment: (B, L) bool.

  candidates: (B, L) still masked. score: (B, L) the drawn token's probability (``threshold``),
  the top-1 minus top-2 probability (``margin``) or minus the entropy (``entropy_bound``). The best
  scored candidate of each row is always revealed, so every step makes progress."""
  ranked = jnp.where(candidates, score, -jnp.inf)
  best = candidates & (jnp.arange(score.shape[1])[None] == jnp.argmax(ranked, axis=1)[:, None])
  if strategy == "entropy_bound":
    entropy = jnp.where(candidates, -score, 0.0)
    order = jnp.argsort(jnp.where(candidates, entropy, jnp.inf), axis=1, stable=True)
    within = jnp.cumsum(jnp.take_along_axis(entropy, order, axis=1), axis=1) <= threshold
    chosen = jnp.take_along_axis(within, jnp.argsort(order, axis=1), axis=1)  # back in place
  else:
    chosen = score > threshold
  return (candidates & chosen) | best


def adaptive_score(strategy: str, log_probs, chosen):
  """The per-position certainty an adaptive strategy ranks by (higher = surer)."""
  if strategy == "threshold":
    return jnp.exp(chosen)
  if strategy == "margin":
    top2 = jnp.exp(jax.lax.top_k(log_probs, 2)[0])
    return top2[..., 0] - top2[..., 1]
  probs = jnp.exp(log_probs)
  return jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)  # minus the entropy


def example_keys(seed: jax.Array, example_ids: jax.Array, step) -> jax.Array:
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), step))(example_ids)


class Sampler:
  """Builds the jitted sampling loop once for a model and reuses it across calls.

  ``apply_fn(params, tokens (B, L), sigma (B,)) -> logits (B, L, V)`` in float32.
  """

  def __init__(self, apply_fn: Callable, layout: TokenLayout, schedule: MaskingSchedule,
               config: SamplerConfig, batch_sharding: jax.sharding.NamedSharding | None = None,
               cache_model=None):
    """``batch_sharding`` splits each call's rows over a mesh (padded to a multiple of its shards
    with copies of the last row, which cannot change the other rows' samples). ``cache_model``:
    what the condition cache calls (``training.train.Model``: ``apply_and_context`` and
    ``apply_query``); needed when ``config.condition_cache_every > 0``."""
    if config.condition_cache_every and cache_model is None:
      raise ValueError("condition_cache_every > 0 needs the model's cached forward passes "
                       "(Sampler(..., cache_model=trainer.model))")
    self.apply_fn = apply_fn
    self.cache_model = cache_model
    self.layout = layout
    self.schedule = schedule
    self.config = config
    self.batch_sharding = batch_sharding
    self._jitted = jax.jit(self._sample, static_argnames=("segment_steps", "generated", "query"))

  def steps_for_task(self, task: str) -> tuple[int, int]:
    """Step counts (text, image) for a task: 0 for the segment it does not generate."""
    if task not in GENERATION_TASKS:
      raise ValueError(f"unknown generation task {task!r}; choose from {GENERATION_TASKS}")
    return (0 if task == "report_to_image" else self.config.text_steps,
            0 if task == "image_to_report" else self.config.image_steps)

  def __call__(self, params, tokens, example_ids, seed: int = 0,
               segment_steps: tuple[int, int] | None = None) -> SampleOutput:
    """Generate every MASK of ``tokens``. ``segment_steps`` (text, image) defaults to the config's;
    a sample depends only on its own row, its example id, the seed and these step counts."""
    tokens = np.asarray(tokens, np.int32)
    example_ids = np.asarray(example_ids, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != self.layout.seq_length:
      raise ValueError(f"tokens must have shape (batch, {self.layout.seq_length}), got {tokens.shape}")
    if example_ids.shape != tokens.shape[:1]:
      raise ValueError(f"example_ids must have shape {tokens.shape[:1]}, got {example_ids.shape}")
    self._check_given_tokens(tokens)
    segment_steps = tuple(segment_steps or (self.config.text_steps, self.config.image_steps))
    for name, sl, steps in zip(MODALITY_NAMES, (self.layout.text_slice, self.layout.image_slice),
                               segment_steps):
      if steps == 0 and (tokens[:, sl] == self.layout.mask_id).any():
        raise ValueError(f"the {name} segment has MASK tokens but 0 sampling steps")
    if max(segment_steps) < 1:
      raise ValueError(f"segment_steps {segment_steps} give the sampler nothing to do")
    rows = tokens.shape[0]
    out = self._jitted(params, self._on_devices(tokens), self._on_devices(example_ids),
                       jnp.asarray(seed), segment_steps=segment_steps,
                       generated=self.generated_segments(tokens), query=self.cached_query(tokens))
    out = jax.tree.map(lambda x: x[:rows], out)
    check_finite(out, example_ids)
    return out

  def generated_segments(self, tokens: np.ndarray) -> tuple[int, ...]:
    """The segments (0 text, 1 image) with a MASK in some row: the only ones drawn from."""
    masked = tokens == self.layout.mask_id
    return tuple(seg for seg, (positions, _, _) in enumerate(self.layout.segments())
                 if masked[:, positions].any())

  def cached_query(self, tokens: np.ndarray) -> tuple[int, int] | None:
    """The token range the condition cache recomputes between refreshes: the one generated segment
    when the other is given whole in every row; None without a cache or such a segment."""
    generated = self.generated_segments(tokens)
    if not self.config.condition_cache_every or len(generated) != 1:
      return None
    positions = self.layout.segments()[generated[0]][0]
    return (positions.start, positions.stop)

  def _on_devices(self, rows: np.ndarray) -> jax.Array:
    if self.batch_sharding is None:
      return jnp.asarray(rows)
    axes = self.batch_sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([self.batch_sharding.mesh.shape[a] for a in axes]))
    padding = -len(rows) % shards
    rows = np.concatenate([rows, np.repeat(rows[-1:], padding, axis=0)]) if padding else rows
    return jax.device_put(rows, self.batch_sharding)

  def _check_given_tokens(self, tokens):
    lo, hi = self.layout.allowed_id_range()
    given = tokens != self.layout.mask_id
    bad = given & ((tokens < lo[None]) | (tokens >= hi[None]))
    if bad.any():
      row, pos = np.argwhere(bad)[0]
      raise ValueError(f"conditioning token {tokens[row, pos]} at row {row}, position {pos} is not a "
                       f"{MODALITY_NAMES[self.layout.modality()[pos]]} id (allowed [{lo[pos]}, {hi[pos]}))")

  # -- the jitted loop ------------------------------------------------------------------------

  def _guided_log_probs(self, params, x, given, sigma, t, generated, forward=None):
    """Log-probabilities with classifier-free guidance of each generated segment (``generated``:
    segment indices) over that segment's own ids, (B, L_s, V_s); a per-row non-finite flag; and
    what ``forward(rows, sigma) -> (per-segment logits, aux)`` returned beside them (default: the
    plain model, aux None). A position can only hold its segment's ids, so the other ids' logits
    are never drawn from (at the paper's layout that is 3x fewer values to draw over)."""
    cfg = self.config
    forward = forward or (lambda rows, s: (self._segment_logits(self.apply_fn(params, rows, s),
                                                                generated), None))
    if cfg.cfg_scale > 0:
      unconditional = jnp.where(given, self.layout.mask_id, x)
      logits, aux = forward(jnp.concatenate([x, unconditional]), jnp.concatenate([sigma, sigma]))
      w = (cfg.cfg_scale * (1.0 - t) if cfg.cfg_ramp else jnp.full_like(t, cfg.cfg_scale))[:, None, None]
      logits = [(1.0 + w) * cond - w * uncond for cond, uncond in (jnp.split(l, 2) for l in logits)]
    else:
      logits, aux = forward(x, sigma)
    nonfinite = jnp.any(jnp.stack([~jnp.all(jnp.isfinite(l), axis=(1, 2)) for l in logits]), axis=0)
    return [jax.nn.log_softmax(l / cfg.temperature, axis=-1) for l in logits], nonfinite, aux

  def _segment_logits(self, logits, generated):
    """(B, L, V) logits -> per generated segment, its positions' logits over its own ids."""
    segments = self.layout.segments()
    return [logits[:, segments[seg][0], segments[seg][1]:segments[seg][2]] for seg in generated]

  def _draw(self, log_probs, generated, keys, x):
    """A token drawn from each generated segment's distribution: (sampled (B, L) ids, x's where no
    segment is generated; chosen (B, L) their log-probabilities, 0 there; per generated segment
    (log_probs, chosen) for the adaptive scores). Each segment draws with its own key, folded
    from the row's ``keys``."""
    sampled, chosen, per_segment = [], [], {}
    for seg, (positions, lo, _) in enumerate(self.layout.segments()):
      if seg not in generated:
        sampled.append(x[:, positions])
        chosen.append(jnp.zeros(x[:, positions].shape, jnp.float32))
        continue
      seg_log_probs = log_probs[generated.index(seg)]
      seg_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, seg)
      ids = jax.vmap(jax.random.categorical)(seg_keys, seg_log_probs)
      seg_chosen = jnp.take_along_axis(seg_log_probs, ids[..., None], axis=-1)[..., 0]
      sampled.append(ids + lo)
      chosen.append(seg_chosen)
      per_segment[seg] = (seg_log_probs, seg_chosen)
    return jnp.concatenate(sampled, 1), jnp.concatenate(chosen, 1), per_segment

  def _cached_forward(self, params, query, generated, context, refresh):
    """The model for one loop step under the condition cache: every position and a new context when
    ``refresh``, else the query segment only (its logits over its own ids)."""
    (_, lo, hi), = [self.layout.segments()[seg] for seg in generated]

    def everything(rows, sigma, context):
      logits, context = self.cache_model.apply_and_context(params, rows, sigma, query)
      return self._segment_logits(logits, generated), context

    def query_only(rows, sigma, context):
      return [self.cache_model.apply_query(params, rows, sigma, query, context, ids=(lo, hi))], context

    if self.config.condition_cache_every == 1:  # every step refreshes: no branch to compile
      return lambda rows, sigma: everything(rows, sigma, context)
    return lambda rows, sigma: jax.lax.cond(refresh, everything, query_only, rows, sigma, context)

  def _sigma(self, x, generate, t):
    if self.config.time_input == "nominal":
      return self.schedule.sigma(t)
    # The masked fraction of the generated region is what training conditioned on.
    masked_fraction = (x == self.layout.mask_id).sum(1) / jnp.maximum(generate.sum(1), 1)
    alpha = jnp.maximum(1.0 - masked_fraction, self.schedule.alpha(1.0))
    return -jnp.log(alpha)

  def _empty_context(self, params, tokens, query):
    """Zeros shaped like the condition cache the loop carries (None without one)."""
    if query is None:
      return None
    rows = tokens.shape[0] * (2 if self.config.cfg_scale > 0 else 1)
    shapes = jax.eval_shape(
        lambda p, rows, sigma: self.cache_model.apply_and_context(p, rows, sigma, query)[1], params,
        jax.ShapeDtypeStruct((rows, tokens.shape[1]), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def _sample(self, params, tokens, example_ids, seed, *, segment_steps, generated, query=None):
    cfg, layout = self.config, self.layout
    batch, length = tokens.shape
    num_steps = max(segment_steps)
    generate = tokens == layout.mask_id
    given = ~generate
    modality = jnp.asarray(layout.modality())
    in_segment = [modality == TEXT, modality == IMAGE]
    # The confidence noise's scale: one number, or per position where generated images have their own.
    noise_scale = cfg.gumbel_scale
    if 0 <= cfg.image_gumbel_scale != cfg.gumbel_scale:
      noise_scale = jnp.where(in_segment[1], cfg.image_gumbel_scale, cfg.gumbel_scale)[None, :]
    initial_masked = [jnp.sum(generate & seg[None], axis=1) for seg in in_segment]  # (B,) each
    fractions = [jnp.asarray(cumulative_reveal_fraction(cfg.reveal_schedule, max(s, 1)))
                 for s in segment_steps]

    def segment_progress(step, seg):
      """Steps of the segment's own schedule completed before and after loop step ``step``."""
      s = segment_steps[seg]
      return (step * s) // num_steps, ((step + 1) * s) // num_steps

    adaptive = cfg.strategy in ADAPTIVE_STRATEGIES

    def body(carry):
      step, x, reveal_step, nonfinite_step, reveal_prob, model_calls, context = carry
      masked = x == layout.mask_id
      if adaptive:  # time follows each row's own progress, which is not set by the step
        left = masked.sum(1) / jnp.maximum(generate.sum(1), 1)
        t = jnp.clip(left, cfg.final_t, 1.0).astype(jnp.float32)
      else:
        t = jnp.full((batch,), 1.0 - step / num_steps * (1.0 - cfg.final_t), jnp.float32)
      model_calls = model_calls + jnp.any(masked, axis=1)
      forward = (None if query is None else self._cached_forward(
          params, query, generated, context, step % cfg.condition_cache_every == 0))
      log_probs, nonfinite, new_context = self._guided_log_probs(
          params, x, given, self._sigma(x, generate, t), t, generated, forward)
      context = context if query is None else new_context
      nonfinite_step = jnp.where(nonfinite & (nonfinite_step < 0), step, nonfinite_step)

      keys = example_keys(seed, example_ids, step)
      draw_keys, noise_keys = jnp.split(jax.vmap(jax.random.split)(keys), 2, axis=1)
      sampled, chosen, per_segment = self._draw(log_probs, generated, draw_keys[:, 0], x)
      noise_fn = jax.random.gumbel if cfg.strategy == "confidence" else jax.random.uniform
      noise = jax.vmap(lambda k: noise_fn(k, (length,)))(noise_keys[:, 0])
      if cfg.strategy == "confidence":
        confidence = chosen + noise_scale * t[:, None] * noise
      if adaptive:
        score = jnp.concatenate(
            [adaptive_score(cfg.strategy, *per_segment[seg]) if seg in per_segment else
             jnp.full((batch, positions.stop - positions.start), -jnp.inf)
             for seg, (positions, _, _) in enumerate(layout.segments())], 1)

      reveal = jnp.zeros_like(masked)
      for seg, seg_mask in enumerate(in_segment):
        if seg not in generated:
          continue
        done_before, done_after = segment_progress(step, seg)
        candidates = masked & seg_mask[None]
        if adaptive:  # the last step reveals whatever is left
          reveal |= jnp.where(step == num_steps - 1, candidates,
                              adaptive_reveal(candidates, score, cfg.strategy, cfg.reveal_threshold))
        elif cfg.strategy == "confidence":
          reveal |= confidence_reveal(candidates, confidence, initial_masked[seg],
                                      fractions[seg][done_after], done_after)
        else:
          s_now = 1.0 - done_before / segment_steps[seg]
          s_next = 1.0 - done_after / segment_steps[seg]
          alpha_now, alpha_next = self.schedule.alpha(s_now), self.schedule.alpha(s_next)
          unmask_prob = (alpha_next - alpha_now) / (1.0 - alpha_now)
          reveal |= candidates & (noise < unmask_prob)

      x = jnp.where(reveal, sampled, x)
      reveal_step = jnp.where(reveal, step, reveal_step)
      reveal_prob = jnp.where(reveal, jnp.exp(chosen), reveal_prob)
      return step + 1, x, reveal_step, nonfinite_step, reveal_prob, model_calls, context

    def unfinished(carry):
      step, x = carry[:2]
      more = step < num_steps
      return (more & jnp.any(x == layout.mask_id)) if cfg.early_exit else more

    init = (jnp.asarray(0, jnp.int32), tokens, jnp.where(given, -1, num_steps).astype(jnp.int32),
            jnp.full((batch,), -1, jnp.int32), jnp.full((batch, length), jnp.nan, jnp.float32),
            jnp.zeros((batch,), jnp.int32), self._empty_context(params, tokens, query))
    _, x, reveal_step, nonfinite_step, reveal_prob, model_calls, _ = jax.lax.while_loop(
        unfinished, body, init)

    def final_fill(x, nonfinite_step, reveal_prob, model_calls):
      """Argmax at t ~ 0 for whatever is still masked (e.g. ancestral with alpha(0) < 1)."""
      t = jnp.full((batch,), cfg.final_t, jnp.float32)
      log_probs, nonfinite, _ = self._guided_log_probs(params, x, given,
                                                       self._sigma(x, generate, t), t, generated)
      left = x == layout.mask_id
      nonfinite &= left.any(axis=1)  # only rows this pass fills: keeps rows batch-independent
      nonfinite_step = jnp.where(nonfinite & (nonfinite_step < 0), num_steps, nonfinite_step)
      best, best_prob = [], []
      for seg, (positions, lo, _) in enumerate(layout.segments()):
        if seg in generated:
          best.append(jnp.argmax(log_probs[generated.index(seg)], -1) + lo)
          best_prob.append(jnp.exp(jnp.max(log_probs[generated.index(seg)], -1)))
        else:
          best.append(x[:, positions])
          best_prob.append(reveal_prob[:, positions])
      best, best_prob = jnp.concatenate(best, 1), jnp.concatenate(best_prob, 1)
      return (jnp.where(left, best, x), nonfinite_step, jnp.where(left, best_prob, reveal_prob),
              model_calls + left.any(axis=1))

    x, nonfinite_step, reveal_prob, model_calls = jax.lax.cond(
        jnp.any(x == layout.mask_id), final_fill, lambda *carry: carry, x, nonfinite_step,
        reveal_prob, model_calls)
    return SampleOutput(tokens=x.astype(jnp.int32), reveal_step=reveal_step,
                        nonfinite_step=nonfinite_step, reveal_prob=reveal_prob,
                        model_calls=model_calls)


def check_finite(out: SampleOutput, example_ids) -> None:
  steps = np.asarray(out.nonfinite_step)
  bad = np.flatnonzero(steps >= 0)
  if bad.size:
    listing = ", ".join(f"example {int(example_ids[i])} at step {int(steps[i])}" for i in bad[:8])
    raise FloatingPointError(
        f"the model produced NaN/Inf logits while sampling ({listing}"
        f"{', ...' if bad.size > 8 else ''}); the samples would be garbage, so none are returned. "
        "Check the checkpoint (a diverged run?) and the compute dtype (try float32).")


GENERATION_TASKS = ("report_to_image", "image_to_report", "joint", "unconditional")


def task_inputs(task: str, tokens: np.ndarray, prompt_length: np.ndarray,
                layout: TokenLayout) -> np.ndarray:
  """Mask the positions a task generates: the image, the report, all but the prompt, or everything."""
  if task not in GENERATION_TASKS:
    raise ValueError(f"unknown generation task {task!r}; choose from {GENERATION_TASKS}")
  x = np.array(tokens, np.int32, copy=True)
  if task in ("report_to_image", "joint", "unconditional"):
    x[:, layout.image_slice] = layout.mask_id
  if task == "image_to_report" or task == "unconditional":
    x[:, layout.text_slice] = layout.mask_id
  if task == "joint":
    beyond_prompt = np.arange(layout.text_length)[None, :] >= np.asarray(prompt_length)[:, None]
    x[:, layout.text_slice] = np.where(beyond_prompt, layout.mask_id, x[:, layout.text_slice])
  return x
