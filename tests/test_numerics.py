"""Statistics stay exact when |mean| >> std, and low-precision inputs accumulate in float32."""

import numpy as np
import pytest

import cupy_bn as cbn
from cupy_bn.layout import canonical


def backend():
    return cbn.get_backend("numpy", np.empty(0))


@pytest.mark.parametrize("shape,channel_axis", [((64, 4, 32, 32), 1), ((65536, 4), -1)])
def test_float32_offset_data_statistics(shape, channel_axis):
    rng = np.random.default_rng(0)
    x = (1e3 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    mean, var = backend().batch_stats(canonical(x, channel_axis))
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-3)
    # the naive one-pass formula in float32 is nowhere near (what this test guards against)
    naive = (x * x).mean(axis=axes, dtype=np.float32) - x.mean(axis=axes, dtype=np.float32) ** 2
    assert np.max(np.abs(naive / x64.var(axis=axes) - 1)) > 1e-1


@pytest.mark.parametrize("shape,channel_axis", [((16, 2, 256, 256), 1), ((1 << 20, 2), -1)])
def test_float16_with_a_million_values_per_channel(shape, channel_axis):
    rng = np.random.default_rng(1)
    x = (50 + 2 * rng.standard_normal(shape)).astype(np.float16)
    mean, var = backend().batch_stats(canonical(x, channel_axis))
    assert mean.dtype == np.float32
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-3)
    np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-3)
    y, _ = cbn.batch_norm(x, channel_axis=channel_axis)
    assert y.dtype == np.float16 and np.isfinite(y).all()


def test_float64_statistics_are_float64_exact():
    rng = np.random.default_rng(2)
    x = 1e8 + rng.standard_normal((300, 3, 50))
    mean, var = backend().batch_stats(canonical(x, 1))
    assert mean.dtype == np.float64
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-7)


def test_backward_sums_are_centred():
    rng = np.random.default_rng(3)
    x = (1e3 + 0.1 * rng.standard_normal((32, 3, 64))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    be = backend()
    view = canonical(x, 1)
    mean, _ = be.batch_stats(view)
    sum_dy, sum_dy_xmu = be.backward_reduce(canonical(dy, 1), view, mean)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    expect = (dy64 * (x64 - mean.astype(np.float64)[:, None])).sum(axis=(0, 2))
    np.testing.assert_allclose(sum_dy, dy64.sum(axis=(0, 2)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sum_dy_xmu, expect, atol=1e-4)
    # sum(dy * x) - mean * sum(dy) in float32 cancels catastrophically
    naive = (dy * x).sum(axis=(0, 2), dtype=np.float32) - mean * sum_dy
    assert np.max(np.abs(naive - expect)) > 5e-4


def test_unrepresentative_leading_sample_triggers_a_recentred_pass(monkeypatch):
    from cupy_bn.backends.numpy_backend import NumpyBackend

    rng = np.random.default_rng(4)
    x = (0.5 * rng.standard_normal((2, 2, 1 << 21))).astype(np.float32)
    x[0, :, : 1 << 15] += 400.0  # the shift comes from here, far out in the tail
    calls = []
    original = NumpyBackend._shifted_stats

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(NumpyBackend, "_shifted_stats", staticmethod(spy))
    mean, var = backend().batch_stats(canonical(x, 1))
    assert len(calls) == 2  # the first shift was > 4 std from the mean
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("shape,kind", [((3, 2, 400_000), "segments"),
                                        ((4, 300, 1000), "channel groups"),
                                        ((16, 3, 5000), "samples")])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_chunk_plan_matches_the_reference(shape, kind, dtype):
    import reference as ref

    from cupy_bn.backends.tiling import Plan

    rng = np.random.default_rng(5)
    x = (3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.normal(1, 0.2, shape[1]).astype(np.float32)
    plan = Plan(canonical(x, 1))
    assert kind == ("segments" if plan.scalar else
                    "channel groups" if plan.width < plan.channels else "samples")
    y, saved = cbn.batch_norm(x, w, w)
    tol = 2e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y.astype(np.float64), ref.forward(x, w, w), atol=tol)
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    rdx, rdw, rdb = ref.backward(x, dy, w)
    np.testing.assert_allclose(dx.astype(np.float64), rdx, atol=tol)
    np.testing.assert_allclose(dw, rdw, rtol=1e-3, atol=tol * np.sqrt(x.size / shape[1]))
    np.testing.assert_allclose(db, rdb, rtol=1e-3, atol=tol * np.sqrt(x.size / shape[1]))


def test_forked_child_runs_chunks_in_parallel_again():
    import multiprocessing as mp

    x = np.random.default_rng(6).standard_normal((64, 8, 4096)).astype(np.float32)
    cbn.batch_norm(x)  # starts the parent's pool
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        y = pool.apply_async(_normalize, (x,)).get(timeout=30)
    np.testing.assert_allclose(y, cbn.batch_norm(x)[0], atol=1e-6)


def _normalize(x):
    return cbn.batch_norm(x)[0]
