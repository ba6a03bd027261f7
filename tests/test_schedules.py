"""Masking schedules: analytic derivatives, the ELBO weight, sigma, stratified times."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medim_jax.diffusion import schedules

T = jnp.linspace(0.01, 0.99, 23)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_dalpha_is_the_derivative_of_alpha(name):
  schedule = schedules.get_schedule(name, 1e-3)
  autodiff = jax.vmap(jax.grad(schedule.alpha))(T)
  np.testing.assert_allclose(schedule.dalpha(T), autodiff, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_alpha_decreases_from_clean_to_masked_and_sigma_is_minus_log_alpha(name):
  schedule = schedules.get_schedule(name, 1e-3)
  alpha = schedule.alpha(jnp.linspace(0.0, 1.0, 101))
  assert float(alpha[0]) >= 1 - 2e-3 and float(alpha[-1]) <= 2e-3
  assert np.all(np.diff(np.asarray(alpha)) < 0)
  np.testing.assert_allclose(schedule.sigma(T), -np.log(schedule.alpha(T)), rtol=1e-5)


def test_loglinear_is_the_papers_schedule():
  schedule = schedules.LogLinearSchedule(eps=1e-3)
  np.testing.assert_allclose(schedule.sigma(T), -np.log1p(-(1 - 1e-3) * np.asarray(T)), rtol=1e-6)
  np.testing.assert_allclose(schedule.mask_rate(T), (1 - 1e-3) * np.asarray(T), rtol=1e-5)
  # The original's weight dsigma / expm1(sigma) is exactly 1/t.
  np.testing.assert_allclose(schedule.weight(T), 1.0 / np.asarray(T), rtol=1e-5)


def test_stratified_times_put_one_time_in_each_stratum():
  t = np.asarray(schedules.stratified_times(jax.random.PRNGKey(0), 16, t_min=1e-3))
  u = (t - 1e-3) / (1 - 1e-3)
  np.testing.assert_array_equal(np.floor(u * 16), np.arange(16))
  assert t.min() >= 1e-3 and t.max() <= 1.0


def test_unknown_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown masking schedule 'cosin'"):
    schedules.get_schedule("cosin", 1e-3)


def test_maskgit_time_warp_keeps_strata_and_favours_heavily_masked_states():
  t = np.asarray(schedules.stratified_times(jax.random.PRNGKey(0), 64, t_min=0.0, warp="maskgit"))
  u = np.arcsin(t) / (np.pi / 2)
  np.testing.assert_array_equal(np.floor(u * 64), np.arange(64))
  assert t.mean() > 0.6  # E[sin(pi/2 u)] = 2/pi
  with pytest.raises(ValueError, match="time warp"):
    schedules.stratified_times(jax.random.PRNGKey(0), 4, 0.0, warp="cosine")
