"""Backends: objects implementing the seven primitives of `cupy_bn.backends.base.Backend`.

`backend="auto"` sends CuPy arrays to the CUDA backend, and NumPy arrays to the numba backend
where numba imports (`pip install cupy-bn[cpu]`: compiled CPU loops), else to the NumPy backend.
Backends register a factory by name; `get_backend` builds each one once.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from cupy_bn.arrays import array_module, is_cupy
from cupy_bn.backends.base import (
    Backend,
    FusedActivation,
    FusedBackward,
    FusedTrainStatistics,
    has_fused_activation,
    has_fused_backward,
    has_fused_statistics,
)
from cupy_bn.validation import check_array_module, type_name

__all__ = [
    "Backend",
    "FusedActivation",
    "FusedBackward",
    "FusedTrainStatistics",
    "available_backends",
    "cpu_backend_name",
    "cupy_usable",
    "get_backend",
    "has_fused_activation",
    "has_fused_backward",
    "has_fused_statistics",
    "numba_usable",
    "register_backend",
]

_FACTORIES: dict[str, Callable[[], Backend]] = {}
_AVAILABLE: dict[str, Callable[[], bool]] = {}


def register_backend(
    name: str, factory: Callable[[], Backend], available: Callable[[], bool] = lambda: True
) -> None:
    """Make `backend=name` build `factory()`; `available()` says whether it can run here."""
    _FACTORIES[name] = factory
    _AVAILABLE[name] = available
    _instance.cache_clear()
    _FOR_NUMPY_ARRAYS.clear()


@cache
def _instance(name: str) -> Backend:
    return _FACTORIES[name]()


def cupy_usable() -> bool:
    """True when CuPy imports and sees a GPU (an install without one imports fine)."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:  # a broken driver or library raises instead of answering
        return False


@cache
def numba_usable() -> bool:
    """True when numba imports and compiles for this NumPy (the numba backend's kernels load)."""
    try:
        import cupy_bn.backends.numba_kernels  # noqa: F401
    except Exception:  # not installed, or a numba too old or too new for this NumPy
        return False
    return True


@cache
def cpu_backend_name() -> str:
    """The backend `"auto"` picks for NumPy arrays: "numba" where it is usable, else "numpy"."""
    return "numba" if numba_usable() else "numpy"


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    return [name for name, ok in _AVAILABLE.items() if ok()]


def get_backend(backend: str | Backend, x: Any) -> Backend:
    """The backend object for `backend` ("auto", a registered name, or a Backend instance)."""
    if type(x) is np.ndarray:  # the common case: a name already resolved for NumPy arrays
        chosen = _FOR_NUMPY_ARRAYS.get(backend)  # type: ignore[arg-type]
        if chosen is not None:
            return chosen
    if not isinstance(backend, str):
        if isinstance(backend, Backend):
            return backend
        raise TypeError(f"backend must be a name or a Backend object, got {type_name(backend)}")
    name = backend
    if backend == "auto":
        backend = "cuda" if is_cupy(x) else cpu_backend_name()
    if backend not in _FACTORIES:
        known = ", ".join(["auto", *_FACTORIES])
        raise ValueError(f"backend must be one of {known}; got {backend!r}")
    if not _AVAILABLE[backend]():
        raise RuntimeError(
            f"backend {backend!r} cannot run on this machine "
            f"(available: {', '.join(available_backends())})"
        )
    chosen = _instance(backend)
    if array_module(x) is not chosen.xp:
        check_array_module("x", x, chosen.xp, f"for backend {backend!r}")
    if type(x) is np.ndarray:
        _FOR_NUMPY_ARRAYS[name] = chosen
    return chosen


#: The backend each name resolved to for NumPy arrays so far (its checks passed), until a
#: backend is registered.
_FOR_NUMPY_ARRAYS: dict[str, Backend] = {}


def _numpy_backend() -> Backend:
    from cupy_bn.backends.numpy_backend import NumpyBackend

    return NumpyBackend()


def _numba_backend() -> Backend:
    from cupy_bn.backends.numba_backend import NumbaBackend

    return NumbaBackend()


def _cuda_backend() -> Backend:
    from cupy_bn.backends.cuda_backend import CudaBackend

    return CudaBackend.for_cupy()


def _sim_backend() -> Backend:
    from cupy_bn.backends.cuda_backend import CudaBackend

    return CudaBackend.for_simulator()


def _sim_usable() -> bool:
    from cupy_bn.backends.cuda_backend import simulator_usable

    return simulator_usable()


register_backend("numpy", _numpy_backend)
register_backend("numba", _numba_backend, numba_usable)
register_backend("cuda", _cuda_backend, cupy_usable)
register_backend("sim", _sim_backend, _sim_usable)
