"""The NumPy backend's two paths, direct (whole arrays, small tensors) and blocked (cache-sized
blocks on a thread pool), give the same batch norm on every layout, dtype and offset."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import cupy_bn as cbn
from cupy_bn.backends import numpy_direct
from cupy_bn.dtypes import BFLOAT16

PATHS = {"direct": 1 << 40, "blocked": -1}
CASES = [
    ((64, 100), -1),
    ((9, 5, 30), 1),
    ((4, 6, 7, 7), 1),
    ((3, 2, 600), 1),
    ((700, 3), -1),
    ((2, 4, 5, 3), -1),
]
DTYPES = [
    pytest.param(np.float64, 1e-10, id="float64"),
    pytest.param(np.float32, 2e-5, id="float32"),
    pytest.param(np.float16, 2e-2, id="float16"),
    pytest.param(
        BFLOAT16,
        5e-2,
        id="bfloat16",
        marks=pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes"),
    ),
]


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    limit = PATHS[request.param]
    monkeypatch.setattr(numpy_direct, "DIRECT_MAX_ELEMENTS", limit)
    monkeypatch.setattr(numpy_direct, "DIRECT_BACKWARD_MAX_ELEMENTS", limit)
    return request.param


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,channel_axis", CASES)
def test_both_paths_match_the_float64_reference(path, shape, channel_axis, dtype, tol, offset):
    rng = np.random.default_rng(0)
    c = shape[channel_axis]
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32 if dtype != np.float64 else dtype)
    b = rng.standard_normal(c).astype(w.dtype)
    rm, rv = np.zeros(c, w.dtype), np.ones(c, w.dtype)
    y, saved = cbn.batch_norm(x, w, b, rm, rv, channel_axis=channel_axis, backend="numpy")
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    # y = x * scale + shift: a few ulps of |x| (both paths, and the CUDA kernels, apply so)
    y_tol = 5 * tol + 4 * float(np.finfo(saved.mean.dtype).eps) * offset
    np.testing.assert_allclose(
        y.astype(np.float64), ref.forward(x64, w64, b64, channel_axis=channel_axis), atol=y_tol
    )
    rdx, rdw, rdb = ref.backward(x64, dy64, w64, channel_axis=channel_axis)
    scale = np.abs(rdx).max()
    np.testing.assert_allclose(dx.astype(np.float64), rdx, atol=tol * scale)
    # the mean is rounded to the accumulation dtype, which moves dw by that times sum(dy)
    mean_rounding = np.finfo(saved.mean.dtype).eps * offset * np.abs(rdb)
    assert np.all(np.abs(dw - rdw) <= tol * (np.abs(rdw).max() + np.abs(rdb).max()) + mean_rounding)
    np.testing.assert_allclose(db, rdb, atol=tol * np.abs(rdb).max())
    axes = tuple(i for i in range(x.ndim) if i != channel_axis % x.ndim)
    m = x.size // c
    np.testing.assert_allclose(
        rm, 0.1 * x64.mean(axis=axes), rtol=tol, atol=tol * (1 + offset) * 0.1
    )
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x64.var(axis=axes) * m / (m - 1), rtol=tol * 10)
    y_eval, saved_eval = cbn.batch_norm(x, w, b, rm, rv, training=False, channel_axis=channel_axis)
    want = ref.forward(
        x64,
        w64,
        b64,
        channel_axis=channel_axis,
        mean=rm.astype(np.float64),
        var=rv.astype(np.float64),
    )
    np.testing.assert_allclose(y_eval.astype(np.float64), want, rtol=tol, atol=y_tol)
    dx_eval, _, _ = cbn.batch_norm_backward(dy, saved_eval)
    invstd = 1 / np.sqrt(rv.astype(np.float64) + 1e-5)
    shape_c = [1] * x.ndim
    shape_c[channel_axis] = c
    np.testing.assert_allclose(
        dx_eval.astype(np.float64), dy64 * (w64 * invstd).reshape(shape_c), atol=tol * 5
    )


def test_paths_agree_with_each_other(monkeypatch):
    rng = np.random.default_rng(3)
    x = (5 + rng.standard_normal((8, 3, 50))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = {}
    for name, limit in PATHS.items():
        monkeypatch.setattr(numpy_direct, "DIRECT_MAX_ELEMENTS", limit)
        monkeypatch.setattr(numpy_direct, "DIRECT_BACKWARD_MAX_ELEMENTS", limit)
        y, saved = cbn.batch_norm(x)
        results[name] = (y, *cbn.batch_norm_backward(dy, saved)[:1])
    for a, b in zip(results["direct"], results["blocked"], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)
