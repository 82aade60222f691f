"""Where the CUDA headers the kernels include come from, for NVRTC, CuPy and the simulator.

The kernels include `cuda_fp16.h` / `cuda_bf16.h`; compiled as host C++ by the simulator they
also need `vector_types.h` (dim3, float4, ...) and `crt/host_defines.h`. The headers are looked
up in this order:

1. ``$CUPY_BN_CUDA_INCLUDE`` (a folder with ``cuda_fp16.h``);
2. ``$CUDA_PATH/include``, ``$CUDA_HOME/include``, ``/usr/local/cuda/include`` (a toolkit);
3. the include folders of the pip wheels ``nvidia-cuda-runtime`` + ``nvidia-cuda-crt``
   (``site-packages/nvidia/cu*/include``), completed where needed with ``nv/target`` from
   ``nvidia-cuda-cccl`` or from CuPy's bundled libcu++.

The first folder holding all the headers wins. `cupy_bn.kernels.loader` passes the result to
CuPy (`-I`), `cupy_bn.kernels.nvrtc` to NVRTC, and the simulator (`cupy_bn.sim.toolchain`)
to g++ (`-isystem`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CudaHeaders",
    "ToolchainError",
    "cuda_include_dirs",
    "find_cuda_headers",
    "forget_cuda_headers",
    "format_cuda_version",
]

REQUIRED_HEADERS = ("vector_types.h", "crt/host_defines.h", "cuda_fp16.h", "cuda_bf16.h")
INSTALL_HINT = (
    "install the CUDA toolkit (headers in /usr/local/cuda/include), or the header wheels "
    "`pip install nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl`, or point "
    "CUPY_BN_CUDA_INCLUDE at a folder containing cuda_fp16.h"
)


class ToolchainError(RuntimeError):
    """A part of the kernel toolchain is missing (the CUDA headers, or the simulator's g++).

    The message says what to install.
    """


@dataclass(frozen=True)
class CudaHeaders:
    """The CUDA include folder, plus a folder providing ``nv/target`` when it lacks one.

    Attributes:
        include: the folder with ``cuda_fp16.h`` and the other required headers.
        include_dirs: every folder to add to the include path (``include`` first).
        source: where ``include`` was found (environment variable, toolkit, pip wheels).
        cuda_version: ``CUDA_VERSION`` from ``cuda_runtime_api.h`` or ``cuda.h`` (e.g. 13000),
            0 when unknown.
    """

    include: str
    include_dirs: tuple[str, ...]
    source: str
    cuda_version: int


def format_cuda_version(version: int) -> str:
    """``13000`` -> ``"13.0"``; ``"unknown"`` for 0."""
    return f"{version // 1000}.{version % 1000 // 10}" if version else "unknown"


def _has_headers(d: Path) -> bool:
    return all((d / h).is_file() for h in REQUIRED_HEADERS)


def _has_nv_target(d: Path) -> bool:
    return (d / "nv" / "target").is_file()


def _module_dirs(name: str) -> list[Path]:
    """Folders of an installed (namespace) package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def _wheel_include_dirs() -> list[Path]:
    """Include folders of NVIDIA's pip wheels, newest CUDA major version first."""
    found = []
    for base in _module_dirs("nvidia"):
        for d in sorted(base.glob("cu[0-9]*/include"), reverse=True):
            found.append(d)
        for sub in ("cuda_runtime", "cuda_nvcc", "cuda_cccl"):
            d = base / sub / "include"
            if d.is_dir():
                found.append(d)
    return found


def _header_candidates() -> list[tuple[Path, str]]:
    """Folders that may hold the CUDA headers, in lookup order, with where each comes from."""
    cands: list[tuple[Path, str]] = []
    explicit = os.environ.get("CUPY_BN_CUDA_INCLUDE")
    if explicit:
        cands.append((Path(explicit), "CUPY_BN_CUDA_INCLUDE"))
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root:
            cands.append((Path(root) / "include", f"${var}"))
    cands.append((Path("/usr/local/cuda/include"), "CUDA toolkit"))
    for d in _wheel_include_dirs():
        cands.append((d, "pip wheels"))
    return cands


def _nv_target_dirs(include: Path) -> list[Path]:
    """Folders that could provide <nv/target> next to the chosen CUDA include folder."""
    dirs = [include, include / "cccl"]
    for d in _wheel_include_dirs():
        dirs += [d, d / "cccl"]
    for base in _module_dirs("cupy"):
        dirs.append(base / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx")
    return dirs


def _cuda_version(include: Path) -> int:
    for name in ("cuda_runtime_api.h", "cuda.h"):
        p = include / name
        if p.is_file():
            m = re.search(r"#define\s+CUDA(?:RT)?_VERSION\s+(\d+)", p.read_text(errors="replace"))
            if m:
                return int(m.group(1))
    return 0


def _find_headers() -> CudaHeaders:
    checked = []
    for include, source in _header_candidates():
        if not _has_headers(include):
            checked.append(str(include))
            continue
        extra: tuple[Path, ...] = ()
        if not _has_nv_target(include):
            nv = next((d for d in _nv_target_dirs(include) if _has_nv_target(d)), None)
            if nv is None:
                checked.append(f"{include} (has cuda_fp16.h but no nv/target)")
                continue
            extra = (nv,)
        dirs = tuple(str(d) for d in (include, *extra))
        return CudaHeaders(str(include), dirs, source, _cuda_version(include))
    raise ToolchainError(
        f"the CUDA headers ({', '.join(REQUIRED_HEADERS)}) are needed to compile the kernels; "
        f"none found in: {', '.join(checked)}. To fix: {INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=1)
def _find_headers_cached() -> CudaHeaders:
    return _find_headers()


def find_cuda_headers(*, refresh: bool = False) -> CudaHeaders:
    """The CUDA headers (see the module docstring for the lookup order).

    Cached for the process (a failed lookup is not cached); ``refresh=True`` looks again, after
    the environment changed.

    Raises:
        ToolchainError: naming the folders searched and what to install.
    """
    if refresh:
        forget_cuda_headers()
    return _find_headers_cached()


def forget_cuda_headers() -> None:
    """Drop the cached lookup: the next `find_cuda_headers` searches again."""
    _find_headers_cached.cache_clear()


def cuda_include_dirs() -> tuple[str, ...]:
    """The folders of `find_cuda_headers`, or none when no headers are found.

    For compilers that have their own search (CuPy's NVRTC finds the headers of its CUDA
    wheels itself): an empty tuple leaves the search to them.
    """
    try:
        return find_cuda_headers().include_dirs
    except ToolchainError:
        return ()
