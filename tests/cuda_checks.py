"""Checks of the CUDA backend's primitives against float64 formulas, for any array module.

The simulator tests call these with `CudaBackend.for_simulator(...)` (NumPy arrays); the GPU
tests call the same functions with the "cuda" backend (CuPy arrays). References are computed
in float64 NumPy from the canonical data the kernels see.
"""

from __future__ import annotations

import numpy as np

from cupy_bn.arrays import to_host
from cupy_bn.dtypes import BFLOAT16, accumulation_dtype
from cupy_bn.layout import NCS, canonical

#: Storage dtypes under test (bfloat16 when ml_dtypes is importable).
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)] + (
    [BFLOAT16] if BFLOAT16 is not None else []
)

#: Relative error allowed for values rounded to each storage dtype (a couple of ulps), and for
#: quantities accumulated in each accumulation dtype.
OUTPUT_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6, "float64": 1e-13}
ACC_TOL = {"float32": 1e-5, "float64": 1e-12}

#: Ranks 2-5, both layouts, odd sizes: C=1, N*S=2, S=1, sizes not a multiple of the block,
#: channel axis 0 (N=1), more channels than a 32-wide MC tile.
SHAPES = [
    ((7, 3), 1),  # MC (dense)
    ((3, 7), 0),  # NCS with N = 1
    ((4, 3, 5), 1),  # NCS
    ((4, 3, 5), -1),  # MC
    ((3, 5, 4, 6), 1),  # NCHW
    ((3, 4, 6, 5), -1),  # NHWC
    ((2, 3, 3, 2, 5), 1),  # NCDHW
    ((2, 3, 2, 5, 3), -1),  # NDHWC
    ((5, 1, 7), 1),  # C = 1
    ((2, 4, 1), 1),  # N*S = 2, S = 1 (viewed as MC)
    ((1, 3, 2), 1),  # N*S = 2
    ((3, 2, 300), 1),  # S above the block size, not a multiple of it
    ((300, 2), -1),  # M above the block size
    ((9, 37), -1),  # C = 37: two MC channel tiles, the second partly idle
    ((300, 40), -1),  # split: 300 row ranges merged in two levels (groups of 32)
]


def _axes(view) -> tuple[int, ...]:
    return (0, 2) if view.layout == NCS else (0,)


def _per_channel(view, v: np.ndarray) -> np.ndarray:
    return v[None, :, None] if view.layout == NCS else v[None, :]


def assert_close(actual, expected, tol: float, what: str) -> None:
    """max |actual - expected| <= tol * max(1, max |expected|), in float64."""
    actual = to_host(actual).astype(np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = tol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def make_inputs(shape, dtype, seed=0, loc=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    return x, dy


def check_primitives(be, shape, channel_axis, dtype, seed=0) -> None:
    """All five primitives (and train_statistics) of `be` against float64 formulas."""
    xp = be.xp
    dtype = np.dtype(dtype)
    acc = accumulation_dtype(dtype)
    out_tol, acc_tol = OUTPUT_TOL[dtype.name], ACC_TOL[acc.name]
    x_np, dy_np = make_inputs(shape, dtype, seed)
    view = canonical(xp.asarray(x_np), channel_axis)
    dview = view.match(xp.asarray(dy_np), "dy")
    x64 = to_host(view.data).astype(np.float64)
    dy64 = to_host(dview.data).astype(np.float64)
    axes, channels = _axes(view), view.num_channels
    rng = np.random.default_rng(seed + 1)

    mean, var = be.batch_stats(view)
    assert mean.dtype == acc and var.dtype == acc
    assert_close(mean, x64.mean(axis=axes), acc_tol, "mean")
    assert_close(var, x64.var(axis=axes), acc_tol, "var")

    scale = rng.normal(1.0, 0.5, channels).astype(acc)
    shift = rng.normal(0.0, 0.5, channels).astype(acc)
    y = be.apply(view, xp.asarray(scale), xp.asarray(shift))
    assert y.dtype == dtype and y.shape == view.data.shape
    expect_y = x64 * _per_channel(view, scale.astype(np.float64)) + _per_channel(
        view, shift.astype(np.float64)
    )
    assert_close(y, expect_y, out_tol, "apply")

    mean_np = to_host(mean).astype(np.float64)
    sum_dy, sum_dy_xmu = be.backward_reduce(dview, view, mean)
    centred = x64 - _per_channel(view, mean_np)
    assert_close(
        sum_dy, dy64.sum(axis=axes), acc_tol * max(1.0, np.abs(dy64).sum() / channels), "sum_dy"
    )
    assert_close(
        sum_dy_xmu,
        (dy64 * centred).sum(axis=axes),
        acc_tol * max(1.0, np.abs(dy64 * centred).sum() / channels),
        "sum_dy_xmu",
    )

    invstd = (1.0 / np.sqrt(to_host(var).astype(np.float64) + 1e-5)).astype(acc)
    gamma = rng.normal(1.0, 0.5, channels).astype(acc)
    count = view.count
    dx = be.backward_apply(
        dview, view, mean, xp.asarray(invstd), xp.asarray(gamma), sum_dy, sum_dy_xmu, count
    )
    assert dx.dtype == dtype and dx.shape == view.data.shape
    i64, g64 = invstd.astype(np.float64), gamma.astype(np.float64)
    s1, s2 = to_host(sum_dy).astype(np.float64), to_host(sum_dy_xmu).astype(np.float64)
    expect_dx = _per_channel(view, g64 * i64) * (
        dy64 - _per_channel(view, s1 / count) - centred * _per_channel(view, i64 * i64 * s2 / count)
    )
    assert_close(dx, expect_dx, 4 * out_tol, "backward_apply")

    if count >= 2:
        check_running_update(be, mean, var, count, acc)
        check_train_statistics(be, view, x64, acc, acc_tol)


def check_running_update(be, mean, var, count, dtype) -> None:
    xp = be.xp
    channels = mean.shape[0]
    rm0 = np.linspace(-1.0, 1.0, channels).astype(dtype)
    rv0 = np.linspace(0.5, 2.0, channels).astype(dtype)
    rm, rv = xp.array(rm0), xp.array(rv0)  # copies: rm0, rv0 stay the "before"
    be.update_running(rm, rv, mean, var, count, 0.25)
    m64, v64 = to_host(mean).astype(np.float64), to_host(var).astype(np.float64)
    tol = OUTPUT_TOL[np.dtype(dtype).name]
    assert_close(rm, 0.75 * rm0.astype(np.float64) + 0.25 * m64, tol, "running_mean")
    assert_close(
        rv, 0.75 * rv0.astype(np.float64) + 0.25 * v64 * count / (count - 1), tol, "running_var"
    )


def check_train_statistics(be, view, x64, acc, acc_tol) -> None:
    """The fused finalize gives what the unfused composition gives."""
    xp = be.xp
    channels, count = view.num_channels, view.count
    rng = np.random.default_rng(7)
    weight = rng.normal(1.0, 0.5, channels).astype(acc)
    bias = rng.normal(0.0, 0.5, channels).astype(acc)
    rm0 = np.zeros(channels, acc)
    rv0 = np.ones(channels, acc)
    rm, rv = xp.array(rm0), xp.array(rv0)  # copies: rm0, rv0 stay the "before"
    mean, var, invstd, scale, shift = be.train_statistics(
        view, xp.asarray(weight), xp.asarray(bias), rm, rv, 0.1, 1e-5
    )
    axes = _axes(view)
    m64, v64 = x64.mean(axis=axes), x64.var(axis=axes)
    i64 = 1.0 / np.sqrt(v64 + 1e-5)
    for got, want, what in (
        (mean, m64, "mean"),
        (var, v64, "var"),
        (invstd, i64, "invstd"),
        (scale, weight * i64, "scale"),
        (shift, bias - m64 * weight * i64, "shift"),
        (rm, 0.1 * m64, "running_mean"),
        (rv, 0.9 + 0.1 * v64 * count / (count - 1), "running_var"),
    ):
        assert got.dtype == acc, what
        assert_close(got, want, acc_tol, what)


def check_double_backward(be, shape, channel_axis, dtype, seed=0) -> None:
    """The two double-backward primitives of `be` against float64 formulas: the five sums, and
    `gx`, `gdy` for random coefficients, with and without `ddx`."""
    from cupy_bn.backends.base import DoubleBackwardCoefficients

    xp = be.xp
    dtype = np.dtype(dtype)
    acc = accumulation_dtype(dtype)
    out_tol, acc_tol = OUTPUT_TOL[dtype.name], ACC_TOL[acc.name]
    x_np, dy_np = make_inputs(shape, dtype, seed)
    ddx_np = np.random.default_rng(seed + 2).normal(0.0, 1.0, shape).astype(dtype)
    view = canonical(xp.asarray(x_np), channel_axis)
    dview = view.match(xp.asarray(dy_np), "dy")
    ddview = view.match(xp.asarray(ddx_np), "ddx")
    x64, dy64, ddx64 = (to_host(v.data).astype(np.float64) for v in (view, dview, ddview))
    axes, channels = _axes(view), view.num_channels
    rng = np.random.default_rng(seed + 3)
    mean = rng.normal(2.0, 0.5, channels).astype(acc)  # near, not at, the batch mean
    xmu = x64 - _per_channel(view, mean.astype(np.float64))

    sums = be.double_backward_reduce(dview, view, ddview, xp.asarray(mean))
    expected = (dy64, dy64 * xmu, ddx64, ddx64 * xmu, ddx64 * dy64)
    names = ("sum_dy", "sum_dy_xmu", "sum_ddx", "sum_ddx_xmu", "sum_ddx_dy")
    assert len(sums) == 5
    for got, terms, name in zip(sums, expected, names, strict=True):
        assert got.dtype == acc and got.shape == (channels,), name
        scale = max(1.0, np.abs(terms).sum() / max(channels, 1))
        assert_close(got, terms.sum(axis=axes), acc_tol * scale, name)

    k = DoubleBackwardCoefficients(*(rng.normal(0.0, 1.0, channels) for _ in range(6)))
    kc = DoubleBackwardCoefficients(*(_per_channel(view, v) for v in k.vectors()))
    for ddx, h in ((ddview, ddx64), (None, np.zeros_like(ddx64))):
        gx, gdy = be.double_backward_apply(dview, view, ddx, xp.asarray(mean), k)
        assert gx.dtype == dtype and gdy.dtype == dtype and gx.shape == view.data.shape
        want_gx = kc.gx_dy * dy64 + kc.gx_ddx * h + kc.gx_xmu * xmu + kc.gx_one
        want_gdy = kc.gdy_ddx * h + kc.gx_dy * xmu + kc.gdy_one
        what = "with ddx" if ddx is not None else "without ddx"
        assert_close(gx, want_gx, 4 * out_tol, f"gx {what}")
        assert_close(gdy, want_gdy, 4 * out_tol, f"gdy {what}")
