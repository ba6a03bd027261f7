"""Forward process with tasks, and the weighted SUBS cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from medim_jax.diffusion import corruption, loss as loss_lib, schedules
from medim_jax.tokenizers.vocab import IMAGE, TEXT

LAYOUT = helpers.LAYOUT
SCHEDULE = schedules.LogLinearSchedule()


def run_corrupt(task, batch=512, t=0.5, keep_prompt_prob=1.0, valid=None, seed=0,
                whole_target_prob=0.0):
  probs = (tuple(1.0 if name == task else 0.0 for name in corruption.TASKS)
           if isinstance(task, str) else task)
  tokens = jnp.asarray(helpers.random_tokens(np.random.default_rng(seed), batch))
  valid = jnp.ones(tokens.shape, bool) if valid is None else valid
  prompt = jnp.full((batch,), 2, jnp.int32)
  out = corruption.corrupt(jax.random.PRNGKey(seed), tokens, valid, prompt, jnp.full((batch,), t),
                           SCHEDULE, LAYOUT,
                           corruption.TaskMix(probs, keep_prompt_prob, whole_target_prob))
  return tokens, out


def test_whole_target_rows_mask_the_whole_target_at_t_1_and_only_in_conditional_tasks():
  mix = (0.5, 0.25, 0.25, 0.0, 0.0)  # joint, report_to_image, image_to_report
  tokens, plain = run_corrupt(mix, t=0.3)
  _, out = run_corrupt(mix, t=0.3, whole_target_prob=0.5)
  np.testing.assert_array_equal(plain.t, np.full(512, 0.3, np.float32))
  whole = np.asarray(out.t) == 1.0
  assert 0.15 < whole.mean() < 0.35  # half of the conditional quarter + quarter
  # A whole row has its target (the noised segment) masked everywhere; nothing else changes.
  noised = np.asarray(out.noised)
  assert (np.asarray(out.loss_mask)[whole] == noised[whole]).all()
  assert (np.asarray(out.is_masked)[~whole] == np.asarray(plain.is_masked)[~whole]).all()
  np.testing.assert_array_equal(out.noised, plain.noised)
  # Joint rows are never moved: their noised region spans both segments.
  joint = noised[:, LAYOUT.text_slice].any(1) & noised[:, LAYOUT.image_slice].any(1)
  assert joint.any() and not whole[joint].any()
  with pytest.raises(ValueError, match="whole_target_prob"):
    config = type("C", (), {"task_probs": {"joint": 1.0}, "keep_prompt_prob": 0.1,
                            "get": lambda self, k, d: 1.5})()
    corruption.TaskMix.from_config(config)


def test_report_to_image_keeps_the_report_and_noises_the_image_at_rate_t():
  tokens, out = run_corrupt("report_to_image", t=0.3)
  text, image = LAYOUT.text_slice, LAYOUT.image_slice
  np.testing.assert_array_equal(out.noisy[:, text], tokens[:, text])
  rate = float(out.is_masked[:, image].mean())
  assert abs(rate - SCHEDULE.mask_rate(0.3)) < 0.02
  assert not out.noised[:, text].any() and out.noised[:, image].all()


def test_image_to_report_keeps_the_image():
  tokens, out = run_corrupt("image_to_report", t=0.9)
  np.testing.assert_array_equal(out.noisy[:, LAYOUT.image_slice], tokens[:, LAYOUT.image_slice])
  assert out.is_masked[:, LAYOUT.text_slice].mean() > 0.8


def test_drop_tasks_fully_mask_one_modality_without_making_it_a_target():
  _, out = run_corrupt("drop_report", t=0.2)
  assert out.is_masked[:, LAYOUT.text_slice].all()
  assert not out.loss_mask[:, LAYOUT.text_slice].any()
  _, out = run_corrupt("drop_image", t=0.2)
  assert out.is_masked[:, LAYOUT.image_slice].all()
  assert not out.loss_mask[:, LAYOUT.image_slice].any()


def test_joint_keeps_the_prompt_when_asked():
  tokens, out = run_corrupt("joint", t=1.0, keep_prompt_prob=1.0)
  np.testing.assert_array_equal(out.noisy[:, :2], tokens[:, :2])
  assert out.is_masked[:, 2:].mean() > 0.99
  _, out = run_corrupt("joint", t=1.0, keep_prompt_prob=0.0)
  assert out.is_masked.mean() > 0.99


def test_invalid_positions_are_never_masked_and_carry_no_loss():
  valid = jnp.ones((512, LAYOUT.seq_length), bool).at[:, 3:5].set(False)
  tokens, out = run_corrupt("joint", t=1.0, keep_prompt_prob=0.0, valid=valid)
  np.testing.assert_array_equal(out.noisy[:, 3:5], tokens[:, 3:5])
  assert not out.loss_mask[:, 3:5].any() and not out.noised[:, 3:5].any()


def test_a_row_without_an_image_trains_its_report_alone():
  """A text-only dataset's row (no valid image position) is drop_image whatever task is drawn:
  image MASKed and never a target, report noised; rows with an image are as they were."""
  mix = (0.2, 0.3, 0.4, 0.05, 0.05)
  image = LAYOUT.image_slice
  no_image = np.arange(512) % 3 == 0
  valid = jnp.ones((512, LAYOUT.seq_length), bool).at[no_image, image].set(False)
  tokens, out = run_corrupt(mix, t=0.5, valid=valid, whole_target_prob=0.5)
  _, paired = run_corrupt(mix, t=0.5, whole_target_prob=0.5)
  for name in ("noisy", "is_masked", "noised", "loss_mask", "t"):
    np.testing.assert_array_equal(np.asarray(getattr(out, name))[~no_image],
                                  np.asarray(getattr(paired, name))[~no_image])
  noisy, noised = np.asarray(out.noisy), np.asarray(out.noised)
  assert (noisy[no_image][:, image] == LAYOUT.mask_id).all()
  assert not np.asarray(out.loss_mask)[no_image][:, image].any() and not noised[no_image][:, image].any()
  text = noised[no_image][:, LAYOUT.text_slice]
  assert text.all()  # drop_image noises the whole report, prompt included: no task keeps it clean
  assert (np.asarray(out.t)[no_image] == 0.5).all()  # never a whole-target (conditional) row
  rate = float(np.asarray(out.is_masked)[no_image][:, LAYOUT.text_slice].mean())
  assert abs(rate - SCHEDULE.mask_rate(0.5)) < 0.05  # 171 rows x 5 positions: 3 sd
  # Its loss counts report positions only, and stays finite (the image targets are placeholders).
  logits = jax.random.normal(jax.random.PRNGKey(1), (512, LAYOUT.seq_length, LAYOUT.vocab_size))
  value, metrics = loss_lib.diffusion_loss(logits, tokens, out, out.t, SCHEDULE, LAYOUT)
  assert np.isfinite(float(value)) and np.isfinite(float(metrics["image_loss"]))


def test_loss_mask_is_masked_and_noised():
  _, out = run_corrupt("joint", t=0.5, keep_prompt_prob=0.5)
  assert not (out.loss_mask & ~out.is_masked).any() and not (out.loss_mask & ~out.noised).any()
  assert np.all(np.asarray(out.noisy)[np.asarray(out.is_masked)] == LAYOUT.mask_id)


def test_task_mix_rejects_bad_probabilities():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(task_probs=dict(joint=0.5, report_to_image=0.2), keep_prompt_prob=0.1))
  with pytest.raises(ValueError, match="sum to 1"):
    corruption.TaskMix.from_config(cfg)
  cfg.task_probs = dict(joint=1.0, jiont=0.0)
  with pytest.raises(ValueError, match="unknown training tasks"):
    corruption.TaskMix.from_config(cfg)


# -- loss ----------------------------------------------------------------------------------------

def one_hot_logits(tokens, scale=1e4):
  return scale * jax.nn.one_hot(tokens, LAYOUT.vocab_size)


def test_a_perfect_predictor_has_zero_loss():
  tokens, out = run_corrupt("joint", batch=8, t=0.7, keep_prompt_prob=0.0)
  t = jnp.full((8,), 0.7)
  loss, metrics = loss_lib.diffusion_loss(one_hot_logits(tokens), tokens, out, t, SCHEDULE, LAYOUT)
  assert float(loss) == 0.0 and float(metrics["text_accuracy"]) == 1.0


def test_loss_weight_is_the_schedules_weight_and_only_masked_positions_count():
  tokens = jnp.asarray(helpers.random_tokens(np.random.default_rng(0), 1))
  noised = jnp.ones(tokens.shape, bool)
  loss_mask = jnp.zeros(tokens.shape, bool).at[0, 1].set(True).at[0, 8].set(True)  # 1 text, 1 image
  c = corruption.Corruption(noisy=jnp.where(loss_mask, LAYOUT.mask_id, tokens), is_masked=loss_mask,
                            noised=noised, loss_mask=loss_mask, t=jnp.array([0.25]))
  t = jnp.array([0.25])
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, LAYOUT.seq_length, LAYOUT.vocab_size))
  uniform = jnp.zeros_like(logits)
  # Uniform logits: each masked token costs log(#ids of its modality), weighted by 1/t = 4.
  loss, metrics = loss_lib.diffusion_loss(uniform, tokens, c, t, SCHEDULE, LAYOUT)
  want = 4.0 * (np.log(LAYOUT.text_vocab_size) + np.log(LAYOUT.image_vocab_size)) / LAYOUT.seq_length
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["text_loss"]), 4.0 * np.log(12) / LAYOUT.text_length, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["image_loss"]), 4.0 * np.log(7) / LAYOUT.image_length, rtol=1e-5)
  # Changing the logits at positions without loss changes nothing.
  changed = uniform.at[0, 0].set(logits[0, 0]).at[0, 10].set(logits[0, 10])
  np.testing.assert_allclose(float(loss_lib.diffusion_loss(changed, tokens, c, t, SCHEDULE, LAYOUT)[0]),
                             float(loss), rtol=1e-6)
  # Per-modality weights scale only their own modality.
  weighted = loss_lib.diffusion_loss(uniform, tokens, c, t, SCHEDULE, LAYOUT, modality_weights=(1.0, 0.0))[0]
  np.testing.assert_allclose(float(weighted), 4.0 * np.log(12) / LAYOUT.seq_length, rtol=1e-5)
  # Flat weighting drops the 1/t: the plain masked cross-entropy.
  flat = loss_lib.diffusion_loss(uniform, tokens, c, t, SCHEDULE, LAYOUT, weighting="flat")[0]
  np.testing.assert_allclose(float(flat), want / 4.0, rtol=1e-5)
  with pytest.raises(ValueError, match="loss weighting"):
    loss_lib.diffusion_loss(uniform, tokens, c, t, SCHEDULE, LAYOUT, weighting="uniform")


def test_restriction_keeps_each_position_in_its_own_vocabulary_and_never_mask():
  logits = jnp.zeros((1, LAYOUT.seq_length, LAYOUT.vocab_size))
  probs = np.exp(np.asarray(loss_lib.subs_log_probs(logits, LAYOUT)))[0]
  modality = LAYOUT.modality()
  assert np.allclose(probs[modality == TEXT][:, :LAYOUT.text_vocab_size].sum(-1), 1.0)
  assert np.allclose(probs[modality == IMAGE][:, LAYOUT.image_offset:].sum(-1), 1.0)
  assert probs[:, LAYOUT.mask_id].max() == 0.0
