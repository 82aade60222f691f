"""The simulator's test sources compile with NVRTC for the GPU architectures (no GPU needed)."""

from __future__ import annotations

import re

import pytest
from sim_kernel_sources import ALL_SOURCES

from cupy_bn.kernels import nvrtc
from cupy_bn.kernels.toolchain import cuda_include_dirs


def _headers_found() -> bool:
    return bool(cuda_include_dirs())


pytestmark = [
    pytest.mark.skipif(
        not nvrtc.is_available(), reason="NVRTC unavailable (cupy-cuda13x + nvidia-cuda-nvrtc)"
    ),
    pytest.mark.skipif(
        not _headers_found(),
        reason="CUDA headers missing (CUDA toolkit, or pip nvidia-cuda-runtime + nvidia-cuda-crt)",
    ),
]

ARCHS = ("compute_70", "compute_80", "compute_90", "compute_100")


def require_arch(arch: str) -> None:
    if not nvrtc.arch_supported(arch):
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.version()))} does not support {arch}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(ALL_SOURCES))
def test_test_sources_compile_for_each_architecture(name, arch):
    require_arch(arch)
    source, expressions = ALL_SOURCES[name]
    result = nvrtc.compile_program(
        source, arch=arch, name_expressions=expressions, name=f"{name}.cu"
    )
    assert f".target sm_{arch.split('_')[1]}" in result.ptx
    entries = re.findall(r"\.entry\s+(\w+)", result.ptx)
    assert entries
    for expr in expressions:
        assert result.lowered_names[expr] in entries
    for kernel in re.findall(
        r'extern "C" __global__ void(?: __launch_bounds__\(\d+\))? (\w+)', source
    ):
        assert kernel in entries


def test_supported_architectures_are_listed():
    archs = nvrtc.supported_archs()
    assert "compute_80" in archs and "compute_90" in archs
    assert all(re.fullmatch(r"compute_\d+", a) for a in archs)


def test_compile_errors_carry_the_log():
    with pytest.raises(
        nvrtc.NvrtcError,
        match=r'bad\.cu\(2\): error: identifier "undefined_fn"'
        r" is undefined",
    ) as info:
        nvrtc.compile_ptx('extern "C" __global__ void k() {\n  undefined_fn();\n}\n', name="bad.cu")
    assert "undefined_fn" in info.value.log


def test_options_reach_nvrtc():
    src = 'extern "C" __global__ void k(int* x) { *x = VALUE; }'
    for value in (123456789, 987654321):  # the constant itself is in the PTX
        ptx = nvrtc.compile_ptx(src, options=(f"-DVALUE={value}",))
        assert re.search(rf"\b{value}\b", ptx), ptx
    with pytest.raises(nvrtc.NvrtcError, match='"VALUE" is undefined'):
        nvrtc.compile_ptx(src)


def test_unsupported_or_malformed_architecture():
    with pytest.raises(nvrtc.NvrtcError, match=r"arch must look like 'compute_80'"):
        nvrtc.compile_ptx("", arch="sm_80")
    with pytest.raises(nvrtc.NvrtcError, match=r"does not support compute_10\b"):
        nvrtc.compile_ptx("", arch="compute_10")
