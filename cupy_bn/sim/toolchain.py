"""Where the simulator's compiler (g++) and the CUDA headers come from.

The CUDA headers provide `vector_types.h` (dim3, float4, ...) and the host code of
`cuda_fp16.h` / `cuda_bf16.h`; the simulator compiles the kernels as host C++ against them.
They are looked up in this order:

1. ``$CUPY_BN_CUDA_INCLUDE`` (a folder with ``cuda_fp16.h``);
2. ``$CUDA_PATH/include``, ``$CUDA_HOME/include``, ``/usr/local/cuda/include`` (a toolkit);
3. the include folders of the pip wheels ``nvidia-cuda-runtime`` + ``nvidia-cuda-crt``
   (``site-packages/nvidia/cu*/include``), completed where needed with ``nv/target`` from
   ``nvidia-cuda-cccl`` or from CuPy's bundled libcu++.

The compiler is ``$CUPY_BN_SIM_CXX`` or ``g++`` on the PATH (GCC 9 or newer, C++17).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ToolchainError

_REQUIRED_HEADERS = ("vector_types.h", "crt/host_defines.h", "cuda_fp16.h", "cuda_bf16.h")
_INSTALL_HINT = (
    "install the CUDA toolkit (headers in /usr/local/cuda/include), or the header wheels "
    "`pip install nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl`, or point "
    "CUPY_BN_CUDA_INCLUDE at a folder containing cuda_fp16.h"
)


@dataclass(frozen=True)
class Toolchain:
    """What the simulator compiles with.

    Attributes:
        cxx: path of the C++ compiler.
        cxx_version: its version string (``g++ -dumpfullversion``).
        cuda_include: folder with the CUDA headers.
        include_dirs: every folder added with ``-isystem`` (``cuda_include`` first, then a
            folder providing ``nv/target`` when ``cuda_include`` lacks it).
        header_source: where ``cuda_include`` was found (environment variable, toolkit, wheel).
        cuda_version: ``CUDA_VERSION`` from ``cuda_runtime_api.h`` or ``cuda.h`` (e.g. 13000),
            0 when unknown.
    """

    cxx: str
    cxx_version: str
    cuda_include: str
    include_dirs: tuple[str, ...]
    header_source: str
    cuda_version: int

    @property
    def fingerprint(self) -> str:
        """Short hash identifying compiler and headers (part of every cache key)."""
        stamp = [self.cxx, self.cxx_version, *self.include_dirs, str(self.cuda_version)]
        for d in self.include_dirs:
            p = Path(d, "cuda_fp16.hpp")
            if p.exists():
                stamp.append(str(p.stat().st_mtime_ns))
        return hashlib.sha256("\0".join(stamp).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, str]:
        """A summary for ``cupy-bn info``."""
        return {
            "compiler": f"{self.cxx} (GCC {self.cxx_version})",
            "cuda headers": f"{self.cuda_include} ({self.header_source})",
            "cuda version": _format_cuda_version(self.cuda_version),
            "platform": f"{platform.system()} {platform.machine()}",
        }


def _format_cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "unknown"


def _has_headers(d: Path) -> bool:
    return all((d / h).is_file() for h in _REQUIRED_HEADERS)


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


def _find_cxx() -> tuple[str, str]:
    requested = os.environ.get("CUPY_BN_SIM_CXX", "g++")
    path = shutil.which(requested)
    if path is None:
        raise ToolchainError(
            f"the CUDA simulator needs a C++17 compiler: `{requested}` was not found on the PATH "
            "(install g++, e.g. `apt-get install g++`, or set CUPY_BN_SIM_CXX)"
        )
    try:
        out = subprocess.run(
            [path, "-dumpfullversion"], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolchainError(f"the C++ compiler {path} does not run: {e}") from e
    version = out.stdout.strip()
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    if major < 9:
        raise ToolchainError(f"{path} is GCC {version}; the simulator needs GCC 9 or newer")
    return path, version


@dataclass(frozen=True)
class CudaHeaders:
    """The CUDA include folder, plus a folder providing ``nv/target`` when it lacks one."""

    include: str
    include_dirs: tuple[str, ...]
    source: str
    cuda_version: int


@functools.lru_cache(maxsize=1)
def _find_headers_cached() -> CudaHeaders:
    include, dirs, source = _find_headers()
    return CudaHeaders(str(include), tuple(str(d) for d in dirs), source, _cuda_version(include))


def find_cuda_headers(*, refresh: bool = False) -> CudaHeaders:
    """The CUDA headers (used by the simulator and by the NVRTC helper).

    Raises:
        ToolchainError: naming what to install.
    """
    if refresh:
        _find_headers_cached.cache_clear()
    return _find_headers_cached()


def _find_headers() -> tuple[Path, tuple[Path, ...], str]:
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
        return include, (include, *extra), source
    raise ToolchainError(
        "the CUDA simulator needs the CUDA headers (vector_types.h, crt/host_defines.h, "
        f"cuda_fp16.h, cuda_bf16.h); none found in: {', '.join(checked)}. To fix: {_INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=1)
def _find_toolchain_cached() -> Toolchain:
    if platform.system() != "Linux":
        raise ToolchainError(f"the CUDA simulator runs on Linux only (this is {platform.system()})")
    cxx, version = _find_cxx()
    h = find_cuda_headers()
    return Toolchain(
        cxx=cxx,
        cxx_version=version,
        cuda_include=h.include,
        include_dirs=h.include_dirs,
        header_source=h.source,
        cuda_version=h.cuda_version,
    )


def find_toolchain(*, refresh: bool = False) -> Toolchain:
    """The compiler and CUDA headers the simulator uses.

    Cached for the process; ``refresh=True`` looks again (after changing the environment).

    Raises:
        ToolchainError: naming what is missing and what to install.
    """
    if refresh:
        _find_toolchain_cached.cache_clear()
        _find_headers_cached.cache_clear()
    return _find_toolchain_cached()


def is_available() -> bool:
    """Whether kernels can be simulated here (g++ and the CUDA headers found); cheap."""
    try:
        find_toolchain()
    except ToolchainError:
        return False
    return True
