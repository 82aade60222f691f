"""The gradient checker itself: it passes the real backward and catches broken ones."""

from __future__ import annotations

import numpy as np
import pytest

from cupy_bn import functional
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.gradcheck import (
    DEFAULT_SHAPES,
    GradcheckCase,
    build_cases,
    check_case,
    gradcheck,
    reference_forward,
)


def test_default_matrix_covers_ranks_layouts_modes_and_affine():
    result = gradcheck()
    assert result.passed and bool(result)
    cases = [c.case for c in result.cases]
    assert len(cases) == len(DEFAULT_SHAPES) * 2 * 2 * 2
    assert {len(c.shape) for c in cases} == {2, 3, 4, 5}
    assert {c.channel_axis for c in cases} == {1, -1}
    assert {(c.mode, c.affine) for c in cases} == {
        ("train", True),
        ("train", False),
        ("eval", True),
        ("eval", False),
    }
    for outcome in result.cases:
        expected = {"y", "x", "weight", "bias"} if outcome.case.affine else {"y", "x"}
        assert set(outcome.comparisons) == expected
        assert outcome.max_rel_error < 1e-4
    assert result.summary().startswith("gradcheck passed: 32/32")


def test_numeric_gradient_matches_one_at_a_time_differences():
    """Perturbing one value per channel at once equals perturbing values one by one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4))
    g = rng.standard_normal(x.shape)
    h = 1e-6

    def loss(x_):
        y, _ = functional.batch_norm(x_, training=True, channel_axis=1)
        return float(np.sum(y * g))

    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (loss(plus) - loss(minus)) / (2 * h)
    _, saved = functional.batch_norm(x, training=True)
    dx, _, _ = functional.batch_norm_backward(g, saved)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)
    # ...and gradcheck on the same configuration agrees with it
    outcome = check_case(GradcheckCase((3, 2, 4), 1, "train", False, "numpy"), rng)
    assert outcome.passed


def test_reference_forward_is_the_textbook_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3)) * 4 + 2
    y = reference_forward(x, None, None, None, None, True, 1e-5, -1)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), 1 / (1 + 1e-5 / x.var(axis=0)), rtol=1e-12)


@pytest.mark.parametrize("fast", [False, True], ids=["elementwise", "fast"])
def test_catches_a_backend_primitive_with_a_wrong_count(monkeypatch, fast):
    real = NumpyBackend.backward_apply

    def wrong(self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count):
        return real(self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count - 1)

    monkeypatch.setattr(NumpyBackend, "backward_apply", wrong)
    result = gradcheck(fast=fast)
    assert not result.passed and not bool(result)
    failed = {c.case for c in result.failures}
    assert failed == {c.case for c in result.cases if c.case.mode == "train"}
    assert all(not c.comparisons["x"].passed for c in result.failures)
    assert "FAILED: 16/32" in result.summary()


def test_catches_a_dropped_variance_term(monkeypatch):
    real = NumpyBackend.backward_apply

    def wrong(self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count):
        return real(self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu * 0, count)

    monkeypatch.setattr(NumpyBackend, "backward_apply", wrong)
    assert not gradcheck(modes="train").passed


def test_catches_a_wrong_weight_gradient(monkeypatch):
    real = functional.batch_norm_backward

    def wrong(dy, saved):
        dx, dweight, dbias = real(dy, saved)
        return dx, None if dweight is None else dweight * 1.01, dbias

    monkeypatch.setattr(functional, "batch_norm_backward", wrong)
    result = gradcheck(shapes=[(2, 3, 2, 2), (4, 3)], affine=True)
    assert not result.passed and len(result.cases) == 8
    for outcome in result.cases:
        assert not outcome.comparisons["weight"].passed
        assert outcome.comparisons["x"].passed and outcome.comparisons["bias"].passed


def test_catches_one_wrong_element(monkeypatch):
    real = functional.batch_norm_backward

    def wrong(dy, saved):
        dx, dweight, dbias = real(dy, saved)
        dx = dx.copy()
        dx.flat[-1] = dx.flat[-1] * 1.01 + 1e-4  # beyond rtol=1e-3 and atol=1e-5
        return dx, dweight, dbias

    monkeypatch.setattr(functional, "batch_norm_backward", wrong)
    result = gradcheck(shapes=[(3, 4, 2), (5, 2)])
    assert len(result.failures) == len(result.cases) == 16


def test_catches_a_wrong_forward(monkeypatch):
    real = NumpyBackend.apply

    def shifted(self, x, scale, shift):
        return real(self, x, scale, shift + 1e-3)

    monkeypatch.setattr(NumpyBackend, "apply", shifted)
    result = gradcheck(shapes=[(4, 3)], channel_axes=1)
    assert not result.passed
    assert all(not c.comparisons["y"].passed for c in result.cases)


def test_a_raising_backend_is_a_failed_case_not_an_exception(monkeypatch):
    def explode(self, x):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(NumpyBackend, "batch_stats", explode)
    result = gradcheck(shapes=[(4, 3)], channel_axes=1, modes="train", affine=False)
    (outcome,) = result.cases
    assert not outcome.passed and outcome.error == "RuntimeError: no kernel"
    assert np.isnan(outcome.max_abs_error)


def test_fast_mode_passes_the_real_backward():
    result = gradcheck(fast=True)
    assert result.passed and len(result.cases) == 32


def test_options_select_the_cases():
    cases = build_cases([(4, 3, 2)], channel_axes=-1, modes="eval", affine=False)
    assert cases == [GradcheckCase((4, 3, 2), -1, "eval", False, "numpy")]
    result = gradcheck([(2, 3, 2, 2)], channel_axes=[1], modes=["train"], affine=[True])
    assert [c.case.name for c in result.cases] == ["numpy train 2x3x2x2 axis=1 affine"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shapes": [(4,)]}, "rank 2 to 5"),
        ({"shapes": [(4, 0)]}, "positive sizes"),
        ({"shapes": [(1, 3)], "modes": "train"}, "training needs two"),
        ({"channel_axes": 3}, "not an axis"),
        ({"modes": "test"}, "'train' or 'eval'"),
        ({"shapes": []}, "at least one"),
        ({"step": 0.0}, "step"),
        ({"atol": float("nan")}, "atol"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradcheck(**kwargs)
