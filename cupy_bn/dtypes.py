"""Floating dtypes batch norm accepts, and the accumulator dtype each one uses."""

from __future__ import annotations

import numpy as np

try:  # bfloat16 comes from ml_dtypes (installed with JAX/TensorFlow, optional here)
    import ml_dtypes

    BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = None

SUPPORTED = tuple(
    d for d in (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64)) if d
)
_SUPPORTED_SET = frozenset(SUPPORTED)  # a hash lookup for the common case


def check_float_dtype(name: str, dtype) -> np.dtype:
    """Return `dtype` as a numpy dtype, or raise TypeError naming `name` if it is not a float."""
    if dtype in _SUPPORTED_SET:  # a dtype object, the common case
        return dtype
    if dtype in SUPPORTED:  # scalar types and names compare equal to their dtype
        return np.dtype(dtype)
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED:
        names = ", ".join(str(d) for d in SUPPORTED)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {dtype}")
    return dtype


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def accumulation_dtype(dtype) -> np.dtype:
    """float64 for float64 data, float32 for everything narrower (float16, bfloat16, float32)."""
    return _FLOAT64 if dtype == _FLOAT64 else _FLOAT32
