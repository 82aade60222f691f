"""Exceptions and warnings of the CUDA simulator.

`ToolchainError` belongs to the kernels package (`cupy_bn.kernels.toolchain`); the simulator
raises it too, when g++ is missing, and re-exports it.
"""

from __future__ import annotations

from cupy_bn.kernels.toolchain import ToolchainError

__all__ = ["ArgumentTypeWarning", "SimulationError", "SimulationWarning", "ToolchainError"]


class SimulationError(RuntimeError):
    """A kernel did something the CUDA programming model does not allow.

    The message names the block, the thread and the source line where they are known:
    deadlocks, barriers reached by part of a block, warp intrinsics waiting for threads that
    never arrive, out-of-bounds accesses, shared memory overruns, stack overflows, data races
    (race mode), invalid launch configurations and arguments that cannot be passed.
    """


class SimulationWarning(UserWarning):
    """Something a launch did that is legal but suspicious (reported, the launch goes on)."""


class ArgumentTypeWarning(SimulationWarning):
    """A kernel argument's type differs from the parameter's C type.

    CuPy copies the argument's own bytes (a Python float as 8-byte float64, a Python int as
    int64) and the kernel reads as many bytes as its parameter type has: a `float` parameter
    then reads garbage on a real GPU. The simulator packs arguments the same way and warns.
    """
