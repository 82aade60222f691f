"""The numba backend (compiled CPU loops) against the float64 formulas and the NumPy backend:
both layouts, the single-call and the threaded paths, data far from zero, NaN, the fused
training statistics and their running update, and the fallbacks it inherits."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import cupy_bn as cbn
from cupy_bn import backends
from cupy_bn.layout import canonical

pytestmark = pytest.mark.skipif(not backends.numba_usable(), reason="needs numba (cupy-bn[cpu])")

CASES = [
    ((64, 100), -1),
    ((9, 5, 30), 1),
    ((4, 6, 7, 7), 1),
    ((700, 3), -1),
    ((2, 4, 5, 3), -1),
    ((4, 8, 64, 64), 1),
    ((1100, 130), -1),  # 5 chunks of rows, the last one short
    ((1031, 9), -1),  # chunks whose rows are not a multiple of the kernels' steps (4 and 2)
    ((37, 3), -1),
]
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture(params=["single", "threaded"])
def ranges(request, monkeypatch):
    """Every tensor in one kernel call on the calling thread, or cut into one range per core."""
    from cupy_bn.backends import numba_backend, tiling

    if request.param == "threaded":
        monkeypatch.setattr(numba_backend, "PARALLEL_MIN_ELEMENTS", 1)
        monkeypatch.setattr(tiling, "worker_count", lambda: 3)
    else:
        monkeypatch.setattr(numba_backend, "PARALLEL_MIN_ELEMENTS", 1 << 62)
    return request.param


def make(shape, channel_axis, dtype, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[channel_axis]
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, dy, w, b


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,channel_axis", CASES)
def test_training_step_matches_the_float64_formulas(ranges, shape, channel_axis, dtype, offset):
    x, dy, w, b = make(shape, channel_axis, dtype, offset)
    tol = TOLERANCE[dtype]
    c = shape[channel_axis]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, saved = cbn.batch_norm(x, w, b, rm, rv, channel_axis=channel_axis, backend="numba")
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    x64, dy64, w64, b64 = (a.astype(np.float64) for a in (x, dy, w, b))
    axes = ref.reduce_axes(x.ndim, channel_axis)
    # |mean| >> std: the statistics stay exact (two-pass, float64 sums), y and dx to rounding
    np.testing.assert_allclose(saved.mean, x64.mean(axis=axes), rtol=tol, atol=tol)
    np.testing.assert_allclose(1 / saved.invstd**2 - 1e-5, x64.var(axis=axes), rtol=10 * tol)
    # y = x * scale + shift: a few ulps of |x| where x is far from zero
    y_tol = 5 * tol + 4 * float(np.finfo(dtype).eps) * offset
    np.testing.assert_allclose(y, ref.forward(x64, w64, b64, channel_axis=channel_axis), atol=y_tol)
    rdx, rdw, rdb = ref.backward(x64, dy64, w64, channel_axis=channel_axis)
    np.testing.assert_allclose(dx, rdx, atol=tol * np.abs(rdx).max())
    # dweight sees the mean rounded to the data's dtype, times sum(dy)
    rounding = np.finfo(dtype).eps * offset * np.abs(rdb)
    assert np.all(np.abs(dw - rdw) <= tol * (np.abs(rdw).max() + np.abs(rdb).max()) + rounding)
    np.testing.assert_allclose(db, rdb, atol=tol * np.abs(rdb).max())
    m = x.size // c
    np.testing.assert_allclose(rm, 0.1 * x64.mean(axis=axes), rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x64.var(axis=axes) * m / (m - 1), rtol=10 * tol)
    y_eval, _ = cbn.batch_norm(x, w, b, rm, rv, False, channel_axis=channel_axis, backend="numba")
    want = ref.forward(x64, w64, b64, channel_axis=channel_axis, mean=rm, var=rv)
    np.testing.assert_allclose(y_eval, want, atol=y_tol)


@pytest.mark.parametrize("shape,channel_axis", CASES)
def test_threads_change_no_bit(shape, channel_axis, monkeypatch):
    """The row chunks' partial sums are added in chunk order whichever thread made them, and
    a channels-first channel is summed by one thread: the same bits from 1 to 3 cores."""
    from cupy_bn.backends import numba_backend, tiling

    x, dy, w, b = make(shape, channel_axis, np.float32, 3.0)
    results = []
    for parallel_min, workers in ((1 << 62, 1), (1, 2), (1, 3)):
        monkeypatch.setattr(numba_backend, "PARALLEL_MIN_ELEMENTS", parallel_min)
        monkeypatch.setattr(tiling, "worker_count", lambda workers=workers: workers)
        y, saved = cbn.batch_norm(x, w, b, channel_axis=channel_axis, backend="numba")
        results.append((y, saved.mean, saved.invstd, *cbn.batch_norm_backward(dy, saved)))
    for other in results[1:]:
        for a, b_ in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("shape,channel_axis", CASES[:5])
def test_primitives_agree_with_the_numpy_backend(ranges, shape, channel_axis):
    x, dy, w, _ = make(shape, channel_axis, np.float32, 2.0)
    numba_be, numpy_be = cbn.get_backend("numba", x), cbn.get_backend("numpy", x)
    view = canonical(x, channel_axis)
    dview = view.match(dy, "dy")
    mean, var = numba_be.batch_stats(view)
    np.testing.assert_allclose(mean, numpy_be.batch_stats(view)[0], rtol=1e-6, atol=1e-6)
    invstd = (1 / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
    sums = numba_be.backward_reduce(dview, view, mean)
    want_sums = numpy_be.backward_reduce(dview, view, mean)
    for got, want in zip(sums, want_sums, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    dx = numba_be.backward_apply(dview, view, mean, invstd, w, *sums, view.count)
    fused = numba_be.backward(dview, view, mean, invstd, w, view.count)
    want_dx = numpy_be.backward_apply(dview, view, mean, invstd, w, *sums, view.count)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused[2], want_dx, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused[:2], sums, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    y = numba_be.apply(view, w, -w)
    np.testing.assert_allclose(y, numpy_be.apply(view, w, -w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,channel_axis", [((6, 3, 5), 1), ((40, 3), -1)])
def test_nan_leaves_the_running_statistics_and_names_the_channel(shape, channel_axis):
    x, _, w, b = make(shape, channel_axis, np.float32)
    bad = [slice(None)] * x.ndim
    bad[channel_axis] = 1
    x[tuple(bad)] = np.nan
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1;"):
        cbn.batch_norm(x, w, b, rm, rv, channel_axis=channel_axis, backend="numba")
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


@pytest.mark.parametrize("buffers", ["float64", "strided"])
def test_running_buffers_it_cannot_update_itself(buffers):
    """float64 buffers for float32 data, or views with a stride: `update_running` updates them
    after the compiled step, as the NumPy backend would."""
    x, _, w, b = make((8, 3, 10), 1, np.float32)
    if buffers == "float64":
        rm, rv = np.zeros(3), np.ones(3)
    else:
        rm, rv = np.zeros(6, np.float32)[::2], np.ones(6, np.float32)[::2]
    want_rm, want_rv = rm.copy(), rv.copy()
    cbn.batch_norm(x, w, b, rm, rv, backend="numba")
    cbn.batch_norm(x, w, b, want_rm, want_rv, backend="numpy")
    np.testing.assert_allclose(rm, want_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, want_rv, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_data_take_the_numpy_backends_loops(dtype):
    from cupy_bn.dtypes import BFLOAT16

    if dtype == "bfloat16" and BFLOAT16 is None:
        pytest.skip("needs ml_dtypes")
    dt = np.float16 if dtype == "float16" else BFLOAT16
    x = make((8, 3, 10), 1, np.float32)[0].astype(dt)
    dy = np.ones_like(x)
    y, saved = cbn.batch_norm(x, backend="numba")
    y_np, saved_np = cbn.batch_norm(x, backend="numpy")
    assert y.dtype == dt
    np.testing.assert_array_equal(y, y_np)
    for got, want in zip(
        cbn.batch_norm_backward(dy, saved), cbn.batch_norm_backward(dy, saved_np), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_auto_picks_numba_for_numpy_arrays():
    x = np.zeros((4, 3), np.float32)
    assert backends.cpu_backend_name() == "numba"
    assert cbn.get_backend("auto", x).name == "numba"
    assert "numba" in backends.available_backends()
