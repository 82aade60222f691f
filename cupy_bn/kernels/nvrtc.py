"""Compiling kernel sources with NVRTC, without a GPU (for tests across the project).

NVRTC comes from the pip wheel ``nvidia-cuda-nvrtc`` through CuPy's binding
``cupy_backends.cuda.libs.nvrtc``; it compiles to PTX on any machine. The CUDA headers
(``cuda_fp16.h`` and friends) are those of :func:`cupy_bn.kernels.toolchain.cuda_include_dirs`,
added with ``-I``.

    ptx = compile_ptx(source, arch="compute_90", name_expressions=("bn_stats<float>",))

:func:`supported_archs` lists the virtual architectures the installed NVRTC accepts (CUDA 13
dropped compute_70, for example), so tests can cover each one where it exists.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cupy_bn.kernels.toolchain import cuda_include_dirs


class NvrtcError(RuntimeError):
    """NVRTC rejected a program; ``log`` holds its messages."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class NvrtcResult:
    """A compiled program: PTX text, NVRTC's log, and the mangled name of each expression."""

    ptx: str
    log: str
    lowered_names: dict[str, str]


def _binding():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as e:  # CuPy missing or without NVRTC
        raise NvrtcError(
            "NVRTC is not available: install cupy-cuda13x (or cupy-cuda12x) and "
            f"nvidia-cuda-nvrtc ({e})"
        ) from e
    return nvrtc


def is_available() -> bool:
    """Whether NVRTC can be called here."""
    try:
        _binding().getVersion()
    except Exception:
        return False
    return True


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    return tuple(_binding().getVersion())  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def supported_archs() -> tuple[str, ...]:
    """The ``compute_XX`` architectures this NVRTC can target, oldest first."""
    return tuple(f"compute_{n}" for n in sorted(_binding().getSupportedArchs()))


def arch_supported(arch: str) -> bool:
    """Whether ``arch`` (``"compute_90"``) is among :func:`supported_archs`."""
    return arch in supported_archs()


def compile_program(
    source: str,
    *,
    arch: str = "compute_80",
    options: Sequence[str] = (),
    name_expressions: Sequence[str] = (),
    name: str = "kernel.cu",
) -> NvrtcResult:
    """Compile ``source`` to PTX for ``arch``.

    Args:
        source: CUDA C++ source (as given to ``cupy.RawModule``).
        arch: a virtual architecture, ``compute_XX``.
        options: further NVRTC options (``-D...``, ``-I...``, ``--use_fast_math``, ...).
        name_expressions: template instantiations to compile and report lowered names for.
        name: the program's file name in messages.

    Raises:
        NvrtcError: the source does not compile (the message and ``.log`` hold NVRTC's log),
            or the architecture is not supported by this NVRTC.
    """
    if not re.fullmatch(r"compute_\d+[af]?", arch):
        raise NvrtcError(f"arch must look like 'compute_80', got {arch!r}")
    nv = _binding()
    if arch.rstrip("af") not in supported_archs():
        raise NvrtcError(
            f"NVRTC {'.'.join(map(str, version()))} does not support {arch} "
            f"(supported: {', '.join(supported_archs())})"
        )
    # without headers, a source that includes one fails naming it
    includes = [f"-I{d}" for d in cuda_include_dirs()]
    opts = [f"-arch={arch}", *includes, *map(str, options)]
    prog = nv.createProgram(source, name, [], [])
    try:
        for expr in name_expressions:
            nv.addNameExpression(prog, expr)
        try:
            nv.compileProgram(prog, opts)
        except nv.NVRTCError as e:
            log = nv.getProgramLog(prog)
            raise NvrtcError(f"NVRTC failed to compile {name} for {arch}:\n{log}", log) from e
        log = nv.getProgramLog(prog)
        lowered = {expr: nv.getLoweredName(prog, expr) for expr in name_expressions}
        ptx = nv.getPTX(prog)
    finally:
        nv.destroyProgram(prog)
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    return NvrtcResult(ptx.rstrip("\0"), log, lowered)


def compile_ptx(source: str, **options: Any) -> str:
    """PTX of ``source``; ``options`` are :func:`compile_program`'s (``arch``, ``options``,
    ``name_expressions``, ``name``)."""
    return compile_program(source, **options).ptx
