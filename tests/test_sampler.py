"""Sampler invariants: conditions untouched, no MASK left, reveals final, modality-correct ids,
batch-size invariance, per-segment step counts, CFG arithmetic, and loud failure on NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medim_jax.diffusion import loss as loss_lib, sampler as sampler_lib, schedules
from medim_jax.tokenizers.vocab import IMAGE, TEXT

LAYOUT = helpers.LAYOUT
APPLY, PARAMS = helpers.tiny_model(seed=3)


def make_sampler(apply=APPLY, **kwargs):
  kwargs.setdefault("text_steps", 3)
  kwargs.setdefault("image_steps", 5)
  kwargs.setdefault("cfg_scale", 1.5)
  return sampler_lib.Sampler(apply, LAYOUT, schedules.LogLinearSchedule(),
                             sampler_lib.SamplerConfig(**kwargs))


def inputs(task, batch=6, seed=0):
  rng = np.random.default_rng(seed)
  tokens = helpers.random_tokens(rng, batch)
  return tokens, sampler_lib.task_inputs(task, tokens, np.full(batch, 2), LAYOUT)


def random_partial_mask(batch=6, seed=0):
  rng = np.random.default_rng(seed)
  tokens = helpers.random_tokens(rng, batch)
  return tokens, np.where(rng.random(tokens.shape) < 0.6, LAYOUT.mask_id, tokens).astype(np.int32)


CASES = [(strategy, task) for strategy in sampler_lib.FIXED_STRATEGIES
         for task in (*sampler_lib.GENERATION_TASKS, "infill")]


@pytest.mark.parametrize("strategy,task", CASES)
def test_conditions_kept_masks_gone_and_ids_in_their_modality(strategy, task):
  _, x = random_partial_mask() if task == "infill" else inputs(task)
  sampler = make_sampler(strategy=strategy)
  steps = None if task == "infill" else sampler.steps_for_task(task)
  out = sampler(PARAMS, x, np.arange(len(x)), seed=1, segment_steps=steps)
  num_steps = max(steps or (3, 5))
  tokens = np.asarray(out.tokens)
  given = x != LAYOUT.mask_id
  np.testing.assert_array_equal(tokens[given], x[given])
  assert not (tokens == LAYOUT.mask_id).any()
  modality = LAYOUT.modality()
  assert (tokens[:, modality == TEXT] < LAYOUT.text_vocab_size).all()
  assert (tokens[:, modality == IMAGE] >= LAYOUT.image_offset).all()
  reveal = np.asarray(out.reveal_step)
  # Every generated position is revealed inside the loop (none is left to the final argmax).
  assert (reveal[given] == -1).all() and (reveal[~given] >= 0).all() and (reveal[~given] < num_steps).all()


@pytest.mark.parametrize("strategy", sampler_lib.FIXED_STRATEGIES)
def test_a_revealed_token_never_changes(strategy):
  """Record the state the model sees at every step: once a position is revealed it stays put."""
  seen = []

  def recording_apply(params, tokens, sigma, key_mask=None):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), tokens)
    return APPLY(params, tokens, sigma, key_mask)

  _, x = inputs("joint")
  out = make_sampler(recording_apply, strategy=strategy, cfg_scale=0.0)(PARAMS, x, np.arange(len(x)))
  states = seen + [np.asarray(out.tokens)]
  assert len(states) >= 5
  for before, after in zip(states, states[1:]):
    revealed = before != LAYOUT.mask_id
    np.testing.assert_array_equal(after[revealed], before[revealed])


@pytest.mark.parametrize("strategy", sampler_lib.FIXED_STRATEGIES)
def test_a_sample_does_not_depend_on_the_batch_it_is_in(strategy):
  _, x = inputs("joint", batch=64, seed=5)
  ids = np.arange(100, 164)
  sampler = make_sampler(strategy=strategy)
  together = np.asarray(sampler(PARAMS, x, ids, seed=7).tokens)
  for row in (0, 37, 63):
    alone = np.asarray(sampler(PARAMS, x[row:row + 1], ids[row:row + 1], seed=7).tokens)
    np.testing.assert_array_equal(alone[0], together[row])
  assert len({together[i].tobytes() for i in range(64)}) > 32, "examples must not share randomness"
  other_seed = np.asarray(sampler(PARAMS, x, ids, seed=8).tokens)
  assert not np.array_equal(other_seed, together)


def test_a_sample_does_not_depend_on_the_tasks_of_the_other_rows():
  _, report_to_image = inputs("report_to_image", batch=3, seed=1)
  _, image_to_report = inputs("image_to_report", batch=3, seed=2)
  mixed = np.concatenate([report_to_image, image_to_report])
  sampler = make_sampler()
  together = np.asarray(sampler(PARAMS, mixed, np.arange(6), seed=4).tokens)
  alone = np.asarray(sampler(PARAMS, image_to_report, np.arange(3, 6), seed=4).tokens)
  np.testing.assert_array_equal(together[3:], alone)


def test_a_segment_with_masks_but_no_steps_is_an_error():
  _, x = inputs("joint", batch=2)
  with pytest.raises(ValueError, match="image segment has MASK tokens but 0 sampling steps"):
    make_sampler()(PARAMS, x, np.arange(2), segment_steps=(3, 0))


def test_confidence_sampler_reveals_per_segment_on_its_own_schedule():
  _, x = inputs("unconditional", batch=4)
  out = make_sampler(strategy="confidence", text_steps=2, image_steps=5,
                     reveal_schedule="linear")(PARAMS, x, np.arange(4))
  reveal = np.asarray(out.reveal_step)
  for row in reveal:
    text_steps, image_steps = row[LAYOUT.text_slice], row[LAYOUT.image_slice]
    # 5 loop steps; the text's own step count floor((j+1) * 2/5) goes up at loop steps 2 and 4.
    assert set(text_steps.tolist()) == {2, 4}
    counts = np.bincount(image_steps, minlength=5)
    np.testing.assert_array_equal(np.cumsum(counts), np.round(9 * np.arange(1, 6) / 5))


@pytest.mark.parametrize("strategy", sampler_lib.FIXED_STRATEGIES)
def test_reveal_prob_is_the_probability_the_model_gave_each_drawn_token(strategy):
  """A model with fixed logits: the recorded probability of every generated token is its
  restricted softmax probability; given tokens record NaN."""
  logits = np.random.default_rng(0).normal(size=(LAYOUT.seq_length, LAYOUT.vocab_size)) * 2.0
  fixed = lambda params, tokens, sigma, key_mask=None: jnp.broadcast_to(
      jnp.asarray(logits, jnp.float32), tokens.shape + logits.shape[-1:])
  expected = np.exp(np.asarray(loss_lib.subs_log_probs(jnp.asarray(logits)[None], LAYOUT))[0])
  _, x = random_partial_mask(batch=4, seed=2)
  out = make_sampler(fixed, strategy=strategy, cfg_scale=0.0)(PARAMS, x, np.arange(4), seed=3)
  tokens, prob = np.asarray(out.tokens), np.asarray(out.reveal_prob)
  given = x != LAYOUT.mask_id
  assert np.isnan(prob[given]).all() and not np.isnan(prob[~given]).any()
  rows, positions = np.nonzero(~given)
  np.testing.assert_allclose(prob[rows, positions], expected[positions, tokens[rows, positions]],
                             rtol=1e-5)


def test_cumulative_reveal_fractions():
  for name in sampler_lib.REVEAL_SCHEDULES:
    frac = sampler_lib.cumulative_reveal_fraction(name, 8)
    assert frac[0] == 0 and frac[-1] == 1 and np.all(np.diff(frac) > 0)
  arccos = np.diff(sampler_lib.cumulative_reveal_fraction("arccos", 8))
  assert np.all(np.diff(arccos) > 0), "arccos reveals few tokens early and many late"


def test_classifier_free_guidance_combines_conditional_and_unconditional_rows_in_one_batch():
  shapes = []
  mask_id = LAYOUT.mask_id

  two, three = LAYOUT.image_offset + 2, LAYOUT.image_offset + 3

  def fake_apply(params, tokens, sigma, key_mask=None):
    shapes.append(tokens.shape)
    # Logits prefer image code 2 when the report is visible, code 3 when it was re-masked.
    visible = (tokens[:, :1] != mask_id).astype(jnp.float32)[..., None]
    base = jnp.zeros(tokens.shape + (LAYOUT.vocab_size,))
    return base.at[..., two].set(visible[..., 0] * 1.0).at[..., three].set((1 - visible[..., 0]) * 1.0)

  sampler = make_sampler(fake_apply, cfg_scale=2.0, cfg_ramp=False)
  _, x = inputs("report_to_image", batch=3)
  given = jnp.asarray(x != mask_id)
  t = jnp.full((3,), 0.5)
  generated = sampler.generated_segments(x)
  assert generated == (IMAGE,)
  (log_probs,), nonfinite, _ = sampler._guided_log_probs(PARAMS, jnp.asarray(x), given, jnp.ones(3),
                                                         t, generated)
  assert shapes[-1] == (6, LAYOUT.seq_length) and not nonfinite.any()
  # One distribution per image position over the image codes only.
  assert log_probs.shape == (3, LAYOUT.image_length, LAYOUT.image_vocab_size)
  # (1 + w) * cond - w * uncond with w = 2: code 2 -> 3, code 3 -> -2, others 0.
  image_logits = np.zeros(LAYOUT.image_vocab_size)
  image_logits[2], image_logits[3] = 3.0, -2.0
  want = image_logits - np.log(np.exp(image_logits).sum())
  np.testing.assert_allclose(np.asarray(log_probs[0, 0]), want, rtol=1e-5)


def test_non_finite_model_output_is_an_error_naming_the_example():
  def nan_for_second_row(params, tokens, sigma, key_mask=None):
    logits = APPLY(params, tokens, sigma, key_mask)
    return logits.at[1].set(jnp.nan)

  _, x = inputs("image_to_report", batch=3)
  with pytest.raises(FloatingPointError, match="example 11 at step 0"):
    make_sampler(nan_for_second_row, cfg_scale=0.0)(PARAMS, x, np.array([10, 11, 12]))


def test_bad_inputs_are_clear_errors():
  tokens, x = inputs("report_to_image", batch=2)
  bad = x.copy()
  bad[0, 1] = LAYOUT.image_offset  # an image id in a report slot
  with pytest.raises(ValueError, match="not a text id"):
    make_sampler()(PARAMS, bad, np.arange(2))
  with pytest.raises(ValueError, match="shape"):
    make_sampler()(PARAMS, x[:, :-1], np.arange(2))
  with pytest.raises(ValueError, match="unknown generation task"):
    sampler_lib.task_inputs("text_to_image", tokens, np.zeros(2), LAYOUT)
  with pytest.raises(ValueError, match="strategy"):
    sampler_lib.SamplerConfig(strategy="greedy")


def test_task_inputs_mask_what_each_task_generates():
  tokens, _ = inputs("joint", batch=2)
  prompt = np.array([1, 3])
  masked = lambda task: sampler_lib.task_inputs(task, tokens, prompt, LAYOUT) == LAYOUT.mask_id
  text, image = LAYOUT.text_slice, LAYOUT.image_slice
  assert masked("report_to_image")[:, image].all() and not masked("report_to_image")[:, text].any()
  assert masked("image_to_report")[:, text].all() and not masked("image_to_report")[:, image].any()
  joint = masked("joint")
  assert joint[:, image].all()
  np.testing.assert_array_equal(joint[:, text], np.arange(5)[None] >= prompt[:, None])
  assert masked("unconditional").all()


def test_adaptive_reveal_takes_the_sure_positions_and_always_at_least_one():
  candidates = jnp.asarray([[True, True, True, True, False], [False] * 5])
  probability = jnp.asarray([[0.95, 0.5, 0.91, 0.2, 0.99]] * 2)
  choose = lambda score, strategy, threshold: np.asarray(
      sampler_lib.adaptive_reveal(candidates, score, strategy, threshold)).astype(int).tolist()
  assert choose(probability, "threshold", 0.9) == [[1, 0, 1, 0, 0], [0] * 5]
  assert choose(probability, "margin", 0.0) == [[1, 1, 1, 1, 0], [0] * 5]
  assert choose(probability, "threshold", 1.0) == [[1, 0, 0, 0, 0], [0] * 5]  # the surest one
  # entropy_bound: entropies 0.1 (pos 2) + 0.3 (pos 0) = 0.4 <= 0.5; adding 0.5 (pos 3) passes it.
  minus_entropy = -jnp.asarray([[0.3, 1.0, 0.1, 0.5, 0.0]] * 2)
  assert choose(minus_entropy, "entropy_bound", 0.5) == [[1, 0, 1, 0, 0], [0] * 5]
  assert choose(minus_entropy, "entropy_bound", 0.0) == [[0, 0, 1, 0, 0], [0] * 5]
  assert choose(minus_entropy, "entropy_bound", 10.0) == [[1, 1, 1, 1, 0], [0] * 5]


def test_threshold_zero_reveals_everything_at_once_and_one_reveals_a_token_per_segment_per_step():
  _, x = inputs("joint")
  generate = x == LAYOUT.mask_id
  everything = make_sampler(strategy="threshold", reveal_threshold=0.0)(PARAMS, x, np.arange(len(x)))
  assert (np.asarray(everything.reveal_step)[generate] == 0).all()
  np.testing.assert_array_equal(everything.model_calls, 1)

  steps = LAYOUT.seq_length  # room for one token per step
  one_by_one = make_sampler(strategy="threshold", reveal_threshold=1.0, text_steps=steps,
                            image_steps=steps)(PARAMS, x, np.arange(len(x)))
  reveal_step, modality = np.asarray(one_by_one.reveal_step), LAYOUT.modality()
  for row in range(len(x)):
    per_segment = [np.sort(reveal_step[row][generate[row] & (modality == m)]) for m in (TEXT, IMAGE)]
    for revealed in per_segment:
      np.testing.assert_array_equal(revealed, np.arange(len(revealed)))
    assert one_by_one.model_calls[row] == max(len(r) for r in per_segment)
  assert not (np.asarray(one_by_one.tokens) == LAYOUT.mask_id).any()


# Thresholds at which the tiny random model reveals several tokens in some steps and one in others.
@pytest.mark.parametrize("strategy,threshold", [("threshold", 0.15), ("margin", 0.001),
                                                ("entropy_bound", 4.0)])
def test_adaptive_strategies_keep_conditions_fill_every_mask_and_ignore_the_batch(strategy, threshold):
  _, x = random_partial_mask(batch=6, seed=4)
  given = x != LAYOUT.mask_id
  sampler = make_sampler(strategy=strategy, reveal_threshold=threshold, text_steps=12, image_steps=12)
  out = sampler(PARAMS, x, np.arange(6), seed=2)
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(tokens[given], x[given])
  assert not (tokens == LAYOUT.mask_id).any()
  modality = LAYOUT.modality()
  assert (tokens[:, modality == TEXT] < LAYOUT.text_vocab_size).all()
  assert (tokens[:, modality == IMAGE] >= LAYOUT.image_offset).all()
  calls = np.asarray(out.model_calls)
  masked = (~given).sum(1)
  assert (calls >= 1).all() and (calls < masked).any() and calls.max() < 12  # the loop ended early
  assert (np.asarray(out.reveal_step)[~given] < calls[np.nonzero(~given)[0]]).all()

  # Rows 4 and 5 among other rows. The batch size stays 6: XLA:CPU's matmuls round differently at
  # another batch size, and these strategies rank near-uniform entropies whose order a last-bit
  # difference can flip.
  _, others = random_partial_mask(batch=6, seed=9)
  mixed = sampler(PARAMS, np.concatenate([x[4:], others[:4]]), np.array([4, 5, 20, 21, 22, 23]), seed=2)
  np.testing.assert_array_equal(np.asarray(mixed.tokens)[:2], tokens[4:])
  np.testing.assert_array_equal(np.asarray(mixed.model_calls)[:2], calls[4:])
  every_step = make_sampler(strategy=strategy, reveal_threshold=threshold, text_steps=12,
                            image_steps=12, early_exit=False)(PARAMS, x, np.arange(6), seed=2)
  for name in ("tokens", "reveal_step", "model_calls"):
    np.testing.assert_array_equal(getattr(every_step, name), getattr(out, name))


def test_the_image_positions_own_confidence_noise_changes_generated_images_only():
  ids = np.arange(6)
  for task, changes in (("report_to_image", True), ("image_to_report", False)):
    _, x = inputs(task)
    out = {name: np.asarray(make_sampler(strategy="confidence", **kw)(PARAMS, x, ids, seed=4).tokens)
           for name, kw in (("same", {}), ("image 0", dict(image_gumbel_scale=0.0)),
                            ("all 0", dict(gumbel_scale=0.0)))}
    # Only the generated segment's noise matters: report->image takes the image scale for all of
    # its noise, image->report none of it.
    np.testing.assert_array_equal(out["image 0"], out["all 0"] if changes else out["same"])
    assert np.array_equal(out["image 0"], out["same"]) != changes
  with pytest.raises(ValueError, match="gumbel_scale"):
    make_sampler(gumbel_scale=-1.0)


def test_rerank_scores_are_the_model_log_likelihood_of_the_generated_tokens_and_keep_the_best():
  from medim_jax.diffusion import rerank
  schedule = schedules.LogLinearSchedule()
  _, x = inputs("image_to_report", batch=5)
  sampler = make_sampler()
  candidates = [jax.tree.map(np.asarray, sampler(PARAMS, x, np.arange(5), seed=s, segment_steps=(3, 0)))
                for s in range(3)]
  stacked = np.stack([c.tokens for c in candidates])
  scores = rerank.target_log_likelihood(APPLY, PARAMS, schedule, LAYOUT, x, stacked, batch_size=2)
  # Closed form, one row and candidate at a time: sum over the masked positions of log p(token).
  sigma = np.full((1,), schedule.sigma(1.0), np.float32)
  for n in range(3):
    for b in range(5):
      log_probs = np.asarray(loss_lib.subs_log_probs(APPLY(PARAMS, x[b:b + 1], sigma), LAYOUT))[0]
      masked = np.flatnonzero(x[b] == LAYOUT.mask_id)
      want = log_probs[masked, stacked[n, b, masked]].sum()
      np.testing.assert_allclose(scores[n, b], want, rtol=1e-5)
  best = rerank.pick_best(candidates, scores)
  for b in range(5):
    winner = int(np.argmax(scores[:, b]))
    np.testing.assert_array_equal(best.tokens[b], candidates[winner].tokens[b])
    np.testing.assert_array_equal(best.reveal_prob[b], candidates[winner].reveal_prob[b])
  assert len({tuple(c.tokens[0]) for c in candidates}) > 1  # the seeds drew different reports


def test_rerank_pmi_is_the_likelihood_the_condition_adds_over_the_fully_masked_row():
  from medim_jax.diffusion import rerank
  schedule = schedules.LogLinearSchedule()
  _, x = inputs("image_to_report", batch=4)
  sampler = make_sampler()
  stacked = np.stack([np.asarray(sampler(PARAMS, x, np.arange(4), seed=s, segment_steps=(3, 0)).tokens)
                      for s in range(3)])
  conditional = rerank.candidate_scores(APPLY, PARAMS, schedule, LAYOUT, x, stacked, 2, "likelihood")
  pmi = rerank.candidate_scores(APPLY, PARAMS, schedule, LAYOUT, x, stacked, 2, "pmi")
  half = rerank.candidate_scores(APPLY, PARAMS, schedule, LAYOUT, x, stacked, 2, "pmi", 0.5)
  np.testing.assert_array_equal(
      conditional, rerank.target_log_likelihood(APPLY, PARAMS, schedule, LAYOUT, x, stacked, 2))
  # Closed form of the second term: the same generated positions scored with the image masked too.
  sigma = np.full((1,), schedule.sigma(1.0), np.float32)
  blank = np.full_like(x[:1], LAYOUT.mask_id)
  log_probs = np.asarray(loss_lib.subs_log_probs(APPLY(PARAMS, blank, sigma), LAYOUT))[0]
  for n in range(3):
    for b in range(4):
      masked = np.flatnonzero(x[b] == LAYOUT.mask_id)
      unconditional = log_probs[masked, stacked[n, b, masked]].sum()
      np.testing.assert_allclose(pmi[n, b], conditional[n, b] - unconditional, rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(half[n, b], conditional[n, b] - 0.5 * unconditional, rtol=1e-5,
                                 atol=1e-4)
  assert not np.allclose(pmi, conditional)  # the image-free term is not zero
  with pytest.raises(ValueError, match="rerank score"):
    rerank.candidate_scores(APPLY, PARAMS, schedule, LAYOUT, x, stacked, 2, "perplexity")


def test_rerank_pmi_of_a_model_blind_to_the_condition_is_zero():
  """A model whose output ignores the given tokens gains nothing from the condition: every
  candidate's PMI is 0, whatever its likelihood."""
  from medim_jax.diffusion import rerank
  schedule = schedules.LogLinearSchedule()
  _, x = inputs("image_to_report", batch=3)
  blind = lambda params, rows, sigma: APPLY(params, jnp.full_like(rows, LAYOUT.mask_id), sigma)
  stacked = np.stack([np.asarray(make_sampler()(PARAMS, x, np.arange(3), seed=s,
                                                segment_steps=(3, 0)).tokens) for s in range(2)])
  pmi = rerank.candidate_scores(blind, PARAMS, schedule, LAYOUT, x, stacked, 3, "pmi")
  np.testing.assert_allclose(pmi, 0.0, atol=1e-5)
  assert np.abs(rerank.candidate_scores(blind, PARAMS, schedule, LAYOUT, x, stacked, 3)).min() > 1.0


def test_generate_task_with_rerank_keeps_for_each_row_its_most_likely_candidate(monkeypatch):
  from configs import smoke
  from medim_jax import errors, sample
  from medim_jax.data import build as data_build
  from medim_jax.diffusion import rerank
  from medim_jax.training import train
  config = smoke.get_config("tiny")
  config.sample.update(text_steps=2, image_steps=2, batch_size=4)
  dataset = data_build.build_dataset(config)
  trainer = train.Trainer(config, dataset.layout)
  params = trainer.init_state(0).params
  split = dataset.eval.subset(np.arange(6))

  def generate(**sample_config):
    config.sample.update(sample_config)
    return sample.generate_task(config, trainer, params, dataset.layout, split, "image_to_report")

  single = np.stack([generate(rerank_candidates=1, seed=seed) for seed in range(3)])  # (3, B, L)
  chosen = generate(rerank_candidates=3, seed=0)
  inputs = sampler_lib.task_inputs("image_to_report", split.tokens, split.prompt_length,
                                   dataset.layout)
  scores = rerank.target_log_likelihood(trainer.model.apply, params, trainer.schedule,
                                        dataset.layout, inputs, single, batch_size=4)
  np.testing.assert_array_equal(chosen, single[np.argmax(scores, axis=0), np.arange(6)])
  seeds = []
  draw = sample.sample_in_batches
  monkeypatch.setattr(sample, "sample_in_batches",
                      lambda *args: seeds.append(args[6]) or draw(*args))
  # With this model the PMI at weight 1 picks other candidates than the likelihood, at weight 0.5
  # the same ones: a score or weight lost on the way would show.
  for weight in (1.0, 0.5):
    pmi = rerank.candidate_scores(trainer.model.apply, params, trainer.schedule, dataset.layout,
                                  inputs, single, 4, "pmi", pmi_weight=weight)
    picked = generate(rerank_candidates=3, seed=0, rerank_score="pmi", rerank_pmi_weight=weight)
    np.testing.assert_array_equal(picked, single[np.argmax(pmi, axis=0), np.arange(6)])
    assert np.array_equal(picked, chosen) == (weight == 0.5)
  config.sample.update(rerank_score="likelihood", rerank_pmi_weight=1.0)
  generate(rerank_candidates=3, seed=1)
  assert seeds == [0, 1, 2] * 2 + [3, 4, 5]  # sample seed 1's candidates share none of seed 0's
  monkeypatch.undo()
  assert not np.array_equal(single[0], single[1])  # the candidates differ
  # A task outside sample.rerank_tasks takes the sampler's draw as it is.
  np.testing.assert_array_equal(generate(rerank_candidates=3, seed=0, rerank_tasks="report_to_image"),
                                single[0])
  with pytest.raises(errors.InputError, match="rerank_candidates"):
    generate(rerank_candidates=0)
  with pytest.raises(errors.InputError, match="rerank_score"):
    generate(rerank_candidates=3, rerank_tasks="image_to_report", rerank_score="perplexity")


# With learned positions: the query-only pass must add the embedding of its own positions.
CACHED = helpers.tiny_model_functions(seed=3, learned_positions=LAYOUT.seq_length + 2)


def make_cached_sampler(**kwargs):
  kwargs.setdefault("text_steps", 6)
  kwargs.setdefault("image_steps", 6)
  kwargs.setdefault("cfg_scale", 1.5)
  return sampler_lib.Sampler(CACHED.apply, LAYOUT, schedules.LogLinearSchedule(),
                             sampler_lib.SamplerConfig(**kwargs), cache_model=CACHED)


@pytest.mark.parametrize("task", ["image_to_report", "report_to_image"])
@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_condition_cache_refreshed_every_step_gives_the_uncached_samples_exactly(task, strategy):
  _, x = inputs(task, batch=5, seed=7)
  steps = make_cached_sampler().steps_for_task(task)
  kwargs = dict(strategy=strategy, reveal_threshold=0.15)
  uncached = make_cached_sampler(**kwargs)(CACHED.params, x, np.arange(5), seed=3, segment_steps=steps)
  every_step = make_cached_sampler(condition_cache_every=1, **kwargs)
  assert every_step.cached_query(x) == ((0, LAYOUT.text_length) if task == "image_to_report" else
                                        (LAYOUT.text_length, LAYOUT.seq_length))
  cached = every_step(CACHED.params, x, np.arange(5), seed=3, segment_steps=steps)
  for name in ("tokens", "reveal_step", "reveal_prob", "model_calls"):
    np.testing.assert_array_equal(getattr(cached, name), getattr(uncached, name))


def test_the_query_positions_with_a_fresh_context_are_the_full_forward_pass():
  """Between refreshes the model computes only the generated segment; with keys/values of the same
  tokens and time it is the full pass (so what the cache changes is only that they are stale)."""
  tokens = jnp.asarray(helpers.random_tokens(np.random.default_rng(2), 3))
  sigma = jnp.asarray([0.2, 1.0, 4.0])
  full = CACHED.apply(CACHED.params, tokens, sigma)
  for query in ((0, LAYOUT.text_length), (LAYOUT.text_length, LAYOUT.seq_length)):
    logits, context = CACHED.apply_and_context(CACHED.params, tokens, sigma, query)
    np.testing.assert_array_equal(logits, full)
    # (layers, batch, other positions incl. both segment markers, kv heads, head_dim)
    assert context[0].shape == (2, 3, LAYOUT.seq_length - (query[1] - query[0]) + 2, 2, 8)
    only = CACHED.apply_query(CACHED.params, tokens, sigma, query, context)
    np.testing.assert_allclose(only, full[:, query[0]:query[1]], atol=1e-5)
    # Other generated tokens against the old context: the condition's keys saw the old ones.
    other = tokens.at[:, query[0]:query[1]].set(tokens[::-1, query[0]:query[1]])
    stale = CACHED.apply_query(CACHED.params, other, sigma, query, context)
    fresh = CACHED.apply(CACHED.params, other, sigma)[:, query[0]:query[1]]
    assert np.abs(np.asarray(stale) - np.asarray(fresh)).max() > 1e-4  # the fresh pass: ~1e-7


@pytest.mark.parametrize("task", ["image_to_report", "report_to_image"])
def test_cached_samples_keep_conditions_fill_every_mask_and_ignore_the_batch(task):
  tokens, x = inputs(task, batch=6, seed=8)
  sampler = make_cached_sampler(condition_cache_every=3)
  steps = sampler.steps_for_task(task)
  out = sampler(CACHED.params, x, np.arange(6), seed=4, segment_steps=steps)
  given = x != LAYOUT.mask_id
  np.testing.assert_array_equal(np.asarray(out.tokens)[given], x[given])
  assert not (np.asarray(out.tokens) == LAYOUT.mask_id).any()
  alone = sampler(CACHED.params, x[3:], np.arange(3, 6), seed=4, segment_steps=steps)
  np.testing.assert_array_equal(alone.tokens, np.asarray(out.tokens)[3:])
  uncached = make_cached_sampler()(CACHED.params, x, np.arange(6), seed=4, segment_steps=steps)
  # The cache is approximate: between refreshes the probabilities move (this tiny model's only a
  # little, so its tokens do not).
  generated = ~given
  assert not np.array_equal(np.asarray(uncached.reveal_prob)[generated],
                            np.asarray(out.reveal_prob)[generated])


def test_the_condition_cache_needs_a_whole_given_segment_and_the_model_functions():
  _, joint = inputs("joint")
  assert make_cached_sampler(condition_cache_every=2).cached_query(joint) is None
  with pytest.raises(ValueError, match="cache_model"):
    sampler_lib.Sampler(APPLY, LAYOUT, schedules.LogLinearSchedule(),
                        sampler_lib.SamplerConfig(condition_cache_every=2))
  with pytest.raises(ValueError, match="condition_cache_every"):
    sampler_lib.SamplerConfig(condition_cache_every=-1)
