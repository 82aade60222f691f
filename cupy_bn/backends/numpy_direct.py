"""Small tensors: each primitive as a handful of whole-array NumPy calls on the calling thread.

Up to `DIRECT_MAX_ELEMENTS` values (forward primitives) or `DIRECT_BACKWARD_MAX_ELEMENTS`
(backward primitives), the NumPy backend's blocks, coefficient patterns and thread hand-offs
cost more than the work they organize, so a tensor that small is processed here in one piece.
The backward has more elementwise work per value, so the blocked path's second core pays off
at a smaller size. The formulas are those of `cupy_bn.backends.base`; what makes them exact:

- **Centred where it matters.** Statistics are first taken from the raw sums of `x` and
  `x^2`, which are exact while every channel's |mean| is within `RAW_SUMS_MAX_OFFSET` standard
  deviations (`raw_sums_are_exact`, shared with the blocked path); otherwise they are taken
  again from the sums of `x - m0` (two-pass: `mean = m0 + mean(x - m0)`,
  `var = mean((x - m0)^2) - mean(x - m0)^2`). The gradient sums always use `x - mean`.
- **Short float32 accumulators.** The per-channel sums (BLAS products with a vector of ones,
  `np.einsum`) add one channel's samples in sequence; a tensor of more than `MAX_SEQUENTIAL`
  samples is summed as rows of `k` samples, so no float32 accumulator adds more than
  `MAX_SEQUENTIAL` values in sequence.
- float16/bfloat16 data are converted to float32 once; sums, per-channel coefficients and
  outputs are computed in the accumulation dtype (float32, or float64 for float64 data), and
  outputs cast back at the end.

Every NumPy call costs about a microsecond here whatever its size, so the functions below are
written for few calls: per-channel arithmetic in place, no conversions that are not needed.

Per-channel vectors broadcast as `(C,)` for MC, and as `(C, 1)` columns or `(C, S)` patterns
for NCS (`per_channel`).
"""

from __future__ import annotations

import math

import numpy as np

from cupy_bn.layout import MC, View

#: Tensors of at most this many values take this module's path in the forward primitives
#: (`batch_stats`, `apply`), and the backward ones; crossovers measured on a 2-core Xeon
#: against the blocked, threaded path by `benchmarks/crossover.py` (benchmarks/README.md).
DIRECT_MAX_ELEMENTS = 1 << 19
DIRECT_BACKWARD_MAX_ELEMENTS = 1 << 15
#: Channels whose |mean| exceeds this many standard deviations are summed centred.
RAW_SUMS_MAX_OFFSET = 1.0
#: Rows of a channels-first tensor at least this long broadcast per-channel vectors as columns.
LONG_ROWS = 512
#: The most values a float32 accumulator of a channels-last sum adds in sequence.
MAX_SEQUENTIAL = 512


def is_small(view: View) -> bool:
    """Whether `view` takes the direct path in the forward primitives."""
    return view.data.size <= DIRECT_MAX_ELEMENTS


def is_small_backward(view: View) -> bool:
    """Whether `view` takes the direct path in the backward primitives."""
    return view.data.size <= DIRECT_BACKWARD_MAX_ELEMENTS


def per_channel(vector: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A `(C,)` vector as an operand that broadcasts against canonical `data`.

    MC: the vector itself. NCS: a `(C, 1)` column when rows are long; below `LONG_ROWS` values
    per row, the `(C, S)` pattern, so that elementwise calls run one inner loop per sample
    instead of one per row (a short broadcast inner loop costs several times more per value).
    """
    if data.ndim == 2:
        return vector
    channels, spatial = data.shape[1:]
    if spatial >= LONG_ROWS:
        return vector[:, None]
    return np.repeat(vector, spatial).reshape(channels, spatial)


def in_acc(a: np.ndarray, acc: np.dtype) -> np.ndarray:
    """`a` itself in the accumulation dtype, else a converted copy."""
    return a if a.dtype == acc else a.astype(acc)


def channel_sums(a: np.ndarray, layout: str, b: np.ndarray | None = None) -> np.ndarray:
    """Per-channel sums of `a` (or of `a * b`) over canonical data of `layout`, in a's dtype.

    Plain sums are BLAS matrix-vector products with a vector of ones (no Python-level
    wrapper, unlike `np.einsum`); sums of products are einsums. Both add the samples (rows)
    of a channel in sequence, so more than MAX_SEQUENTIAL of them are folded (`_folded_sums`).
    """
    rows = a.shape[0]
    if layout != MC:
        if rows > MAX_SEQUENTIAL:  # as channels-last data with C*S columns, then per channel
            _, channels, spatial = a.shape
            flat = [o.reshape(rows, channels * spatial) for o in (a, b) if o is not None]
            columns = _folded_sums(*flat).reshape(channels, spatial)
            return columns.sum(axis=1).astype(a.dtype)
        if b is None:
            return _ones(rows, a.dtype) @ (a @ _ones(a.shape[2], a.dtype))
        return np.einsum("ncs,ncs->c", a, b)
    if rows > MAX_SEQUENTIAL:
        return _folded_sums(a, b).astype(a.dtype)
    if b is None:
        return _ones(rows, a.dtype) @ a
    return np.einsum("ij,ij->j", a, b)


_ONES: dict[np.dtype, np.ndarray] = {}


def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of `n` ones: a view of one shared vector per dtype, grown to the next
    power of two when a longer one is asked for (so memory stays bounded by the largest)."""
    ones = _ONES.get(dtype)
    if ones is None or ones.shape[0] < n:
        ones = np.ones(1 << max(n - 1, 1).bit_length(), dtype)
        ones.flags.writeable = False
        _ONES[dtype] = ones
    return ones[:n]


def _folded_sums(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Float64 column sums of `(rows, columns)` data (of `a * b`), adding rows `k` at a time:
    the data are seen as `rows / k` rows of `k * columns` values, so that each float32
    accumulator adds at most MAX_SEQUENTIAL values in sequence."""
    operands = (a,) if b is None else (a, b)
    spec = "ij->j" if b is None else "ij,ij->j"
    rows, columns = a.shape
    k = -(-rows // MAX_SEQUENTIAL)
    full = rows // k * k
    wide = [o[:full].reshape(full // k, k * columns) for o in operands]
    total = np.einsum(spec, *wide).reshape(k, columns).sum(axis=0, dtype=np.float64)
    if full < rows:
        total += np.einsum(spec, *(o[full:] for o in operands))
    return total


def raw_sums_are_exact(mean: np.ndarray, var: np.ndarray) -> bool:
    """Whether every channel has `|mean| <= RAW_SUMS_MAX_OFFSET * sqrt(var)`, `var` finite.

    Sums of raw values lose accuracy in proportion to `sum(x^2) / sum((x - mean)^2) =
    1 + mean^2 / var`: float32 rounding in the partial sums is amplified by that factor in the
    variance (the E[x^2] - E[x]^2 cancellation); within one standard deviation it is at most 2.
    """
    spread = np.sqrt(np.maximum(var, 0.0))  # no warnings: sqrt(inf) = inf, NaN compares False
    ok = np.abs(mean) <= RAW_SUMS_MAX_OFFSET * spread
    return bool(ok.all()) and bool(spread.max() < np.inf)


def batch_stats(x: View, acc: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel `(mean, var)` in the accumulation dtype: raw sums where exact, else two-pass."""
    a, n = in_acc(x.data, acc), x.count
    mean = channel_sums(a, x.layout)
    mean *= 1.0 / n
    var = channel_sums(a, x.layout, a)  # the mean square, until the subtraction below
    var *= 1.0 / n
    if not math.isfinite(mean @ var):  # NaN or Inf in x, or squares that overflow
        return _centred_stats(a, x.layout, n)
    squared_mean = mean * mean
    var -= squared_mean
    # raw_sums_are_exact, in fewer calls: var is finite here and >= mean^2 >= 0 where exact
    limit = var if RAW_SUMS_MAX_OFFSET == 1 else RAW_SUMS_MAX_OFFSET**2 * var
    if np.logical_and.reduce(np.less_equal(squared_mean, limit)):
        return mean, var
    return _centred_stats(a, x.layout, n)


def _centred_stats(a: np.ndarray, layout: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass `(mean, var)`: a first mean, then the sums of `a - mean`."""
    with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN: reported by the caller
        mean = channel_sums(a, layout)
        mean *= 1.0 / n
        centred = a - per_channel(mean, a)
        offset = channel_sums(centred, layout)
        offset *= 1.0 / n
        var = channel_sums(centred, layout, centred)
        var *= 1.0 / n
        var -= offset * offset
        np.maximum(var, 0.0, out=var)
        mean += offset
    return mean, var


def apply(x: View, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """`x * scale + shift` in `x`'s dtype; `scale` and `shift` in the accumulation dtype (the
    result takes the wider of the two dtypes before the cast back)."""
    y = np.multiply(x.data, per_channel(scale, x.data))
    y += per_channel(shift, x.data)
    return y if y.dtype == x.data.dtype else y.astype(x.data.dtype)


def apply_activation(
    x: View, scale: np.ndarray, shift: np.ndarray, residual: View | None, relu: bool
) -> np.ndarray:
    """`act(x * scale + shift + residual)` in `x`'s dtype, summed in the accumulation dtype
    (`scale`'s) and rounded once; `act` is the ReLU when `relu`, else the identity."""
    y = np.multiply(x.data, per_channel(scale, x.data))
    y += per_channel(shift, x.data)
    if residual is not None:
        y += residual.data
    if relu:
        np.maximum(y, 0.0, out=y)
    return y if y.dtype == x.data.dtype else y.astype(x.data.dtype)


def relu_gradient(dy: View, y: View) -> np.ndarray:
    """`dy` where `y > 0`, else zero, in `dy`'s dtype (a new array)."""
    return np.where(y.data > 0, dy.data, np.zeros((), dy.data.dtype))


def centred(x: View, mean: np.ndarray, acc: np.dtype) -> np.ndarray:
    """`x - mean` in the accumulation dtype (a new array)."""
    return np.subtract(x.data, per_channel(mean, x.data), dtype=acc)


def gradient_sums(dy: View, xmu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sum(dy)` and `sum(dy * (x - mean))` from `xmu = x - mean`, in xmu's dtype."""
    g = in_acc(dy.data, xmu.dtype)
    return channel_sums(g, dy.layout), channel_sums(g, dy.layout, xmu)


def input_gradient(
    dy: View, xmu: np.ndarray, p: np.ndarray, q: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """`dx = p * dy + q * (x - mean) + r` in `dy`'s dtype; overwrites `xmu`.

    `p`, `q`, `r` in the accumulation dtype, xmu's."""
    dx = np.multiply(dy.data, per_channel(p, xmu), dtype=xmu.dtype)
    np.multiply(xmu, per_channel(q, xmu), out=xmu)
    dx += xmu
    dx += per_channel(r, xmu)
    return dx if dx.dtype == dy.data.dtype else dx.astype(dy.data.dtype)
