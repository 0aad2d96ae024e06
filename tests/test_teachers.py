"""EMA teacher updates and their schedules."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mim_jax.objectives import teachers


def test_ema_update_equals_its_formula_on_every_leaf():
  teacher = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(-3.0)}}
  student = {"a": jnp.array([5.0, -2.0]), "b": {"c": jnp.array(1.0)}}
  out = teachers.ema_update(teacher, student, 0.9)
  np.testing.assert_allclose(out["a"], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([5.0, -2.0]),
                             rtol=1e-6)
  np.testing.assert_allclose(out["b"]["c"], 0.9 * -3.0 + 0.1 * 1.0, rtol=1e-6)
  # decay 1 keeps the teacher, decay 0 copies the student.
  np.testing.assert_array_equal(teachers.ema_update(teacher, student, 1.0)["a"], teacher["a"])
  np.testing.assert_array_equal(teachers.ema_update(teacher, student, 0.0)["a"], student["a"])


def test_linear_anneal_endpoints_and_midpoint():
  f = lambda s: float(teachers.linear_anneal(s, 0.999, 0.9998, 100))
  np.testing.assert_allclose([f(0), f(50), f(100), f(1000)],
                             [0.999, 0.9994, 0.9998, 0.9998], rtol=1e-6)
  assert float(teachers.linear_anneal(5, 0.999, 0.9998, 0)) == np.float32(0.9998)


def test_cosine_anneal_endpoints_and_midpoint():
  f = lambda s: float(teachers.cosine_anneal(s, 0.996, 1.0, 100))
  np.testing.assert_allclose([f(0), f(50), f(100), f(500)], [0.996, 0.998, 1.0, 1.0], rtol=1e-6)
  # A quarter in, where a cosine and a straight line differ (0.99659 vs 0.997).
  np.testing.assert_allclose(f(25), 1.0 - 0.004 * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-7)


def test_centres_move_once_per_step_by_the_mean_of_the_micro_batches():
  """DINO / iBOT centring: two micro-batches' mean teacher outputs are summed and counted,
  then the centre moves once by their mean (EMA with momentum m); sums and count reset."""
  extra = teachers.centre_state({"c": (1, 3)})
  assert set(extra) == {"c", "batch_c", teachers.MICRO_BATCHES}
  a = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean (2, 2, 2)
  b = jnp.array([[0.0, 4.0, 8.0]])
  for logits in (a, b):
    extra = teachers.count_micro_batch(teachers.accumulate_centre(extra, "c", logits))
  moved = teachers.update_centres({**extra, "c": jnp.ones((1, 3))}, ["c"], momentum=0.9)
  np.testing.assert_allclose(moved["c"], 0.9 * 1.0 + 0.1 * np.array([[1.0, 3.0, 5.0]]),
                             rtol=1e-6)
  assert float(moved[teachers.MICRO_BATCHES]) == 0.0 and not np.any(moved["batch_c"])
