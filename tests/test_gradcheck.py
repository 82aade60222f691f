"""The gradient checker itself: it passes the real backward and catches broken ones."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import cupy_bn
import cupy_bn.backends as backend_registry
from cupy_bn import functional
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.gradient_check import (
    DEFAULT_SHAPES,
    GradcheckCase,
    build_cases,
    case_rng,
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
        ({"rtol": True}, "rtol must be a positive finite number"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 1.5}, "seed must be an integer >= 0"),
        ({"backends": "nope"}, "backends: 'nope' cannot run on this machine"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gradcheck(**kwargs)


def test_a_backend_that_cannot_run_here_is_an_error_not_a_failed_case(monkeypatch):
    monkeypatch.setattr(backend_registry, "available_backends", lambda: ["numpy"])
    with pytest.raises(ValueError, match=r"backends: 'cuda' cannot run on this machine \(avail"):
        gradcheck(backends=["numpy", "cuda"])


def test_the_package_exports_the_function():
    assert cupy_bn.gradcheck is gradcheck and callable(cupy_bn.gradcheck)
    assert "gradcheck" in cupy_bn.__all__


# ---------------------------------------------------------------------------------------------
# What passes and what is shown agree


@pytest.mark.parametrize("step", [1e-6, 1e-2, 3e-2, 1e-1])
def test_a_comparison_passes_exactly_when_its_relative_error_is_within_rtol(step):
    result = gradcheck(step=step)
    comparisons = [c for outcome in result.cases for c in outcome.comparisons.values()]
    for c in comparisons:
        assert c.passed == (c.max_rel_error <= result.rtol), c
    for outcome in result.cases:
        assert outcome.passed == (outcome.max_rel_error <= result.rtol)
    assert result.passed == (result.max_rel_error <= result.rtol)
    assert f"worst relative error {result.max_rel_error:.2e}" in result.summary()


def test_a_large_step_fails_and_shows_errors_above_rtol():
    result = gradcheck(step=1e-1)
    assert not result.passed and result.max_rel_error > result.rtol
    assert all(c.max_rel_error > result.rtol for c in result.failures)
    assert all(c.max_rel_error <= result.rtol for c in result.cases if c.passed)
    assert "FAILED" in result.summary()


@pytest.mark.parametrize(
    ("numeric", "analytic", "passed"),
    [
        ([0.0, 1.0], [0.9e-5, 1.0], True),  # within atol where the value is 0
        ([0.0, 1.0], [1.1e-5, 1.0], False),  # beyond atol where the value is 0
        ([10.0, -3.0], [10.0 + 1.0e-2, -3.0], True),  # atol + rtol * 10 = 1.001e-2
        ([10.0, -3.0], [10.0 + 1.002e-2, -3.0], False),
        ([1.0, np.nan], [1.0, 1.0], False),
    ],
)
def test_relative_error_is_the_tolerance_criterion_entry_by_entry(numeric, analytic, passed):
    """|numeric - analytic| <= atol + rtol * |numeric| everywhere iff max_rel_error <= rtol."""
    from cupy_bn.gradient_check import _compare

    atol, rtol = 1e-5, 1e-3
    comparison = _compare(np.array(numeric), np.array(analytic), atol, rtol)
    diff = np.abs(np.subtract(numeric, analytic))
    assert comparison.passed is passed
    assert comparison.passed == bool(np.all(diff <= atol + rtol * np.abs(numeric)))
    assert (comparison.max_rel_error <= rtol) is passed
    if passed:
        assert comparison.max_abs_error == pytest.approx(np.max(diff))


# ---------------------------------------------------------------------------------------------
# The data of a case depends on the seed and the case only


def _recorded_inputs(monkeypatch, **options):
    """First input `x` given to `batch_norm` per case name, for one `gradcheck` run."""
    real = functional.batch_norm
    first: dict[tuple, np.ndarray] = {}

    def recording(x, *args, backend="auto", **kwargs):
        key = (backend, tuple(x.shape), kwargs["channel_axis"], kwargs["training"], args[0] is None)
        first.setdefault(key, np.array(x, copy=True))
        return real(x, *args, backend=backend, **kwargs)

    monkeypatch.setattr(functional, "batch_norm", recording)
    gradcheck(**options)
    monkeypatch.setattr(functional, "batch_norm", real)
    return first


def test_case_data_does_not_depend_on_the_backend():
    case = GradcheckCase((2, 3, 4), -1, "train", True, "numpy")
    for seed in (0, 7):
        numpy_draw = case_rng(case, seed).standard_normal(8)
        sim_draw = case_rng(dataclasses.replace(case, backend="sim"), seed).standard_normal(8)
        np.testing.assert_array_equal(numpy_draw, sim_draw)
    assert not np.array_equal(
        case_rng(case, 0).standard_normal(8), case_rng(case, 1).standard_normal(8)
    )
    other = dataclasses.replace(case, shape=(2, 4, 3))
    assert not np.array_equal(
        case_rng(case, 0).standard_normal(8), case_rng(other, 0).standard_normal(8)
    )


def test_a_case_gets_the_same_data_whatever_else_runs(monkeypatch):
    alone = _recorded_inputs(monkeypatch, shapes=[(4, 3)], seed=5)
    after_another = _recorded_inputs(monkeypatch, shapes=[(2, 3, 3, 4), (4, 3)], seed=5)
    assert alone and set(alone) < set(after_another)
    for key, x in alone.items():
        np.testing.assert_array_equal(after_another[key], x)
    reseeded = _recorded_inputs(monkeypatch, shapes=[(4, 3)], seed=6)
    assert not any(np.array_equal(reseeded[key], x) for key, x in alone.items())


@pytest.mark.skipif(
    "sim" not in backend_registry.available_backends(), reason="needs the CUDA simulator"
)
def test_every_backend_is_checked_on_the_same_data(monkeypatch):
    inputs = _recorded_inputs(
        monkeypatch, shapes=[(4, 3)], modes="eval", backends=["numpy", "sim"], fast=True, seed=3
    )
    numpy_cases = {key[1:]: x for key, x in inputs.items() if key[0] == "numpy"}
    sim_cases = {key[1:]: x for key, x in inputs.items() if key[0] == "sim"}
    assert numpy_cases and numpy_cases.keys() == sim_cases.keys()
    for key, x in numpy_cases.items():
        np.testing.assert_array_equal(sim_cases[key], x)


# ---------------------------------------------------------------------------------------------
# JSON


def test_result_serializes_itself_as_plain_json(monkeypatch):
    result = gradcheck(shapes=[(4, 3)], channel_axes=-1, modes="eval", seed=2, fast=True)

    def explode(self, x):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(NumpyBackend, "batch_stats", explode)
    failed = gradcheck(shapes=[(4, 3)], channel_axes=1, modes="train", affine=False)
    document = result.to_json()
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert document["ok"] is True and document["summary"] == result.summary()
    assert (document["seed"], document["fast"], document["rtol"]) == (2, True, 1e-3)
    case = document["cases"][0]
    assert case["shape"] == [4, 3] and case["channel_axis"] == -1 and case["mode"] == "eval"
    assert set(case["checks"]) == {"y", "x", "weight", "bias"}
    assert case["checks"]["x"] == {
        "max_abs_error": result.cases[0].comparisons["x"].max_abs_error,
        "max_rel_error": result.cases[0].comparisons["x"].max_rel_error,
        "passed": True,
    }
    (broken,) = failed.to_json()["cases"]
    json.dumps(broken, allow_nan=False)
    assert broken["error"] == "RuntimeError: no kernel" and broken["passed"] is False
    assert broken["max_abs_error"] is None and broken["max_rel_error"] is None
    assert broken["checks"] == {}


# ---------------------------------------------------------------------------------------------
# Second order: batch_norm_double_backward against differences of batch_norm_backward


def test_second_order_default_matrix_passes():
    result = gradcheck(order=2)
    assert result.passed and len(result.cases) == 32
    for outcome in result.cases:
        assert outcome.case.order == 2 and outcome.case.name.endswith(" order=2")
        expected = {"x", "weight", "dy"} if outcome.case.affine else {"x", "dy"}
        assert set(outcome.comparisons) == expected
        assert outcome.max_rel_error < 1e-4
    document = result.to_json()
    assert {c["order"] for c in document["cases"]} == {2}
    assert set(document["cases"][0]["checks"]) == {"x", "weight", "dy"}


def test_both_orders_run_on_their_own_data():
    cases = build_cases([(4, 3)], channel_axes=1, modes="train", affine=True, order=(1, 2))
    assert [c.order for c in cases] == [1, 2]
    first, second = (case_rng(c, 0).standard_normal(4) for c in cases)
    assert not np.array_equal(first, second)
    assert gradcheck([(4, 3)], order=[1, 2], fast=True).passed


@pytest.mark.parametrize("fast", [False, True], ids=["elementwise", "fast"])
def test_second_order_catches_a_wrong_double_backward_apply(monkeypatch, fast):
    real = NumpyBackend.double_backward_apply

    def wrong(self, dy, x, ddx, mean, coefficients):
        gx, gdy = real(self, dy, x, ddx, mean, coefficients)
        return gx * 1.01, gdy

    monkeypatch.setattr(NumpyBackend, "double_backward_apply", wrong)
    result = gradcheck(order=2, fast=fast)
    # gx is zero, so unchanged, only in eval mode without weight (gx = ddweight * invstd * dy)
    failed = {c.case for c in result.failures}
    assert failed == {c.case for c in result.cases if c.case.mode == "train" or c.case.affine}
    for outcome in result.failures:
        assert not outcome.comparisons["x"].passed and outcome.comparisons["dy"].passed


def test_second_order_catches_a_dropped_term_and_a_wrong_weight_gradient(monkeypatch):
    import dataclasses as dc

    from cupy_bn import double_backward

    real = double_backward.double_backward_coefficients

    def no_xmu_term(*args):
        k = real(*args)
        return dc.replace(k, gx_xmu=k.gx_xmu * 0)

    monkeypatch.setattr(double_backward, "double_backward_coefficients", no_xmu_term)
    result = gradcheck(order=2, modes="train")
    assert not result.passed
    assert all(not c.comparisons["x"].passed for c in result.failures)
    monkeypatch.undo()

    real_weight = double_backward.double_backward_weight_grad
    monkeypatch.setattr(
        double_backward, "double_backward_weight_grad", lambda *a: real_weight(*a) * 1.01
    )
    result = gradcheck(order=2, affine=True)
    assert len(result.failures) == len(result.cases) == 16
    assert all(not c.comparisons["weight"].passed for c in result.failures)


@pytest.mark.parametrize("order", [3, 0, True, "2"])
def test_bad_order(order):
    with pytest.raises(ValueError, match="order: expected 1 or 2, got"):
        gradcheck(order=order)


@pytest.mark.skipif(
    "sim" not in backend_registry.available_backends(), reason="needs the CUDA simulator"
)
def test_second_order_on_the_simulator():
    result = gradcheck(shapes=[(4, 3), (2, 3, 5)], backends="sim", order=2, fast=True)
    assert result.passed and len(result.cases) == 16
