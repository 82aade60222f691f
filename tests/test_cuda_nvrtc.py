"""Every kernel file compiles with NVRTC for each target architecture, every instantiation.

No GPU is needed: NVRTC compiles to PTX on the CPU (`cupy_bn.kernels.nvrtc`). An architecture the
installed NVRTC does not support (CUDA 13 dropped compute_70) is skipped with that reason.
"""

import re

import pytest

from cupy_bn.kernels import nvrtc
from cupy_bn.kernels.loader import KERNEL_FILES

ARCHS = ("compute_70", "compute_80", "compute_90", "compute_100")


def _headers_missing() -> str:
    """Why the CUDA headers the kernels include cannot be found ("" when they can)."""
    from cupy_bn.kernels.toolchain import ToolchainError, find_cuda_headers

    try:
        find_cuda_headers()
    except ToolchainError as exc:
        return str(exc)
    return ""


pytestmark = [
    pytest.mark.skipif(
        not nvrtc.is_available(), reason="NVRTC not available (cupy-cuda13x, nvidia-cuda-nvrtc)"
    ),
    pytest.mark.skipif(bool(_headers_missing()), reason=f"CUDA headers: {_headers_missing()}"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", sorted(KERNEL_FILES))
def test_kernel_file_compiles_for_architecture(key, arch):
    if not nvrtc.arch_supported(arch):
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.version()))} does not support {arch}")
    spec = KERNEL_FILES[key]
    names = spec.name_expressions()
    assert len(names) == len(spec.kernels) * 4  # float16, bfloat16, float32, float64
    result = nvrtc.compile_program(
        spec.source(),
        arch=arch,
        options=("--std=c++17",),
        name_expressions=names,
        name=spec.filename,
    )
    assert "warning" not in result.log.lower(), result.log
    for name, mangled in result.lowered_names.items():
        assert f".entry {mangled}(" in result.ptx, f"{name} ({mangled}) missing from the PTX"
    assert f".target sm_{arch.removeprefix('compute_')}" in result.ptx
    # reductions merge in a fixed order: no floating-point atomics anywhere
    assert not re.search(r"\b(atom|red)(\.\w+)*\.(f16|bf16|f32|f64)\b", result.ptx)


_SCALAR_TYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
_ARRAY_TYPES = {"uint8": "unsigned char"}


def elementwise_source(spec, t: str) -> str:
    """The spec's operation in a kernel shaped like CuPy's ElementwiseKernel code (type T = t,
    arrays read / referenced per element, raw arrays as pointers, typed scalars by value)."""
    params, loads = ["long long _n"], []
    for text, is_input in ((spec.in_params, True), (spec.out_params, False)):
        for param in (p.split() for p in text.split(",")):
            raw = param[0] == "raw"
            ctype, name = param[1:] if raw else param
            ctype = _ARRAY_TYPES.get(ctype, ctype)
            if raw:
                params.append(f"{'const ' if is_input else ''}{ctype}* {name}")
            elif ctype in _SCALAR_TYPES:
                params.append(f"{_SCALAR_TYPES[ctype]} {name}")
            elif is_input:
                params.append(f"const {ctype}* _{name}")
                loads.append(f"const {ctype} {name} = _{name}[i];")
            else:
                params.append(f"{ctype}* _{name}")
                loads.append(f"{ctype}& {name} = _{name}[i];")
    return (
        f"typedef {t} T;\n{spec.preamble}\n"
        f'extern "C" __global__ void {spec.name}({", ".join(params)}) {{\n'
        "  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
        "  if (i >= _n) return;\n  " + "\n  ".join(loads) + f"\n  {spec.operation}\n}}\n"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_elementwise_snippets_compile(arch):
    from cupy_bn.kernels import elementwise

    if not nvrtc.arch_supported(arch):
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.version()))} does not support {arch}")
    for spec in elementwise.ALL:
        for t in ("float", "double"):
            result = nvrtc.compile_program(
                elementwise_source(spec, t), arch=arch, name=f"{spec.name}.cu"
            )
            assert f".entry {spec.name}(" in result.ptx
