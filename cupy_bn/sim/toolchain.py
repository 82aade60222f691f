"""The simulator's compiler (g++) and the CUDA headers it compiles the kernels against.

The compiler is ``$CUPY_BN_SIM_CXX`` or ``g++`` on the PATH (GCC 9 or newer, C++17). The CUDA
headers provide `vector_types.h` (dim3, float4, ...) and the host code of `cuda_fp16.h` /
`cuda_bf16.h`; they are found by the kernels package (`cupy_bn.kernels.toolchain`, which
documents the lookup order), the same headers NVRTC and CuPy get.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cupy_bn.kernels.toolchain import (
    ToolchainError,
    find_cuda_headers,
    forget_cuda_headers,
    format_cuda_version,
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
            "cuda version": format_cuda_version(self.cuda_version),
            "platform": f"{platform.system()} {platform.machine()}",
        }


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
        forget_cuda_headers()
    return _find_toolchain_cached()


def is_available() -> bool:
    """Whether kernels can be simulated here (g++ and the CUDA headers found); cheap."""
    try:
        find_toolchain()
    except ToolchainError:
        return False
    return True
