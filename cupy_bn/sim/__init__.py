"""CUDA simulator: runs the unchanged CUDA C source of CuPy kernels on the CPU.

A CPU stand-in for CuPy's ``RawModule``, ``RawKernel`` and ``ElementwiseKernel``: the same
launch code drives both, with NumPy arrays here instead of CuPy arrays. g++ compiles the
kernel source against ``emu.h``; every CUDA thread is a fiber, blocks run one after another,
threads switch at ``__syncthreads`` and warp intrinsics in a chosen order (``schedule=``), and
what CUDA leaves undefined (partial barriers, warp intrinsics waiting for absent threads,
out-of-bounds accesses, data races with ``check_races=True``) raises :class:`SimulationError`.
Also here: ``find_toolchain()``/``is_available()`` (g++ and the CUDA headers). See
docs/simulator.md.

Of cupy_bn, this package imports only the kernels package's toolchain discovery
(``cupy_bn.kernels.toolchain``: the CUDA headers, and ``ToolchainError``); the library reaches
the simulator only through ``cupy_bn.kernels.loader.SimLoader`` (docs/architecture.md).
"""

from .args import Param, cupy_scalar_dtype
from .build import cache_dir
from .elementwise import ElementwiseKernel
from .errors import ArgumentTypeWarning, SimulationError, SimulationWarning, ToolchainError
from .races import support as race_mode_support
from .raw import RawKernel, RawModule
from .toolchain import Toolchain, find_toolchain, is_available

__all__ = [
    "ArgumentTypeWarning",
    "ElementwiseKernel",
    "Param",
    "RawKernel",
    "RawModule",
    "SimulationError",
    "SimulationWarning",
    "Toolchain",
    "ToolchainError",
    "cache_dir",
    "cupy_scalar_dtype",
    "find_toolchain",
    "is_available",
    "race_mode_support",
]
