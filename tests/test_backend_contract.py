"""The backend contract: exactly seven primitives, the optional fused statistics, `invstd`."""

from __future__ import annotations

import numpy as np
import pytest

import cupy_bn
from cupy_bn import functional
from cupy_bn.backends import (
    Backend,
    FusedBackward,
    FusedTrainStatistics,
    has_fused_backward,
    has_fused_statistics,
    numba_usable,
)
from cupy_bn.backends.cuda_backend import CudaBackend, simulator_usable
from cupy_bn.backends.numpy_backend import NumpyBackend
from cupy_bn.backends.numpy_direct import DIRECT_BACKWARD_MAX_ELEMENTS
from cupy_bn.layout import canonical

PRIMITIVES = {
    "batch_stats",
    "apply",
    "backward_reduce",
    "backward_apply",
    "update_running",
    "double_backward_reduce",
    "double_backward_apply",
}
needs_sim = pytest.mark.skipif(not simulator_usable(), reason="CUDA simulator not found")


def _members(protocol) -> set[str]:
    methods = {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return methods | set(getattr(protocol, "__annotations__", {}))


def test_backend_is_exactly_the_seven_primitives_and_fused_statistics_is_separate():
    assert _members(Backend) == PRIMITIVES | {"name", "xp"}
    assert _members(FusedTrainStatistics) == {"train_statistics"}
    assert _members(FusedBackward) == {"backward"}
    assert cupy_bn.Backend is Backend


def test_backends_declare_what_they_implement():
    numpy_backend = NumpyBackend()
    cuda_backend = CudaBackend("probe", np, loader=None)
    assert isinstance(numpy_backend, Backend) and isinstance(cuda_backend, Backend)
    assert isinstance(cuda_backend, FusedTrainStatistics)
    assert not isinstance(numpy_backend, FusedTrainStatistics)
    assert has_fused_statistics(cuda_backend) and not has_fused_statistics(numpy_backend)
    assert has_fused_backward(numpy_backend) and not has_fused_backward(cuda_backend)
    for backend in (numpy_backend, cuda_backend):
        assert not hasattr(backend, "traffic")  # the traffic model is cupy_bn.traffic's


class Recorder:
    """A Backend delegating to the NumPy backend, counting calls by primitive name."""

    name = "recorder"
    xp = np

    def __init__(self) -> None:
        self.inner = NumpyBackend()
        self.calls: list[str] = []

    def _call(self, primitive, *args):
        self.calls.append(primitive)
        return getattr(self.inner, primitive)(*args)

    def batch_stats(self, x):
        return self._call("batch_stats", x)

    def apply(self, x, scale, shift):
        return self._call("apply", x, scale, shift)

    def backward_reduce(self, dy, x, mean, invstd=None):
        return self._call("backward_reduce", dy, x, mean, invstd)

    def backward_apply(self, *args):
        return self._call("backward_apply", *args)

    def update_running(self, *args):
        return self._call("update_running", *args)

    def double_backward_reduce(self, *args):
        return self._call("double_backward_reduce", *args)

    def double_backward_apply(self, *args):
        return self._call("double_backward_apply", *args)


class FusedRecorder(Recorder):
    """A Recorder that also offers the fused statistics, composed from its primitives."""

    def train_statistics(self, x, weight, bias, running_mean, running_var, momentum, eps):
        self.calls.append("train_statistics")
        mean, var = self.inner.batch_stats(x)
        invstd = (1 / np.sqrt(var + eps)).astype(mean.dtype)
        scale = invstd if weight is None else weight * invstd
        shift = -mean * scale if bias is None else bias - mean * scale
        if running_mean is not None:
            self.inner.update_running(running_mean, running_var, mean, var, x.count, momentum)
        return mean, var, invstd, scale, shift


@pytest.mark.parametrize(
    ("backend_type", "calls"),
    [
        (Recorder, ["batch_stats", "update_running", "apply"]),
        (FusedRecorder, ["train_statistics", "apply"]),
    ],
)
def test_functional_uses_fused_statistics_only_where_declared(backend_type, calls):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4)) * 2 + 1
    weight, bias = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    running = [np.zeros(3), np.ones(3)]
    be = backend_type()
    assert isinstance(be, FusedTrainStatistics) == (backend_type is FusedRecorder)
    y, _ = functional.batch_norm(x, weight, bias, *running, backend=be)
    assert be.calls == calls
    want_running = [np.zeros(3), np.ones(3)]
    want, _ = functional.batch_norm(x, weight, bias, *want_running, backend="numpy")
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(running[0], want_running[0], rtol=1e-12)
    np.testing.assert_allclose(running[1], want_running[1], rtol=1e-12)


class BackwardRecorder(Recorder):
    """A Recorder that also offers the fused backward, delegating to the NumPy backend's."""

    def backward(self, *args):
        return self._call("backward", *args)


class SumReducer:
    """A one-process reducer: the sums pass through, and the calls are recorded."""

    def __init__(self, calls):
        self.calls = calls

    def merge_stats(self, count, mean, var):
        return count, mean, var

    def sum_grads(self, sum_dy, sum_dy_xmu):
        self.calls.append("sum_grads")
        return sum_dy, sum_dy_xmu

    def collective(self, phase):
        from contextlib import nullcontext

        return nullcontext()


@pytest.mark.parametrize("sync", [False, True], ids=["local", "reducer"])
def test_functional_uses_the_fused_backward_only_without_a_reducer(sync):
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((6, 3, 4)) + 2, rng.standard_normal((6, 3, 4))
    weight = rng.uniform(0.5, 1.5, 3)
    be = BackwardRecorder()
    assert isinstance(be, FusedBackward)
    reducer = SumReducer(be.calls) if sync else None
    _, saved = functional.batch_norm(x, weight, weight, backend=be, reducer=reducer)
    be.calls.clear()
    grads = functional.batch_norm_backward(dy, saved)
    want = ["backward_reduce", "sum_grads", "backward_apply"] if sync else ["backward"]
    assert be.calls == want
    _, plain = functional.batch_norm(x, weight, weight, backend="numpy")
    for got, expect in zip(grads, functional.batch_norm_backward(dy, plain), strict=True):
        np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-12)


def _backends():
    backends = [pytest.param(NumpyBackend(), id="numpy")]
    if numba_usable():
        from cupy_bn.backends.numba_backend import NumbaBackend

        backends.append(pytest.param(NumbaBackend(), id="numba"))
    backends.append(
        pytest.param(
            CudaBackend.for_simulator() if simulator_usable() else None, id="sim", marks=needs_sim
        )
    )
    return backends


def _reduce_case(offset: float, shape=(16, 3, 16, 16)):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return x, dy


def _sum_dy_xmu_error(be, x, dy, invstd_hint) -> float:
    """|backward_reduce's sum(dy * (x - mean)) - float64 reference| / (|dy| |x - mean|)."""
    view = canonical(x, 1)
    mean, var = be.batch_stats(view)
    forward = isinstance(invstd_hint, str)
    invstd = 1 / np.sqrt(var + np.float32(1e-5)) if forward else invstd_hint
    sum_dy, sum_dy_xmu = be.backward_reduce(view.match(dy, "dy"), view, mean, invstd)
    xmu = x.astype(np.float64) - np.asarray(mean, np.float64)[None, :, None, None]
    dy64 = dy.astype(np.float64)
    np.testing.assert_allclose(sum_dy, dy64.sum((0, 2, 3)), rtol=1e-5, atol=1e-3)
    want = (dy64 * xmu).sum((0, 2, 3))
    scale = np.sqrt((dy64**2).sum((0, 2, 3)) * (xmu**2).sum((0, 2, 3)))
    return float(np.max(np.abs(np.asarray(sum_dy_xmu, np.float64) - want) / scale))


@pytest.mark.parametrize("offset", [0.1, 1e4], ids=["centred", "far-from-zero"])
@pytest.mark.parametrize("invstd", [None, "forward"], ids=["no-invstd", "forward-invstd"])
@pytest.mark.parametrize("be", _backends())
def test_backward_reduce_is_exact_with_or_without_invstd(be, invstd, offset):
    x, dy = _reduce_case(offset)
    assert _sum_dy_xmu_error(be, x, dy, invstd) < 1e-7


@needs_sim
def test_cuda_backend_ignores_invstd():
    be = CudaBackend.for_simulator()
    x, dy = _reduce_case(1e4)
    view = canonical(x, 1)
    mean, _ = be.batch_stats(view)
    dview = view.match(dy, "dy")
    plain = be.backward_reduce(dview, view, mean)
    for hint in (np.full(3, 1e-6, np.float32), np.full(3, 1e6, np.float32)):
        hinted = be.backward_reduce(dview, view, mean, hint)
        for a, b in zip(plain, hinted, strict=True):
            assert np.array_equal(a, b)


def test_numpy_backend_chooses_its_sums_by_invstd():
    """Above the direct path the hint is trusted: one claiming |mean| within a std on far-off
    data takes raw sums. The direct path (small tensors) always centres."""
    be = NumpyBackend()
    misleading = np.full(3, 1e-6, np.float32)  # var + eps = 1e12: |mean| = 1e4 looks small
    x, dy = _reduce_case(1e4, shape=(16, 3, 64, 64))
    assert x.size > DIRECT_BACKWARD_MAX_ELEMENTS
    assert _sum_dy_xmu_error(be, x, dy, misleading) > 1e-6
    assert _sum_dy_xmu_error(be, x, dy, "forward") < 1e-7
    x, dy = _reduce_case(1e4)
    assert x.size <= DIRECT_BACKWARD_MAX_ELEMENTS
    assert _sum_dy_xmu_error(be, x, dy, misleading) < 1e-7


@pytest.mark.parametrize(
    ("training", "given", "calls"),
    [
        (True, ("ddx", "ddweight", "ddbias"), ["double_backward_reduce", "double_backward_apply"]),
        (True, ("ddweight",), ["backward_reduce", "double_backward_apply"]),
        (True, ("ddbias",), ["double_backward_apply"]),
        (False, ("ddx", "ddweight"), ["double_backward_reduce", "double_backward_apply"]),
        (False, ("ddweight", "ddbias"), ["double_backward_apply"]),
    ],
)
def test_double_backward_composes_the_primitives(training, given, calls):
    """One reduction (the sums the formulas need, skipped when none is) and one apply."""
    rng = np.random.default_rng(2)
    x, dy, ddx = (rng.standard_normal((5, 3, 4)) for _ in range(3))
    weight, bias = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    running = (rng.standard_normal(3), rng.uniform(0.5, 2.0, 3))
    cotangents = {"ddx": ddx, "ddweight": rng.standard_normal(3), "ddbias": rng.standard_normal(3)}
    args = [cotangents[n] if n in given else None for n in ("ddx", "ddweight", "ddbias")]
    be = Recorder()
    _, saved = functional.batch_norm(x, weight, bias, *running, training=training, backend=be)
    be.calls.clear()
    got = cupy_bn.batch_norm_double_backward(*args, dy, saved)
    assert be.calls == calls
    _, plain = functional.batch_norm(x, weight, bias, *running, training=training, backend="numpy")
    want = cupy_bn.batch_norm_double_backward(*args, dy, plain)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
