"""The simulator's checks, on a real GPU through CuPy (backend "cuda").

Skipped unless `cupy.is_available()`; select them with `pytest -m gpu`.
"""

import cuda_checks as cc
import numpy as np
import pytest

import cupy_bn as cbn
from cupy_bn.backends import cupy_usable
from cupy_bn.layout import canonical

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_usable(), reason="no usable CuPy GPU here"),
]


@pytest.fixture(scope="module")
def cupy():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def cuda_backend():
    from cupy_bn.backends.cuda_backend import CudaBackend

    return CudaBackend.for_cupy()


@pytest.fixture(scope="module")
def split_backend():
    from cupy_bn.backends.cuda_backend import CudaBackend, Tuning

    return CudaBackend.for_cupy(Tuning(reduction_min_work=32, elementwise_work=64))


@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,channel_axis", cc.SHAPES, ids=lambda v: str(v))
def test_primitives_match_float64(cuda_backend, split_backend, shape, channel_axis, dtype):
    cc.check_primitives(cuda_backend, shape, channel_axis, dtype)
    cc.check_primitives(split_backend, shape, channel_axis, dtype)


@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,channel_axis", cc.SHAPES, ids=lambda v: str(v))
def test_double_backward_primitives_match_float64(
    cuda_backend, split_backend, shape, channel_axis, dtype
):
    cc.check_double_backward(cuda_backend, shape, channel_axis, dtype)
    cc.check_double_backward(split_backend, shape, channel_axis, dtype)


@pytest.mark.parametrize(
    "shape,channel_axis", [((32, 64, 56, 56), 1), ((32, 56, 56, 64), -1), ((64, 2048, 7, 7), 1)]
)
def test_resnet_shapes(cuda_backend, shape, channel_axis):
    cc.check_primitives(cuda_backend, shape, channel_axis, np.float32)


@pytest.mark.parametrize("shape,channel_axis", [((64, 4, 32, 32), 1), ((65536, 4), -1)])
def test_float32_offset_data_statistics(cupy, cuda_backend, shape, channel_axis):
    x = (1e3 + 0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    view = canonical(cupy.asarray(x), channel_axis)
    mean, var = cuda_backend.batch_stats(view)
    axes = (0, 2) if view.layout == "NCS" else (0,)
    x64 = cc.to_host(view.data).astype(np.float64)
    np.testing.assert_allclose(cc.to_host(mean), x64.mean(axis=axes), rtol=1e-6)
    np.testing.assert_allclose(cc.to_host(var), x64.var(axis=axes), rtol=1e-3)


@pytest.mark.parametrize("shape,channel_axis", [((16, 2, 256, 256), 1), ((1 << 20, 2), -1)])
def test_float16_with_a_million_values_per_channel(cupy, cuda_backend, shape, channel_axis):
    x = (50 + 2 * np.random.default_rng(1).standard_normal(shape)).astype(np.float16)
    view = canonical(cupy.asarray(x), channel_axis)
    mean, var = cuda_backend.batch_stats(view)
    axes = (0, 2) if view.layout == "NCS" else (0,)
    x64 = cc.to_host(view.data).astype(np.float64)
    np.testing.assert_allclose(cc.to_host(mean), x64.mean(axis=axes), rtol=1e-3)
    np.testing.assert_allclose(cc.to_host(var), x64.var(axis=axes), rtol=1e-3)


@pytest.mark.parametrize("shape,channel_axis", [((32, 64, 28, 28), 1), ((4096, 1024), -1)])
def test_bitwise_identical_run_to_run(cupy, cuda_backend, shape, channel_axis):
    x, dy = cc.make_inputs(shape, np.float32, seed=2)
    view = canonical(cupy.asarray(x), channel_axis)
    dview = view.match(cupy.asarray(dy), "dy")
    first = None
    for _ in range(3):
        mean, var = cuda_backend.batch_stats(view)
        sums = cuda_backend.backward_reduce(dview, view, mean)
        bits = b"".join(cc.to_host(a).tobytes() for a in (mean, var, *sums))
        assert first is None or bits == first
        first = bits


def test_functional_auto_routes_cupy_arrays_to_cuda(cupy):
    x, dy = cc.make_inputs((8, 3, 5, 5), np.float32, seed=3)
    w, b = np.linspace(0.5, 2, 3).astype(np.float32), np.linspace(-1, 1, 3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, saved = cbn.batch_norm(x, w, b, rm, rv)
    grads = cbn.batch_norm_backward(dy, saved)
    grm, grv = cupy.zeros(3, np.float32), cupy.ones(3, np.float32)
    gy, gsaved = cbn.batch_norm(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), grm, grv)
    assert gsaved.backend.name == "cuda"
    ggrads = cbn.batch_norm_backward(cupy.asarray(dy), gsaved)
    for want, got in zip((y, *grads, rm, rv), (gy, *ggrads, grm, grv), strict=True):
        np.testing.assert_allclose(cc.to_host(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_on_cupy_matches_numpy(cupy, training):
    x, dy = cc.make_inputs((8, 3, 5, 5), np.float32, seed=4)
    ddx = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    w, b = np.linspace(0.5, 2, 3).astype(np.float32), np.linspace(-1, 1, 3).astype(np.float32)
    ddw, ddb = np.linspace(-1, 1, 3).astype(np.float32), np.ones(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    _, saved = cbn.batch_norm(x, w, b, rm.copy(), rv.copy(), training=training)
    want = cbn.batch_norm_double_backward(ddx, ddw, ddb, dy, saved)
    on_gpu = [cupy.asarray(a) for a in (x, w, b, rm, rv, ddx, ddw, ddb, dy)]
    gx, gw, gb, grm, grv, gddx, gddw, gddb, gdy = on_gpu
    _, gsaved = cbn.batch_norm(gx, gw, gb, grm, grv, training=training)
    got = cbn.batch_norm_double_backward(gddx, gddw, gddb, gdy, gsaved)
    for a, b_ in zip(want, got, strict=True):
        np.testing.assert_allclose(cc.to_host(b_), a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,channel_axis", [((2, 1, (1 << 30) + 512), 1), (((1 << 31) + 1024, 1), -1)]
)
def test_more_than_2_to_the_31_elements(cupy, cuda_backend, shape, channel_axis):
    """64-bit offsets and counts: 2^31 + 1024 float16 values in one channel (4 GiB)."""
    x = cupy.ones(shape, cupy.float16)
    x.reshape(-1)[-512:] = 3  # the last values sit beyond 2^31
    n = x.size
    p = 512 / n
    view = canonical(x, channel_axis)
    mean, var = cuda_backend.batch_stats(view)
    np.testing.assert_allclose(cc.to_host(mean), [1 + 2 * p], rtol=1e-6)
    np.testing.assert_allclose(cc.to_host(var), [4 * p * (1 - p)], rtol=1e-3)
    y = cuda_backend.apply(view, cupy.full(1, 2, cupy.float32), cupy.zeros(1, cupy.float32))
    tail = cc.to_host(y.reshape(-1)[-1024:]).astype(np.float64)
    np.testing.assert_array_equal(tail, [2.0] * 512 + [6.0] * 512)
