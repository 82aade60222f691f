"""Arguments are packed byte for byte as CuPy packs them, with warnings on type mismatches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sim_helpers import needs_simulator

from cupy_bn import sim
from cupy_bn.sim.args import cupy_scalar_dtype

ECHO = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Writes its scalar parameters (as the kernel sees them) into arrays.
extern "C" __global__ void echo(float f, int i, long long ll, double d, bool b,
                                unsigned char u8, unsigned long long u64, __half h,
                                float* of, int* oi, long long* oll, double* od, int* ob,
                                int* ou8, unsigned long long* ou64, float* oh) {
    *of = f; *oi = i; *oll = ll; *od = d; *ob = b; *ou8 = u8; *ou64 = u64;
    *oh = __half2float(h);
}

extern "C" __global__ void is_null(const float* p, int* out) { *out = p == nullptr; }

// Reads n consecutive floats from the pointer it gets, whatever the array's strides.
extern "C" __global__ void copy_raw(const float* x, float* y, int n) {
    const int i = threadIdx.x;
    if (i < n) y[i] = x[i];
}

extern "C" __global__ void add_into(const float* a, float* b, int n) {
    const int i = threadIdx.x;
    if (i < n) b[i] += a[i];
}

extern "C" __global__ void halves(const __half* h, const __nv_bfloat16* b, float* out) {
    out[2 * threadIdx.x] = __half2float(h[threadIdx.x]);
    out[2 * threadIdx.x + 1] = __bfloat162float(b[threadIdx.x]);
}
"""

pytestmark = needs_simulator


@pytest.fixture(scope="module")
def mod():
    return sim.RawModule(code=ECHO)


def seen_as(value_bytes: bytes, dtype) -> object:
    """What a kernel parameter of `dtype` reads from CuPy's argument bytes (0xCD past them)."""
    dt = np.dtype(dtype)
    raw = value_bytes[: dt.itemsize] + b"\xcd" * max(0, dt.itemsize - len(value_bytes))
    return np.frombuffer(raw, dtype=dt)[0]


def echo(mod, *scalars):
    outs = [
        np.zeros(1, t)
        for t in (
            np.float32,
            np.int32,
            np.int64,
            np.float64,
            np.int32,
            np.int32,
            np.uint64,
            np.float32,
        )
    ]
    mod.get_function("echo")(1, 1, (*scalars, *outs))
    return [o[0] for o in outs]


def test_python_and_numpy_scalars_are_packed_like_cupy():
    assert cupy_scalar_dtype(True) == np.bool_
    assert cupy_scalar_dtype(3) == np.int64
    assert cupy_scalar_dtype(2**63) == np.uint64
    assert cupy_scalar_dtype(1.5) == np.float64
    assert cupy_scalar_dtype(1j) == np.complex128
    assert cupy_scalar_dtype(np.float16(1)) == np.float16
    assert cupy_scalar_dtype(np.uint8(1)) == np.uint8
    with pytest.raises(sim.SimulationError, match="does not fit in 64 bits"):
        cupy_scalar_dtype(2**64)
    with pytest.raises(sim.SimulationError, match="cannot pass a str"):
        cupy_scalar_dtype("1")


def test_matching_types_pass_without_warnings(mod):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = echo(
            mod,
            np.float32(1.25),
            np.int32(-7),
            np.int64(-(2**40)),
            2.5,
            True,
            np.uint8(200),
            np.uint64(2**63 + 5),
            np.float16(0.5),
        )
    assert got == [1.25, -7, -(2**40), 2.5, 1, 200, 2**63 + 5, 0.5]


def test_mismatched_scalars_read_what_cupy_bytes_would_give(mod):
    args = (0.1, 7, np.int32(-5), np.float32(1.5), 1, np.int16(3), -1, np.float32(2.0))
    with pytest.warns(sim.ArgumentTypeWarning) as record:
        got = echo(mod, *args)
    messages = " | ".join(str(w.message) for w in record)
    for index in (0, 1, 2, 3, 4, 5, 6, 7):
        assert f"parameter {index} (`" in messages
    assert got[0] == seen_as(np.float64(0.1).tobytes(), np.float32)  # garbage
    assert got[1] == 7  # low bytes of int64
    assert got[2] == seen_as(np.int32(-5).tobytes(), np.int64)  # reads 0xCD padding
    assert got[3] == seen_as(np.float32(1.5).tobytes(), np.float64)
    assert got[4] == 1  # int64 1 -> bool
    assert got[5] == 3
    assert got[6] == 2**64 - 1
    assert got[7] == seen_as(np.float32(2.0).tobytes(), np.float16)  # __half reads 2 bytes


def test_none_is_a_null_pointer(mod):
    out = np.zeros(1, np.int32)
    mod.get_function("is_null")(1, 1, (None, out))
    assert out[0] == 1
    mod.get_function("is_null")(1, 1, (np.ones(1, np.float32), out))
    assert out[0] == 0


@pytest.mark.parametrize("guard", [True, False])
def test_non_contiguous_array_passes_its_data_pointer(mod, guard):
    base = np.arange(20, dtype=np.float32)
    view = base[2::3]  # elements 2, 5, 8, ...: the kernel sees raw memory from element 2
    y = np.zeros(5, np.float32)
    mod.get_function("copy_raw")(1, 32, (view, y, np.int32(5)), guard=guard)
    np.testing.assert_array_equal(y, base[2:7])


@pytest.mark.parametrize("guard", [True, False])
def test_aliased_arguments_share_memory(mod, guard):
    x = np.arange(8, dtype=np.float32)
    mod.get_function("add_into")(1, 32, (x, x, np.int32(8)), guard=guard)
    np.testing.assert_array_equal(x, 2 * np.arange(8))
    base = np.arange(10, dtype=np.float32)
    mod.get_function("add_into")(1, 32, (base[5:], base, np.int32(5)), guard=guard)
    np.testing.assert_array_equal(base[:5], np.arange(5) + np.arange(5, 10))


def test_array_dtype_mismatch_warns(mod):
    with pytest.warns(
        sim.ArgumentTypeWarning,
        match=r"parameter 0 \(`const float\*`\) points to float32 but the array is "
        r"float64",
    ):
        mod.get_function("copy_raw")(1, 32, (np.ones(4), np.zeros(4, np.float32), np.int32(4)))


def test_half_and_bfloat16_arrays(mod):
    h = np.array([0.5, -2.0], np.float16)
    b = (np.array([1.5, -3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.zeros(4, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod.get_function("halves")(1, 2, (h, b, out))
    np.testing.assert_array_equal(out, [0.5, 1.5, -2.0, -3.0])


@pytest.mark.parametrize(
    "args,message",
    [
        (
            (np.zeros(1, np.float32),),
            r"takes 2 arguments \(const float\*, int\*\) but 1 were given",
        ),
        ((np.float32(1), np.zeros(1, np.int32)), r"parameter 0 \(`const float\*`\) is a pointer"),
        ((np.zeros(1, np.float32), [1]), r"parameter 1 \(`int\*`\) is a pointer but a list"),
        ((np.zeros(1, object), np.zeros(1, np.int32)), r"object arrays"),
        ([None, np.zeros(1, np.int32)], None),
    ],
)
def test_arguments_that_cannot_be_passed(mod, args, message):
    k = mod.get_function("is_null")
    if message is None:  # a list is accepted like a tuple
        k(1, 1, args)
        return
    with pytest.raises(sim.SimulationError, match=message):
        k(1, 1, args)


def test_array_for_scalar_parameter_is_an_error(mod):
    with pytest.raises(sim.SimulationError, match=r"parameter 2 \(`int`\) is not a pointer"):
        mod.get_function("copy_raw")(
            1, 1, (np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.int32))
        )


def test_unknown_kernel_name():
    m = sim.RawModule(code='extern "C" __global__ void present(int* x) { *x = 1; }')
    with pytest.raises(sim.SimulationError, match=r"no kernel `absent` in this module: CuPy"):
        m.get_function("absent")
    m.get_function("present")(1, 1, (np.zeros(1, np.int32),))


def test_macro_defined_kernel_is_found_on_request():
    src = (
        '#define MAKE(name, v) extern "C" __global__ void name(int* x) { *x = v; }\n'
        "MAKE(seven, 7)\n"
    )
    x = np.zeros(1, np.int32)
    sim.RawModule(code=src).get_function("seven")(1, 1, (x,))
    assert x[0] == 7


def test_options_define_macros_and_include_paths(tmp_path):
    (tmp_path / "value.cuh").write_text("#define VALUE (SCALE * 3)\n")
    src = '#include "value.cuh"\nextern "C" __global__ void k(int* x) { *x = VALUE; }\n'
    x = np.zeros(1, np.int32)
    m = sim.RawModule(
        code=src,
        options=("-DSCALE=2", f"--include-path={tmp_path}", "--use_fast_math", "-arch=compute_80"),
    )
    m.get_function("k")(1, 1, (x,))
    assert x[0] == 6


def test_cupy_only_features_are_rejected():
    with pytest.raises(sim.SimulationError, match="precompiled"):
        sim.RawModule(path="kernel.cubin")
    with pytest.raises(sim.SimulationError, match="cooperative groups"):
        sim.RawModule(code="", enable_cooperative_groups=True)


def test_kernels_are_found_as_cupy_finds_them():
    src = (
        "template <typename T> __global__ void tk(T* x) { *x = T(3); }\n"
        "__global__ void cpp_kernel(int* x) { *x = 4; }\n"
        'extern "C" __global__ void c_kernel(int* x) { *x = 5; }\n'
    )
    x = np.zeros(1, np.int32)
    m = sim.RawModule(code=src, name_expressions=("tk<int>", "cpp_kernel"))
    for name, value in (("tk<int>", 3), ("cpp_kernel", 4), ("c_kernel", 5)):
        m.get_function(name)(1, 1, (x,))
        assert x[0] == value
    plain = sim.RawModule(code=src)
    for name in ("tk<int>", "cpp_kernel"):  # mangled: CuPy's get_function would not find them
        with pytest.raises(sim.SimulationError, match=rf"no kernel `{name}`.*name_expressions"):
            plain.get_function(name)
    with pytest.raises(sim.SimulationError, match=r"no kernel `tk<int>`"):
        sim.RawKernel(src, "tk<int>")(1, 1, (x,))
