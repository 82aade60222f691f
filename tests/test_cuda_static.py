"""Static performance checks of the kernels, without a GPU (`cupy_bn.kernels.ptx_checks`).

From NVRTC's PTX of every instantiation on each target architecture: no local memory. Where a
ptxas reading that PTX is found (the ``nvidia-cuda-nvcc`` wheel of NVRTC's release, or
``$CUPY_BN_PTXAS``): no spills and registers within each kernel's budget
(`ptx_checks.REGISTER_BUDGETS`, docs/kernels.md). The parsers and the budget rules are also
checked on hand-written PTX and ptxas messages, which need neither.
"""

import functools
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from cupy_bn.kernels import nvrtc, ptx_checks
from cupy_bn.kernels.loader import KERNEL_FILES
from cupy_bn.kernels.ptx_checks import KernelFacts

ARCHS = ("compute_80", "compute_90", "compute_100")


def _headers_missing() -> str:
    from cupy_bn.kernels.toolchain import ToolchainError, find_cuda_headers

    try:
        find_cuda_headers()
    except ToolchainError as exc:
        return str(exc)
    return ""


def _skip_without_nvrtc() -> None:
    if not nvrtc.is_available():
        pytest.skip("NVRTC not available (cupy-cuda13x, nvidia-cuda-nvrtc)")
    missing = _headers_missing()
    if missing:
        pytest.skip(f"CUDA headers: {missing}")


def _skip_without_ptxas() -> ptx_checks.Ptxas:
    found = ptx_checks.find_ptxas()
    if found is None:
        pytest.skip(
            f"no ptxas of CUDA {'.'.join(map(str, nvrtc.version()))} or newer: "
            "`pip install nvidia-cuda-nvcc==<NVRTC's release>.*` or set CUPY_BN_PTXAS"
        )
    return found


@functools.cache
def _facts(key: str, arch: str, use_ptxas: bool) -> tuple[KernelFacts, ...]:
    return tuple(ptx_checks.kernel_facts(key, arch, use_ptxas=use_ptxas))


def _skip_unsupported(arch: str) -> None:
    if not nvrtc.arch_supported(arch):
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.version()))} does not support {arch}")


# ------------------------------------------------------------------ the kernels

#: The kernels of each file with a 16-byte pack path.
PACKED_PER_FILE = {
    "ncs": {"bn_ncs_stats", "bn_ncs_apply", "bn_ncs_reduce", "bn_ncs_backward"},
    "mc": {"bn_mc_stats", "bn_mc_apply", "bn_mc_reduce", "bn_mc_backward"},
    "double_backward": {
        "bn_ncs_double_backward_reduce",
        "bn_ncs_double_backward_apply",
        "bn_mc_double_backward_apply",
    },
    "fused": {"bn_ncs_apply_fused", "bn_mc_apply_fused", "bn_relu_gradient"},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", sorted(KERNEL_FILES))
def test_kernels_use_no_local_memory_and_pack_where_they_should(key, arch):
    _skip_without_nvrtc()
    _skip_unsupported(arch)
    facts = _facts(key, arch, False)
    assert len(facts) == len(KERNEL_FILES[key].kernels) * 4
    assert [f.expression for f in facts if f.local_memory] == []
    # the 16-byte pack paths: 128-bit loads (and stores, but in the reductions)
    assert ptx_checks.check_facts(list(facts)) == []
    packed = [
        f for f in facts if f.kernel in ptx_checks.PACKED_KERNELS + ptx_checks.PACKED_LOAD_KERNELS
    ]
    assert {f.kernel for f in packed} == PACKED_PER_FILE[key]
    for f in packed:
        sixteen = re.search(r"<__(half|nv_bfloat16),", f.expression)
        if f.kernel in ptx_checks.PACKED_16BIT_ONLY and not sixteen:
            assert f.wide_loads == 0, f  # float and double fold element by element
            continue
        if "<double" in f.expression:
            assert f.v2_loads >= 1 and f.v4_loads == 0, f  # two doubles per load
        else:
            assert f.v4_loads >= 1, f
        if f.kernel in ptx_checks.PACKED_KERNELS:
            assert f.wide_stores >= 1, f


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", sorted(KERNEL_FILES))
def test_kernels_within_register_budget_without_spills(key, arch):
    _skip_without_nvrtc()
    _skip_unsupported(arch)
    _skip_without_ptxas()
    facts = _facts(key, arch, True)
    assert all(f.registers is not None and f.spill_stores is not None for f in facts), facts
    assert ptx_checks.check_facts(list(facts)) == []


def test_every_kernel_has_a_target_and_its_launch_bounds_agree():
    kernels = {k for spec in KERNEL_FILES.values() for k in spec.kernels}
    assert set(ptx_checks.TARGET_BLOCKS) == kernels
    for spec in KERNEL_FILES.values():
        bounds = ptx_checks.launch_bounds(spec.source())
        assert set(bounds) == set(spec.kernels), spec.filename
        for kernel, (threads, min_blocks) in bounds.items():
            assert threads == ptx_checks.BLOCK_THREADS, kernel
            # a minimum in the source is the target: ptxas then keeps to the budget itself
            assert min_blocks in (None, ptx_checks.TARGET_BLOCKS[kernel]), kernel


# ------------------------------------------------------------------ the rules and parsers


def test_register_budgets_follow_the_register_file():
    assert ptx_checks.budget_for_blocks(8) == 32
    assert ptx_checks.budget_for_blocks(5) == 48  # 51.2 rounded down to ptxas's 8
    assert ptx_checks.budget_for_blocks(4) == 64
    assert ptx_checks.budget_for_blocks(3) == 80
    assert ptx_checks.budget_for_blocks(1) == 255
    assert ptx_checks.REGISTER_BUDGETS["bn_ncs_apply"] == 48
    assert ptx_checks.REGISTER_BUDGETS["bn_mc_reduce"] == 64


_PTX = """
.visible .entry first(
  .param .u64 a
)
{
  .local .align 4 .b8 __local_depot0[16];
  ld.global.nc.v4.f32 {%f1, %f2, %f3, %f4}, [%rd1];
  ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd2];
  ld.global.nc.L1::no_allocate.v2.f64 {%fd1, %fd2}, [%rd3];
  ld.global.f32 %f5, [%rd4];
  st.global.v4.f32 [%rd5], {%f1, %f2, %f3, %f4};
  st.global.v2.b32 [%rd6], {%r1, %r2};
}
.visible .entry second(
  .param .u64 a
)
{
  ld.global.nc.f32 %f1, [%rd1];
  st.global.f32 [%rd2], %f1;
}
"""


def test_ptx_facts_count_vector_accesses_and_local_memory_per_entry():
    entries = ptx_checks.ptx_entries(_PTX)
    assert list(entries) == ["first", "second"]
    first = ptx_checks.ptx_facts(entries["first"])
    assert first == {
        "local_memory": True,
        "v4_loads": 2,
        "v2_loads": 1,
        "v4_stores": 1,
        "v2_stores": 1,
        "wide_loads": 3,  # v4 of 32-bit lanes and v2 of 64-bit lanes
        "wide_stores": 1,  # v2.b32 is 64 bits
    }
    second = ptx_checks.ptx_facts(entries["second"])
    assert second == dict.fromkeys(first, 0) | {"local_memory": False}


_PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5firstPf' for 'sm_90'
ptxas info    : Function properties for _Z5firstPf
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 392 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6secondPf' for 'sm_90'
ptxas info    : Function properties for _Z6secondPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
"""


def test_ptxas_log_is_read_per_entry():
    assert ptx_checks.parse_ptxas_log(_PTXAS_LOG) == {
        "_Z5firstPf": {"registers": 64, "spill_stores": 8, "spill_loads": 12, "stack_frame": 24},
        "_Z6secondPf": {"registers": 30, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0},
    }


def _fact(kernel="bn_ncs_apply", **changes) -> KernelFacts:
    base = {
        "expression": f"{kernel}<float, float>",
        "kernel": kernel,
        "arch": "compute_90",
        "local_memory": False,
        "v4_loads": 0,
        "v2_loads": 0,
        "v4_stores": 0,
        "v2_stores": 0,
        "wide_loads": 1,
        "wide_stores": 1,
        "registers": 40,
        "spill_stores": 0,
        "spill_loads": 0,
        "stack_frame": 0,
    }
    return KernelFacts(**(base | changes))


def test_check_facts_names_each_broken_rule():
    assert ptx_checks.check_facts([_fact(), _fact(registers=48)]) == []
    problems = ptx_checks.check_facts(
        [
            _fact(registers=49),
            _fact(local_memory=True),
            _fact(spill_loads=4),
            _fact("bn_mc_reduce", registers=72),
            _fact(registers=None, spill_stores=None, spill_loads=None),  # no ptxas: not checked
        ]
    )
    assert len(problems) == 4, problems
    assert re.search(
        r"bn_ncs_apply<float, float> on compute_90: 49 registers, budget 48", problems[0]
    )
    assert "local memory" in problems[1]
    assert "spills (0 bytes stored, 4 loaded)" in problems[2]
    assert "bn_mc_reduce<float, float> on compute_90: 72 registers, budget 64" in problems[3]
    unpacked = ptx_checks.check_facts(
        [
            _fact(wide_loads=0),
            _fact(wide_stores=0),
            _fact("bn_mc_double_backward_reduce", wide_loads=0, wide_stores=0),  # not packed
            _fact("bn_ncs_stats", wide_stores=0),  # a reduction stores no tensor
            _fact("bn_mc_reduce", wide_loads=0, wide_stores=0),
            _fact("bn_ncs_stats", wide_loads=0, wide_stores=0),  # float: element by element
            _fact("bn_ncs_stats", wide_loads=0, expression="bn_ncs_stats<__half, float>"),
        ]
    )
    assert unpacked == [
        "bn_ncs_apply<float, float> on compute_90: no 128-bit global loads or stores "
        "(0 loads, 1 stores)",
        "bn_ncs_apply<float, float> on compute_90: no 128-bit global loads or stores "
        "(1 loads, 0 stores)",
        "bn_mc_reduce<float, float> on compute_90: no 128-bit global loads",
        "bn_ncs_stats<__half, float> on compute_90: no 128-bit global loads",
    ]


def test_summary_rows_cover_the_dtypes_of_each_kernel():
    rows = ptx_checks.summary_rows(
        [
            _fact(registers=32, v4_loads=1),
            _fact(registers=44, spill_stores=4, spill_loads=8, v2_loads=2),
            _fact("bn_mc_apply", registers=None, spill_stores=None, spill_loads=None),
        ]
    )
    assert rows == [
        ("bn_ncs_apply", "compute_90", "32-44", 12, 1, 2),
        ("bn_mc_apply", "compute_90", "?", 0, 0, 0),
    ]


# ------------------------------------------------------------------ the tools, on real code


_SPILLING = """
extern "C" __global__ void __launch_bounds__(1024, 2) spill(const float* a, float* out, int n) {
  float v[24];
#pragma unroll
  for (int i = 0; i < 24; ++i) v[i] = a[threadIdx.x + i * n];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 24; ++i)
#pragma unroll
    for (int j = 0; j < 24; ++j) s += v[i] * v[j] / (v[(i + j) % 24] + 1.f);
  out[threadIdx.x] = s + v[threadIdx.x % 24];
}
"""


def test_local_memory_and_spills_of_a_real_kernel_are_found():
    _skip_without_nvrtc()
    ptx = nvrtc.compile_ptx(_SPILLING, arch="compute_90")
    (entry,) = ptx_checks.ptx_entries(ptx).values()
    assert ptx_checks.ptx_facts(entry)["local_memory"]  # v[threadIdx.x % 24]: a local array
    ptxas = _skip_without_ptxas()
    report = ptx_checks.ptxas_report(ptx, "compute_90", ptxas)
    assert report["spill"]["registers"] <= 32  # 1024 threads x 2 blocks
    assert report["spill"]["spill_stores"] > 0 and report["spill"]["spill_loads"] > 0
    problems = ptx_checks.check_facts(
        [_fact("spill", **ptx_checks.ptx_facts(entry), **report["spill"])]  # type: ignore[arg-type]
    )
    assert len(problems) == 2 and "local memory" in problems[0] and "spills" in problems[1]


# ------------------------------------------------------------------ benchmarks/kernel_report.py


@functools.cache
def _kernel_report():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


#: An entry with a loop whose body branches: one side loads and stores a 16-byte pack, the
#: other a 4-byte value; then a second loop (a merge) of cache-global loads.
LOOP_PTX = """
.visible .entry k(
)
{
\tmov.u32 \t%r1, 0;
$L__BB0_1:
\tsetp.eq.s32 \t%p1, %r1, 7;
\t@%p1 bra \t$L__BB0_3;
\tld.global.nc.v4.u32 \t{%r2, %r3, %r4, %r5}, [%rd1];
\tst.global.v4.u32 \t[%rd2], {%r2, %r3, %r4, %r5};
\tbra.uni \t$L__BB0_4;
$L__BB0_3:
\tld.global.f32 \t%f1, [%rd1];
\tst.global.f32 \t[%rd2], %f1;
$L__BB0_4:
\tadd.s32 \t%r1, %r1, 1;
\tsetp.lt.s32 \t%p2, %r1, 100;
\t@%p2 bra \t$L__BB0_1;
$L__BB0_5:
\tld.global.cg.f32 \t%f2, [%rd3];
\tadd.s32 \t%r1, %r1, 1;
\t@%p2 bra \t$L__BB0_5;
\tret;
}
"""


def test_kernel_report_counts_one_iteration_along_the_heaviest_path():
    report = _kernel_report()
    first, merge = report.loops(LOOP_PTX)
    # the head (2 instructions), the pack side (3), the latch (3); the 4-byte side not taken
    assert (first.instructions, first.loads, first.stores) == (8, 1, 1)
    assert (first.load_bytes, first.store_bytes, first.wide) == (16, 16, 2)
    assert (merge.loads, merge.load_bytes) == (0, 0)  # __ldcg partials are not the tensors
    # bn_ncs_apply<float>: 4 elements per iteration, 8 / 4 instructions each, 8 bytes each
    assert report.hot_loop_figures("bn_ncs_apply", "float32", LOOP_PTX) == (2.0, 8.0, 0.5)
    row = report.Row("bn_ncs_apply", "float32", per_element=2.0, bytes_per_element=8.0)
    assert row.hbm_fraction == 1.0
    row.per_element = 2 * 8.0 * report.ISSUE_PER_S / report.HBM_BYTES_PER_S  # issue-bound x2
    assert row.hbm_fraction == pytest.approx(0.5)


def test_kernel_report_on_the_kernels():
    _skip_without_nvrtc()
    _skip_unsupported("compute_90")
    report = _kernel_report()
    rows = report.report(Path(__file__).resolve().parents[1], "compute_90")
    assert {k for k, _ in rows} == set(report.TENSORS)
    for kernel in ptx_checks.PACKED_KERNELS + ptx_checks.PACKED_LOAD_KERNELS:
        for dtype, size in (("float16", 8), ("float32", 4), ("float64", 2)):
            row = rows[kernel, dtype]
            writes, reads = report.TENSORS[kernel]
            if kernel in ptx_checks.PACKED_16BIT_ONLY and size < 8:
                size = 1  # float and double statistics load element by element
            # the hot loop is the packed one: one access per pack of each tensor
            assert row.accesses_per_element == pytest.approx((writes + reads) / size), row
            assert row.bytes_per_element == (writes + reads) * report.ITEMSIZE[dtype], row
