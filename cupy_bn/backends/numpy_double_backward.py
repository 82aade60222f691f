"""The NumPy backend's double-backward primitives, in whole-array NumPy.

`double_backward_reduce` and `double_backward_apply` of `cupy_bn.backends.base.Backend` (the
formulas are in that module's docstring). Both work on the canonical arrays at once, in the
accumulation dtype (float32 for float16, bfloat16 and float32 data, float64 for float64):

- `x - mean` is formed first (exact for float32 data far from zero, |mean| >> std: the two
  operands are within a factor of two of each other), never `x * y - mean * sum(y)`;
- per-channel sums accumulate in float64 (`np.einsum(..., dtype=float64)` for the products,
  `sum(..., dtype=float64)` for the plain sums), so float32 rounding does not grow with the
  number of values per channel.
"""

from __future__ import annotations

import numpy as np

from cupy_bn.backends.base import Array, DoubleBackwardCoefficients
from cupy_bn.layout import NCS, View

__all__ = ["double_backward_apply", "double_backward_reduce", "meeting_dtype"]


def meeting_dtype(*views: View | None) -> np.dtype:
    """The accumulation dtype of several tensors: float64 when one is float64, else float32."""
    dtypes = {np.dtype(v.data.dtype) for v in views if v is not None}
    return np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)


def _per_channel(view: View, v: np.ndarray) -> np.ndarray:
    """A `(C,)` vector shaped to broadcast against the view's canonical array."""
    return v[None, :, None] if view.layout == NCS else v[None, :]


def _sum_axes(view: View) -> tuple[int, ...]:
    return (0, 2) if view.layout == NCS else (0,)


def _product_sums(view: View, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel `sum(a * b)`, products and sums in float64."""
    subscripts = "ncs,ncs->c" if view.layout == NCS else "mc,mc->c"
    return np.einsum(subscripts, a, b, dtype=np.float64)


def double_backward_reduce(
    dy: View, x: View, ddx: View, mean: Array
) -> tuple[Array, Array, Array, Array, Array]:
    """`(sum(dy), sum(dy * (x - mean)), sum(ddx), sum(ddx * (x - mean)), sum(ddx * dy))`."""
    acc = meeting_dtype(dy, x, ddx)
    channels = x.num_channels
    if x.count == 0:
        return tuple(np.zeros(channels, acc) for _ in range(5))
    g = dy.data.astype(acc, copy=False)
    h = ddx.data.astype(acc, copy=False)
    xmu = np.subtract(x.data, _per_channel(x, np.asarray(mean, acc)), dtype=acc)
    axes = _sum_axes(x)
    sums = (
        g.sum(axis=axes, dtype=np.float64),
        _product_sums(x, g, xmu),
        h.sum(axis=axes, dtype=np.float64),
        _product_sums(x, h, xmu),
        _product_sums(x, h, g),
    )
    return tuple(s.astype(acc) for s in sums)


def double_backward_apply(
    dy: View,
    x: View,
    ddx: View | None,
    mean: Array,
    coefficients: DoubleBackwardCoefficients,
) -> tuple[Array, Array]:
    """`gx = gx_dy * dy + gx_ddx * ddx + gx_xmu * (x - mean) + gx_one` (x's dtype) and
    `gdy = gdy_ddx * ddx + gx_dy * (x - mean) + gdy_one` (dy's dtype), in the accumulation
    dtype, with the kernels' association."""
    acc = meeting_dtype(dy, x, ddx)
    k = DoubleBackwardCoefficients(
        *(_per_channel(x, np.asarray(v, np.float64).astype(acc)) for v in coefficients.vectors())
    )
    xmu = np.subtract(x.data, _per_channel(x, np.asarray(mean, acc)), dtype=acc)
    gx = k.gx_dy * dy.data.astype(acc, copy=False)
    if ddx is None:
        gdy = k.gx_dy * xmu
    else:
        h = ddx.data.astype(acc, copy=False)
        gx += k.gx_ddx * h
        gdy = k.gdy_ddx * h
        gdy += k.gx_dy * xmu
    gx += k.gx_xmu * xmu
    gx += k.gx_one
    gdy += k.gdy_one
    return gx.astype(x.data.dtype, copy=False), gdy.astype(dy.data.dtype, copy=False)
