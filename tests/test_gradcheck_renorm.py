"""`gradcheck`'s batch-renormalization cases: r and d clipped and unclipped, first and second
order, on both backends; they fail when renorm's backward is broken; the `--renorm` option."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cupy_bn.backends as backend_registry
from cupy_bn import functional
from cupy_bn.cli import main
from cupy_bn.gradient_check import RENORM_BOUNDS, build_cases, gradcheck
from cupy_bn.renorm import RenormCorrection

SHAPES = [(6, 3), (2, 3, 5)]


def test_renorm_cases_pass_at_both_orders():
    result = gradcheck(SHAPES, modes="train", renorm=("clipped", "unclipped"), order=(1, 2))
    assert result.passed, result.summary()
    assert len(result.cases) == 2 * 2 * 2 * 2 * 2  # orders, renorms, shapes, axes, affine
    for outcome in result.cases:
        case = outcome.case
        assert case.name.endswith(f" renorm={case.renorm}")
        first = {"y", "x", "weight", "bias"} if case.affine else {"y", "x"}
        second = {"x", "weight", "dy"} if case.affine else {"x", "dy"}
        assert set(outcome.comparisons) == (first if case.order == 1 else second)
        assert outcome.max_rel_error < 1e-5
        assert outcome.to_json()["renorm"] == case.renorm


@pytest.mark.skipif("sim" not in backend_registry.available_backends(), reason="needs the sim")
def test_renorm_cases_pass_on_the_simulator():
    result = gradcheck(SHAPES, backends="sim", renorm=("clipped", "unclipped"), order=(1, 2))
    assert result.passed and len(result.cases) == 32, result.summary()


@pytest.mark.parametrize("regime", sorted(RENORM_BOUNDS))
def test_the_regimes_clip_or_not(monkeypatch, regime):
    """Every forward of a "clipped" case has r at 1/rmax or rmax and |d| at dmax in every
    channel; an "unclipped" one has them strictly inside."""
    seen: list[RenormCorrection] = []
    real = functional.batch_norm

    def spy(*args, **kwargs):
        y, saved = real(*args, **kwargs)
        seen.append(saved.renorm)
        return y, saved

    monkeypatch.setattr(functional, "batch_norm", spy)
    assert gradcheck([(5, 4), (2, 4, 3, 2)], modes="train", renorm=regime, fast=True)
    rmax, dmax = RENORM_BOUNDS[regime]
    assert seen and all(s is not None for s in seen)
    for s in seen:
        r_clipped = np.isclose(s.r, rmax, rtol=1e-14) | np.isclose(s.r, 1 / rmax, rtol=1e-14)
        d_clipped = np.isclose(np.abs(s.d), dmax, rtol=1e-14)
        if regime == "clipped":
            assert r_clipped.all() and d_clipped.all()
        else:
            assert (1 / rmax < s.r).all() and (s.r < rmax).all() and (np.abs(s.d) < dmax).all()
            assert not np.allclose(s.r, 1) and not np.allclose(s.d, 0)


def test_renorm_cases_catch_a_dgamma_without_d(monkeypatch):
    monkeypatch.setattr(
        RenormCorrection,
        "weight_gradient",
        lambda self, sum_dy, sum_dy_xmu, invstd: self.r * sum_dy_xmu * invstd,
    )
    result = gradcheck(SHAPES, modes="train", affine=True, renorm=("clipped", "unclipped"))
    assert not result.passed
    for outcome in result.cases:
        assert not outcome.comparisons["weight"].passed
        assert outcome.comparisons["x"].passed and outcome.comparisons["bias"].passed
    assert gradcheck(SHAPES, modes="train", affine=True)  # batch norm does not use it


def test_renorm_cases_catch_a_dx_without_r(monkeypatch):
    monkeypatch.setattr(RenormCorrection, "backward_gamma", lambda self, gamma: gamma)
    result = gradcheck(SHAPES, modes="train", renorm=("clipped", "unclipped"))
    assert len(result.failures) == len(result.cases)
    assert all(not c.comparisons["x"].passed for c in result.cases)


def test_second_order_renorm_cases_catch_a_wrong_bias_cotangent(monkeypatch):
    def without_d(self, gamma, ddgamma, ddbeta):
        r = self.r.astype(np.float64)
        return gamma * r, r * ddgamma, ddbeta

    monkeypatch.setattr(RenormCorrection, "double_backward_terms", without_d)
    result = gradcheck(SHAPES, affine=True, renorm=("clipped", "unclipped"), order=2)
    assert len(result.failures) == len(result.cases)
    assert all(not c.comparisons["dy"].passed for c in result.cases)


def test_build_cases_keeps_renorm_to_training():
    cases = build_cases([(4, 3)], channel_axes=1, affine=True, renorm=(None, "clipped"))
    found = [(c.mode, c.renorm) for c in cases]
    assert found == [("train", None), ("eval", None), ("train", "clipped")]
    with pytest.raises(ValueError, match="renorm: batch renormalization is checked in mode"):
        build_cases([(4, 3)], modes="eval", renorm="clipped")
    ghost = build_cases([(4, 3)], channel_axes=1, modes="train", affine=True,
                        virtual_batch=(None, 2), renorm=(None, "unclipped"))  # fmt: skip
    found = [(c.virtual_batch, c.renorm) for c in ghost]
    assert found == [(None, None), (None, "unclipped"), (2, None)]
    with pytest.raises(ValueError, match="renorm: expected None, 'clipped' or 'unclipped'"):
        build_cases([(4, 3)], renorm="on")


def test_cli_renorm_option():
    runner = CliRunner()
    result = runner.invoke(main, ["gradcheck", "--renorm", "both", "--shape", "4,3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    found = sorted((c["mode"], str(c["renorm"])) for c in report["cases"])
    assert found == sorted(
        [("eval", "None")] * 4 + [("train", r) for r in ("None", "clipped", "unclipped")] * 4
    )
    table = runner.invoke(main, ["gradcheck", "--renorm", "on", "--shape", "4,3"])
    assert table.exit_code == 0 and "clipped" in table.stdout and "8/8 cases" in table.stdout
    refused = runner.invoke(main, ["gradcheck", "--renorm", "on", "--mode", "eval"])
    assert refused.exit_code == 2 and "mode 'train' without virtual_batch only" in refused.stderr
    ghost = runner.invoke(main, ["gradcheck", "--renorm", "on", "--virtual-batch", "2"])
    assert ghost.exit_code == 2 and "without virtual_batch" in ghost.stderr
