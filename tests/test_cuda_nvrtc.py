"""Every kernel file compiles with NVRTC for each target architecture, every instantiation.

No GPU is needed: NVRTC compiles to PTX on the CPU (`cupy_bn.sim.nvrtc`). An architecture the
installed NVRTC does not support (CUDA 13 dropped compute_70) is skipped with that reason.
"""

import re

import pytest

from cupy_bn.kernels.loader import KERNEL_FILES
from cupy_bn.sim import nvrtc

ARCHS = ("compute_70", "compute_80", "compute_90", "compute_100")

pytestmark = pytest.mark.skipif(not nvrtc.is_available(),
                                reason="NVRTC not available (cupy-cuda13x, nvidia-cuda-nvrtc)")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", sorted(KERNEL_FILES))
def test_kernel_file_compiles_for_architecture(key, arch):
    if not nvrtc.arch_supported(arch):
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.version()))} does not support {arch}")
    spec = KERNEL_FILES[key]
    names = spec.name_expressions()
    assert len(names) == len(spec.kernels) * 4  # float16, bfloat16, float32, float64
    result = nvrtc.compile_program(spec.source(), arch=arch, options=("--std=c++17",),
                                   name_expressions=names, name=spec.filename)
    assert "warning" not in result.log.lower(), result.log
    for name, mangled in result.lowered_names.items():
        assert f".entry {mangled}(" in result.ptx, f"{name} ({mangled}) missing from the PTX"
    assert f".target sm_{arch.removeprefix('compute_')}" in result.ptx
    # reductions merge in a fixed order: no floating-point atomics anywhere
    assert not re.search(r"\b(atom|red)(\.\w+)*\.(f16|bf16|f32|f64)\b", result.ptx)
