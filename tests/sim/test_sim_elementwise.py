"""ElementwiseKernel follows CuPy's parameter syntax, typing and broadcasting rules."""

from __future__ import annotations

import numpy as np
import pytest
from sim_helpers import needs_simulator, rng

from cupy_bn import sim

pytestmark = needs_simulator

BN_APPLY = sim.ElementwiseKernel(
    "T x, float32 mean, float32 invstd, T gamma, T beta",
    "T y",
    "y = (x - mean) * invstd * gamma + beta",
    "bn_apply",
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broadcast_and_placeholder_types(dtype):
    r = rng(1)
    x = r.standard_normal((2, 3, 4, 5)).astype(dtype)
    mean = r.standard_normal((1, 3, 1, 1)).astype(np.float32)
    invstd = r.random((1, 3, 1, 1)).astype(np.float32) + 0.5
    gamma, beta = (r.standard_normal((1, 3, 1, 1)).astype(dtype) for _ in range(2))
    y = BN_APPLY(x, mean, invstd, gamma, beta)
    assert y.dtype == dtype and y.shape == x.shape
    # the C++ expression promotes like NumPy here (float32 params widen to T)
    ref = (x - mean.astype(dtype)) * invstd.astype(dtype) * gamma + beta
    np.testing.assert_allclose(y, ref, rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_float16_elements_compute_in_float():
    x = rng(2).standard_normal((4, 3)).astype(np.float16)
    ones, zeros = np.ones((1, 3), np.float16), np.zeros((1, 3), np.float16)
    m = np.full((1, 3), 0.25, np.float32)
    s = np.full((1, 3), 2.0, np.float32)
    y = BN_APPLY(x, m, s, ones, zeros)
    ref = ((x.astype(np.float32) - 0.25) * 2.0).astype(np.float16)
    np.testing.assert_array_equal(y, ref)


def test_output_arguments_noncontiguous_and_in_place():
    k = sim.ElementwiseKernel("T x, T y", "T z", "z = x * y + i", "mad")
    x = np.arange(12.0).reshape(3, 4)
    out = np.zeros((4, 3)).T  # Fortran-ordered output view
    assert k(x, 2.0, out) is out
    np.testing.assert_array_equal(out, x * 2 + np.arange(12).reshape(3, 4))
    k(x, 0.5, x)  # in place: z aliases x
    np.testing.assert_array_equal(x, np.arange(12.0).reshape(3, 4) * 1.5)


def test_scalars_take_the_parameter_type():
    k = sim.ElementwiseKernel("T x, float32 eps, int32 n", "T y", "y = x / (n + eps)", "div")
    x = np.ones(3)
    y = k(x, 0.1, 3)  # 0.1 is rounded to float32 like CuPy does; n + eps is float arithmetic
    np.testing.assert_array_equal(y, 1 / np.float64(np.float32(3) + np.float32(0.1)))


def test_raw_arrays_index_and_ind_size():
    k = sim.ElementwiseKernel(
        "raw T x, int32 n", "T y", "y = x[(i + 1) % n] + x[i] + _ind.size()", "neighbours"
    )
    x = np.arange(5.0)
    np.testing.assert_array_equal(k(x, np.int32(5), np.zeros(5)), np.roll(x, -1) + x + 5)


def test_raw_index_out_of_range_is_an_error():
    k = sim.ElementwiseKernel("raw T x", "T y", "y = x[i + 1]", "shift")
    with pytest.raises(
        sim.SimulationError,
        match=r"ElementwiseKernel shift: index out of range on raw array `x`: "
        r"flat index 5, size 5",
    ):
        k(np.arange(5.0), np.zeros(5))


def test_size_argument_and_several_outputs():
    k = sim.ElementwiseKernel("", "raw int32 idx", "idx[i] = 2 * i", "iota")
    np.testing.assert_array_equal(k(size=6), 2 * np.arange(6))
    two = sim.ElementwiseKernel("T a, T b", "T s, T d", "s = a + b; d = a - b", "sum_diff")
    s, d = two(np.arange(3.0), np.ones(3))
    np.testing.assert_array_equal(s, np.arange(3.0) + 1)
    np.testing.assert_array_equal(d, np.arange(3.0) - 1)
    assert sim.ElementwiseKernel("T a", "T b", "b = a", "cp", no_return=True)(np.ones(2)) is None
    assert isinstance(
        sim.ElementwiseKernel("T a", "T b", "b = a", "cp2", return_tuple=True)(np.ones(2)), tuple
    )


def test_preamble_and_loop_prep():
    k = sim.ElementwiseKernel(
        "T x",
        "T y",
        "y = square(x) + offset",
        "sq",
        preamble="template <typename U> __device__ U square(U v) { return v * v; }",
        loop_prep="const T offset = 1",
    )
    np.testing.assert_array_equal(k(np.arange(4, dtype=np.int32)), np.arange(4) ** 2 + 1)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda k: k(np.ones(2)), TypeError, r"Wrong number of arguments"),
        (lambda k: k(np.ones(2, np.float32), np.ones(2)), TypeError, r"Type is mismatched"),
        (lambda k: k(np.ones(2), np.ones(3)), ValueError, r"shape mismatch|broadcast"),
        (lambda k: k(np.ones(2), 1.0, np.zeros(1)), ValueError, r"Out shape is mismatched"),
        (lambda k: k(np.ones(2), 1.0, out=np.zeros(2)), TypeError, r"Wrong arguments"),
        (lambda k: k(1.0, 2.0), ValueError, r"Loop size is undecided"),
        (lambda k: k(1.0, 2.0, size=3), TypeError, r"type T of parameter x is not determined"),
    ],
)
def test_cupy_errors(call, error, message):
    k = sim.ElementwiseKernel("T x, T y", "T z", "z = x + y", "add")
    with pytest.raises(error, match=message):
        call(k)


def test_invalid_definitions():
    with pytest.raises(ValueError, match="Invalid kernel name"):
        sim.ElementwiseKernel("T x", "T y", "y = x", "not a name")
    with pytest.raises(ValueError, match="Can not use 'i'"):
        sim.ElementwiseKernel("T i", "T y", "y = i", "k")
    with pytest.raises(sim.SimulationError, match=r"does not compile"):
        sim.ElementwiseKernel("T x", "T y", "y = undefined_function(x)", "k")(np.ones(1))


def test_endless_operation_times_out(monkeypatch):
    k = sim.ElementwiseKernel("T x", "T y", "volatile int spin = 1; while (spin) {} y = x", "spin")
    monkeypatch.setattr(k, "timeout", 0.3)
    with pytest.raises(sim.SimulationError, match=r"did not finish within 0\.3 s"):
        k(np.ones(1))
