"""Small tensors: each primitive as a handful of whole-array NumPy calls on the calling thread.

Below `DIRECT_MAX_ELEMENTS` values, the NumPy backend's blocks, coefficient patterns and thread
hand-offs cost more than the work they organize, so a tensor that small is processed here in
one piece. The formulas are those of `cupy_bn.backends.base`; what makes them exact:

- **Always centred.** Statistics are two-pass: a first mean `m0`, then the sums of `x - m0`
  give `mean = m0 + mean(x - m0)` and `var = mean((x - m0)^2) - mean(x - m0)^2`, exact when
  |mean| >> std. The gradient sums use `x - mean` likewise.
- **Short float32 accumulators.** `np.einsum` adds the values of one channel in sequence along
  the batch axis; a channels-last tensor of more than `MAX_SEQUENTIAL` rows is summed as rows
  of `k` samples, so no float32 accumulator adds more than `MAX_SEQUENTIAL` values in
  sequence. Totals are float64.
- float16/bfloat16 data are converted to float32 once, and every output is computed in the
  accumulation dtype and cast back at the end.

Per-channel vectors broadcast as `(C,)` for MC and `(C, 1)` for NCS.
"""

from __future__ import annotations

import numpy as np

from cupy_bn.layout import MC, View

#: Tensors of at most this many values take this module's path (crossover measured on a
#: 2-core Xeon against the blocked, threaded path; see benchmarks/README.md).
DIRECT_MAX_ELEMENTS = 1 << 17
#: The most values a float32 accumulator of a channels-last sum adds in sequence.
MAX_SEQUENTIAL = 512


def is_small(view: View) -> bool:
    """Whether `view` takes the direct path."""
    return view.data.size <= DIRECT_MAX_ELEMENTS


def per_channel(vector: np.ndarray, layout: str) -> np.ndarray:
    """A `(C,)` vector shaped to broadcast against canonical data of `layout`."""
    return vector if layout == MC else vector[:, None]


def in_acc(a: np.ndarray, acc: np.dtype) -> np.ndarray:
    """`a` itself in the accumulation dtype, else a converted copy."""
    return a if a.dtype == acc else a.astype(acc)


def channel_sums(a: np.ndarray, layout: str, b: np.ndarray | None = None) -> np.ndarray:
    """Float64 per-channel sums of `a` (or of `a * b`) over canonical data of `layout`."""
    operands = (a,) if b is None else (a, b)
    if layout != MC:
        spec = "ncs,ncs->c" if b is not None else "ncs->c"
        return np.einsum(spec, *operands).astype(np.float64)
    rows, channels = a.shape
    spec = "ij,ij->j" if b is not None else "ij->j"
    if rows <= MAX_SEQUENTIAL:
        return np.einsum(spec, *operands).astype(np.float64)
    k = -(-rows // MAX_SEQUENTIAL)  # samples per summed row
    full = rows // k * k
    wide = [o[:full].reshape(full // k, k * channels) for o in operands]
    total = np.einsum(spec, *wide).reshape(k, channels).sum(axis=0, dtype=np.float64)
    if full < rows:
        total += np.einsum(spec, *(o[full:] for o in operands))
    return total


def batch_stats(x: View, acc: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 `(mean, var)`, two-pass."""
    a, n = in_acc(x.data, acc), x.count
    first = channel_sums(a, x.layout) / n
    with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN: reported by the caller
        centred = a - per_channel(first.astype(acc), x.layout)
        offset = channel_sums(centred, x.layout) / n
        var = np.maximum(channel_sums(centred, x.layout, centred) / n - offset * offset, 0.0)
    return first.astype(acc).astype(np.float64) + offset, var


def apply(x: View, scale: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """`x * scale + shift` (`shift` None: `x * scale`) in `x`'s dtype; vectors in acc dtype."""
    y = np.multiply(x.data, per_channel(scale, x.layout))
    if shift is not None:
        y += per_channel(shift, x.layout)
    return y if y.dtype == x.data.dtype else y.astype(x.data.dtype)


def centred(x: View, mean: np.ndarray, acc: np.dtype) -> np.ndarray:
    """`x - mean` in the accumulation dtype (a new array)."""
    return np.subtract(x.data, per_channel(np.asarray(mean, acc), x.layout), dtype=acc)


def gradient_sums(dy: View, xmu: np.ndarray, acc: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Float64 `sum(dy)` and `sum(dy * (x - mean))` from `xmu = x - mean`."""
    g = in_acc(dy.data, acc)
    return channel_sums(g, dy.layout), channel_sums(g, dy.layout, xmu)


def input_gradient(
    dy: View, xmu: np.ndarray, p: np.ndarray, q: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """`dx = p * dy + q * (x - mean) + r` in `dy`'s dtype; overwrites `xmu`."""
    layout, acc = dy.layout, xmu.dtype
    dx = np.multiply(dy.data, per_channel(np.asarray(p, acc), layout), dtype=acc)
    np.multiply(xmu, per_channel(np.asarray(q, acc), layout), out=xmu)
    dx += xmu
    dx += per_channel(np.asarray(r, acc), layout)
    return dx if dx.dtype == dy.data.dtype else dx.astype(dy.data.dtype)
