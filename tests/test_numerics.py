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
    assert y.dtype == np.float16
    assert_normalized(y, x64, axes)


def assert_normalized(y, x64, axes, eps=1e-5):
    """`y` is `x64` normalized per channel (float64 reference), to float16's precision: values
    up to ~5 in magnitude, so half an ulp is at most 2**-9."""
    mean = x64.mean(axis=axes, keepdims=True)
    expect = (x64 - mean) / np.sqrt(x64.var(axis=axes, keepdims=True) + eps)
    np.testing.assert_allclose(y.astype(np.float64), expect, rtol=2e-3, atol=2e-3)


def test_float64_statistics_are_float64_exact():
    rng = np.random.default_rng(2)
    x = 1e8 + rng.standard_normal((300, 3, 50))
    mean, var = backend().batch_stats(canonical(x, 1))
    assert mean.dtype == np.float64
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-7)


@pytest.mark.parametrize("with_invstd", [False, True])
def test_backward_sums_are_centred(with_invstd):
    rng = np.random.default_rng(3)
    x = (1e3 + 0.1 * rng.standard_normal((32, 3, 64))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    be = backend()
    view = canonical(x, 1)
    mean, var = be.batch_stats(view)
    invstd = (1 / np.sqrt(var + 1e-5)).astype(np.float32) if with_invstd else None
    sum_dy, sum_dy_xmu = be.backward_reduce(canonical(dy, 1), view, mean, invstd)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    expect = (dy64 * (x64 - mean.astype(np.float64)[:, None])).sum(axis=(0, 2))
    np.testing.assert_allclose(sum_dy, dy64.sum(axis=(0, 2)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sum_dy_xmu, expect, atol=1e-4)
    # sum(dy * x) - mean * sum(dy) in float32 cancels catastrophically
    naive = (dy * x).sum(axis=(0, 2), dtype=np.float32) - mean * sum_dy
    assert np.max(np.abs(naive - expect)) > 5e-4


@pytest.mark.parametrize("offset", [0.0, 0.5, 0.99, 1.01, 3.0, 1e2, 1e4])
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_statistics_are_exact_at_every_mean_to_std_ratio(offset, dtype, rtol):
    """Raw sums below the threshold, centred sums above it: both within a few ulps."""
    rng = np.random.default_rng(4)
    x = (offset + rng.standard_normal((16, 3, 4096)) * [[[1.0], [0.5], [2.0]]]).astype(dtype)
    mean, var = backend().batch_stats(canonical(x, 1))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=rtol)


def test_raw_sums_are_only_kept_within_one_standard_deviation(monkeypatch):
    from cupy_bn.backends import numpy_direct
    from cupy_bn.backends.numpy_backend import NumpyBackend

    shifts = []
    original = NumpyBackend._moments

    def spy(x, plan, acc, shift):
        shifts.append(shift)
        return original(x, plan, acc, shift)

    monkeypatch.setattr(NumpyBackend, "_moments", staticmethod(spy))
    z = np.random.default_rng(7).standard_normal((64, 2, 8192))  # above the direct path
    z = (z - z.mean(axis=(0, 2), keepdims=True)) / z.std(axis=(0, 2), keepdims=True)
    limit = numpy_direct.RAW_SUMS_MAX_OFFSET
    for offset, passes in [(0.9 * limit, 1), (1.1 * limit, 2)]:  # the mean is `offset` std
        shifts.clear()
        backend().batch_stats(canonical((z + offset).astype(np.float32), 1))
        assert len(shifts) == passes and shifts[0] is None


def test_zero_and_constant_channels_have_zero_variance():
    x = np.zeros((8, 3, 100), np.float32)
    x[:, 1] = 7.25
    x[:, 2] = np.random.default_rng(8).standard_normal((8, 100))
    mean, var = backend().batch_stats(canonical(x, 1))
    assert var[0] == 0 and var[1] == 0 and mean[1] == 7.25
    np.testing.assert_allclose(var[2], x[:, 2].astype(np.float64).var(), rtol=1e-6)


def test_squares_that_overflow_float32_take_the_centred_pass():
    rng = np.random.default_rng(9)
    x = (3e19 + 1e17 * rng.standard_normal((4, 2, 1000))).astype(np.float32)  # x*x overflows
    mean, var = backend().batch_stats(canonical(x, 1))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 0.5, 3.0, 1e3])
def test_gradient_sums_are_exact_with_and_without_centring(offset):
    rng = np.random.default_rng(10)
    x = (offset + rng.standard_normal((16, 3, 2048))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.array([1.0, 0.5, 2.0], np.float32)
    y, saved = cbn.batch_norm(x, w, w)
    dx, dw, db = cbn.batch_norm_backward(dy, saved)
    import reference as ref

    rdx, rdw, rdb = ref.backward(x, dy, w)
    scale = np.abs(rdx).max()
    np.testing.assert_allclose(dx, rdx, atol=1e-5 * scale)
    # the float32 mean is off by up to half an ulp, which moves dw by that times sum(dy)
    mean_rounding = np.finfo(np.float32).eps * offset * np.abs(rdb)
    bound = 1e-5 * (np.abs(rdw) + np.abs(rdw).max()) + mean_rounding
    assert np.all(np.abs(dw - rdw) <= bound), (dw, rdw, bound)
    np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=1e-3)


def test_forked_child_runs_blocks_in_parallel_again():
    import multiprocessing as mp

    x = np.random.default_rng(6).standard_normal((64, 8, 4096)).astype(np.float32)
    cbn.batch_norm(x)  # starts the parent's pool
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        y = pool.apply_async(_normalize, (x,)).get(timeout=30)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    expect = (x64 - mean) / np.sqrt(x64.var(axis=(0, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expect, atol=1e-5)


def _normalize(x):
    return cbn.batch_norm(x)[0]


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e4])
@pytest.mark.parametrize(
    "shape,channel_axis", [((65536, 2), -1), ((32768, 2, 2), 1)], ids=["MC", "NCS"]
)
def test_direct_path_sums_many_samples_with_short_accumulators(offset, shape, channel_axis):
    """Small tensors with many samples take the direct path: their float32 sums are folded so
    that no accumulator adds more than MAX_SEQUENTIAL values in sequence."""
    from cupy_bn.backends import numpy_direct

    x = (offset + np.random.default_rng(11).standard_normal(shape)).astype(np.float32)
    assert x.size <= numpy_direct.DIRECT_MAX_ELEMENTS
    mean, var = backend().batch_stats(canonical(x, channel_axis))
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(var, x64.var(axis=axes), rtol=2e-6)
