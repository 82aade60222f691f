"""Every kernel file compiles with NVRTC for each target architecture, every instantiation.

No GPU is needed: NVRTC compiles to PTX on the CPU. An architecture the installed NVRTC does
not support (CUDA 13 dropped compute_70) is skipped with that reason.
"""

import re

import pytest

from cupy_bn.kernels.loader import KERNEL_FILES, cuda_include_dir

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="NVRTC (cupy) not installed")

ARCHS = (70, 80, 90, 100)


def _supported_archs() -> tuple[int, ...]:
    try:
        return tuple(nvrtc.getSupportedArchs())
    except Exception as exc:  # no libnvrtc: nothing can be compiled here
        pytest.skip(f"NVRTC library not loadable: {exc}")


def compile_ptx(source: str, filename: str, arch: int, names: tuple[str, ...]) -> tuple[str, dict]:
    """PTX of `source` for compute_`arch`, and the lowered (mangled) name of each expression."""
    include = cuda_include_dir()
    if include is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found: install nvidia-cuda-runtime")
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ["--std=c++17", f"-arch=compute_{arch}", f"-I{include}"])
        except Exception as exc:
            raise AssertionError(f"{filename} for compute_{arch}: {exc}\n"
                                 f"{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog).strip()
        assert "warning" not in log.lower(), log
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        return nvrtc.getPTX(prog).decode(errors="replace"), lowered
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", sorted(KERNEL_FILES))
def test_kernel_file_compiles_for_architecture(key, arch):
    if arch not in _supported_archs():
        pytest.skip(f"NVRTC {'.'.join(map(str, nvrtc.getVersion()))} does not support "
                    f"compute_{arch}")
    spec = KERNEL_FILES[key]
    names = spec.name_expressions()
    assert len(names) == len(spec.kernels) * 4
    ptx, lowered = compile_ptx(spec.source(), spec.filename, arch, names)
    for name, mangled in lowered.items():
        assert f".entry {mangled}(" in ptx, f"{name} ({mangled}) missing from the PTX"
    assert f".target sm_{arch}" in ptx
    # reductions merge in a fixed order: no floating-point atomics anywhere
    assert not re.search(r"\b(atom|red)(\.\w+)*\.(f16|bf16|f32|f64)\b", ptx)
