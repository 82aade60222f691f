"""Which array library an array belongs to, and copies of arrays in host memory.

An array is CuPy's when its type comes from the `cupy` package; nothing here imports CuPy for
NumPy input, so the library runs where CuPy is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["array_module", "is_cupy", "to_host"]


def is_cupy(x: Any) -> bool:
    """Whether `x` is a CuPy array (or another object of the `cupy` package)."""
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(x: Any):
    """`cupy` for CuPy arrays, `numpy` for everything else."""
    if type(x) is np.ndarray:
        return np
    if is_cupy(x):
        import cupy

        return cupy
    return np


def to_host(x: Any) -> np.ndarray:
    """`x` as a NumPy array: a CuPy array copied from the GPU, anything else `np.asarray(x)`."""
    return x.get() if is_cupy(x) else np.asarray(x)
