"""The CPU loops of the numba backend, compiled by numba at first use (and cached on disk).

Each kernel is one pass per tensor over a range of the data, so that the backend can hand one
range to each core; all release the GIL while they run (`nogil`). Layouts are canonical
(`cupy_bn.layout`): `x` is `(N, C, S)` (NCS) or `(M, C)` (MC), C-contiguous, float32 or
float64; per-channel vectors have the accumulation dtype, which for these data is theirs.

- NCS kernels take a channel range `[c0, c1)`. A channel's values are `N` rows of `S`: its
  sums are taken in one pass, then (statistics) the centred squares, or (backward) `dx`, in a
  second pass that finds the channel's rows still in cache. That is PyTorch's traffic: each
  tensor read from memory once, `dx` written once.
- MC kernels take a range `[k0, k1)` of row chunks of `CHUNK_ROWS` rows. A chunk's
  per-channel sums go to its own row of a `partials` array, and the caller adds the rows in
  order (`sum(axis=...)`), so the result does not depend on how chunks were shared among
  threads. `mc_moments` and `mc_backward` are the one-range forms, for small tensors.

Numerics. Sums accumulate in float64, whatever the data's dtype. Statistics are two-pass:
the mean, then the sums of `x - mean` and `(x - mean)^2` (the first, zero up to rounding,
corrects the second: the corrected two-pass variance), exact when |mean| >> std. The gradient
sums use `x - mean` with the forward's mean. Sums are compiled with reassociation allowed
(`fastmath={"reassoc", "contract"}`), which lets LLVM vectorize them into several partial sums;
the order is fixed by the compiled code, so results are reproducible run to run on one
machine. Elementwise loops compute in float64 and round once to the output's dtype. NaN and
Inf propagate (no `nnan`/`ninf` flags), so the caller's checks see them.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Rows per chunk of an MC tensor: the unit of its partial sums.
CHUNK_ROWS = 256

_sums = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
_elementwise = numba.njit(nogil=True, cache=True, fastmath={"contract"})


# -- channels-first (N, C, S): channel ranges ---------------------------------------------
@_sums
def ncs_moments(x, c0, c1, mean, var):
    """`mean[c]` and biased `var[c]` (float64) of channels `c0 <= c < c1`, two-pass."""
    n, _, s = x.shape
    count = n * s
    for c in range(c0, c1):
        total = 0.0
        for i in range(n):
            for j in range(s):
                total += x[i, c, j]
        m = total / count
        offset = 0.0
        squares = 0.0
        for i in range(n):
            for j in range(s):
                d = x[i, c, j] - m
                offset += d
                squares += d * d
        mean[c] = m + offset / count
        var[c] = max((squares - offset * offset / count) / count, 0.0)


@_elementwise
def ncs_apply(x, scale, shift, c0, c1, y):
    """`y = x * scale[c] + shift[c]` on channels `c0 <= c < c1`."""
    n, _, s = x.shape
    for i in range(n):
        for c in range(c0, c1):
            a = np.float64(scale[c])
            b = np.float64(shift[c])
            for j in range(s):
                y[i, c, j] = x[i, c, j] * a + b


@_sums
def _ncs_channel_gradient_sums(dy, x, m, c):
    """`(sum(dy), sum(dy * (x - m)))` over channel `c`, float64."""
    n, _, s = x.shape
    g_total = 0.0
    gx_total = 0.0
    for i in range(n):
        for j in range(s):
            g = np.float64(dy[i, c, j])
            g_total += g
            gx_total += g * (x[i, c, j] - m)
    return g_total, gx_total


@_elementwise
def _ncs_channel_dx(dy, x, m, p, q, r, c, dx):
    """`dx = p * dy + q * (x - m) + r` over channel `c`."""
    n, _, s = x.shape
    for i in range(n):
        for j in range(s):
            dx[i, c, j] = p * dy[i, c, j] + q * (x[i, c, j] - m) + r


@_sums
def ncs_gradient_sums(dy, x, mean, c0, c1, sums):
    """`sums[0, c] = sum(dy)`, `sums[1, c] = sum(dy * (x - mean))` (float64) for
    `c0 <= c < c1`."""
    for c in range(c0, c1):
        sums[0, c], sums[1, c] = _ncs_channel_gradient_sums(dy, x, np.float64(mean[c]), c)


@_elementwise
def ncs_input_gradient(dy, x, mean, p, q, r, c0, c1, dx):
    """`dx = p * dy + q * (x - mean) + r` (per-channel float64 p, q, r), `c0 <= c < c1`."""
    for c in range(c0, c1):
        _ncs_channel_dx(dy, x, np.float64(mean[c]), p[c], q[c], r[c], c, dx)


@_sums
def ncs_backward(dy, x, mean, invstd, gamma, c0, c1, sums, dx):
    """The training backward of channels `c0 <= c < c1`: the gradient sums (`sums`, as
    `ncs_gradient_sums`), then `dx` from them while the channel is in cache."""
    n, _, s = x.shape
    count = n * s
    for c in range(c0, c1):
        m = np.float64(mean[c])
        g_total, gx_total = _ncs_channel_gradient_sums(dy, x, m, c)
        sums[0, c] = g_total
        sums[1, c] = gx_total
        p, q, r = dx_coefficients(invstd[c], gamma[c], g_total, gx_total, count)
        _ncs_channel_dx(dy, x, m, p, q, r, c, dx)


# -- channels-last (M, C): chunk ranges, partial sums per chunk -----------------------------
@_sums
def _mc_chunk_sums(x, k, total):
    """`total[c] = sum(x[rows of chunk k, c])`; four rows per step, so that the accumulators
    (one per channel, in memory) are loaded and stored once per four values."""
    total[:] = 0.0
    start, stop = k * CHUNK_ROWS, min(x.shape[0], (k + 1) * CHUNK_ROWS)
    quads = start + (stop - start) // 4 * 4
    for i in range(start, quads, 4):
        for c in range(x.shape[1]):
            total[c] += (np.float64(x[i, c]) + x[i + 1, c]) + (
                np.float64(x[i + 2, c]) + x[i + 3, c]
            )
    for i in range(quads, stop):
        for c in range(x.shape[1]):
            total[c] += x[i, c]


@_sums
def _mc_chunk_centred_sums(x, mean, k, offset, squares):
    """The sums of `x - mean` and `(x - mean)^2` (float64 `mean`) over chunk k's rows, two
    rows per step."""
    offset[:] = 0.0
    squares[:] = 0.0
    start, stop = k * CHUNK_ROWS, min(x.shape[0], (k + 1) * CHUNK_ROWS)
    pairs = start + (stop - start) // 2 * 2
    for i in range(start, pairs, 2):
        for c in range(x.shape[1]):
            d0 = x[i, c] - mean[c]
            d1 = x[i + 1, c] - mean[c]
            offset[c] += d0 + d1
            squares[c] += d0 * d0 + d1 * d1
    for i in range(pairs, stop):
        for c in range(x.shape[1]):
            d = x[i, c] - mean[c]
            offset[c] += d
            squares[c] += d * d


@_sums
def _mc_chunk_gradient_sums(dy, x, mean, k, g_total, gx_total):
    """The sums of `dy` and `dy * (x - mean)` (float64 `mean`) over chunk k's rows, two rows
    per step."""
    g_total[:] = 0.0
    gx_total[:] = 0.0
    start, stop = k * CHUNK_ROWS, min(x.shape[0], (k + 1) * CHUNK_ROWS)
    pairs = start + (stop - start) // 2 * 2
    for i in range(start, pairs, 2):
        for c in range(x.shape[1]):
            g0 = np.float64(dy[i, c])
            g1 = np.float64(dy[i + 1, c])
            g_total[c] += g0 + g1
            gx_total[c] += g0 * (x[i, c] - mean[c]) + g1 * (x[i + 1, c] - mean[c])
    for i in range(pairs, stop):
        for c in range(x.shape[1]):
            g = np.float64(dy[i, c])
            g_total[c] += g
            gx_total[c] += g * (x[i, c] - mean[c])


@_sums
def mc_sums(x, k0, k1, partials):
    """`partials[k]`: chunk k's sums of `x`, for chunks `k0 <= k < k1`."""
    for k in range(k0, k1):
        _mc_chunk_sums(x, k, partials[k])


@_sums
def mc_centred_sums(x, mean, k0, k1, partials):
    """`partials[0, k]` and `partials[1, k]`: chunk k's sums of `x - mean` and of
    `(x - mean)^2` (float64 `mean`), for chunks `k0 <= k < k1`."""
    for k in range(k0, k1):
        _mc_chunk_centred_sums(x, mean, k, partials[0, k], partials[1, k])


@_sums
def mc_gradient_sums(dy, x, mean, k0, k1, partials):
    """`partials[0, k]` and `partials[1, k]`: chunk k's sums of `dy` and of
    `dy * (x - mean)`, for chunks `k0 <= k < k1`."""
    mean64 = mean.astype(np.float64)
    for k in range(k0, k1):
        _mc_chunk_gradient_sums(dy, x, mean64, k, partials[0, k], partials[1, k])


@_sums
def mc_moments(x, mean, var):
    """`mean` and biased `var` (float64) of all of `x`, two-pass. The chunks' sums are added
    in chunk order, as the parallel path's `partials.sum(axis=...)` adds them."""
    m, channels = x.shape
    chunks = (m + CHUNK_ROWS - 1) // CHUNK_ROWS
    scratch = np.empty((2, channels))
    total = np.zeros(channels)
    for k in range(chunks):
        _mc_chunk_sums(x, k, scratch[0])
        total += scratch[0]
    first = total / m
    offset = np.zeros(channels)
    squares = np.zeros(channels)
    for k in range(chunks):
        _mc_chunk_centred_sums(x, first, k, scratch[0], scratch[1])
        offset += scratch[0]
        squares += scratch[1]
    offset /= m
    mean[:] = first + offset
    var[:] = np.maximum(squares / m - offset * offset, 0.0)


@_elementwise
def mc_apply(x, scale, shift, k0, k1, y):
    """`y = x * scale + shift` on the rows of chunks `k0 <= k < k1`."""
    m, channels = x.shape
    a = scale.astype(np.float64)
    b = shift.astype(np.float64)
    for i in range(k0 * CHUNK_ROWS, min(m, k1 * CHUNK_ROWS)):
        for c in range(channels):
            y[i, c] = x[i, c] * a[c] + b[c]


@_elementwise
def mc_input_gradient(dy, x, mean, p, q, r, k0, k1, dx):
    """`dx = p * dy + q * (x - mean) + r` (float64 p, q, r) on the rows of chunks
    `k0 <= k < k1`."""
    m, channels = x.shape
    mean64 = mean.astype(np.float64)
    for i in range(k0 * CHUNK_ROWS, min(m, k1 * CHUNK_ROWS)):
        for c in range(channels):
            dx[i, c] = p[c] * dy[i, c] + q[c] * (x[i, c] - mean64[c]) + r[c]


@_sums
def mc_backward(dy, x, mean, invstd, gamma, sums, dx):
    """The whole training backward of `x` in one call: `sums` (float64 `(2, C)`) added up
    chunk by chunk in order, as `mc_gradient_sums` with the caller's sum, then `dx`."""
    m, channels = x.shape
    chunks = (m + CHUNK_ROWS - 1) // CHUNK_ROWS
    mean64 = mean.astype(np.float64)
    scratch = np.empty((2, channels))
    sums[:] = 0.0
    for k in range(chunks):
        _mc_chunk_gradient_sums(dy, x, mean64, k, scratch[0], scratch[1])
        sums += scratch
    p, q, r = np.empty(channels), np.empty(channels), np.empty(channels)
    for c in range(channels):
        p[c], q[c], r[c] = dx_coefficients(invstd[c], gamma[c], sums[0, c], sums[1, c], m)
    mc_input_gradient(dy, x, mean, p, q, r, 0, chunks, dx)


# -- per-channel vectors --------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def dx_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, count):
    """float64 `(p, q, r)` of `dx = p * dy + q * (x - mean) + r` for one channel:
    `p = gamma * invstd`, `q = -p * invstd^2 * sum_dy_xmu / count`, `r = -p * sum_dy / count`
    (`cupy_bn.backends.numpy_backend.dx_coefficients`)."""
    s = np.float64(invstd)
    p = np.float64(gamma) * s
    k = -p / count
    return p, k * s * s * sum_dy_xmu, k * sum_dy


@numba.njit(nogil=True, cache=True)
def finish_statistics(
    mean64, var64, weight, bias, flags, running_mean, running_var, momentum, eps, count, out
):
    """The fused training statistics' per-channel step (`FusedTrainStatistics`).

    From float64 `mean64` and `var64`, the rows of `out` (the accumulation dtype) become
    `mean, var, invstd, scale, shift`: `invstd = 1 / sqrt(var + eps)` from the rounded `var`,
    `scale = weight * invstd` (flags bit 0: weight given; else `invstd`), `shift = bias - mean *
    scale` (bit 1: bias given; else `-mean * scale`). Each is rounded to `out`'s dtype when
    stored, before the next one reads it. With bit 2, the running statistics are then updated
    in place as `update_running` does (rounded once), if and only if every channel's mean and
    var are finite. Returns whether they all were.
    """
    channels = mean64.shape[0]
    finite = True
    for c in range(channels):
        out[0, c] = mean64[c]
        out[1, c] = var64[c]
        out[2, c] = 1.0 / math.sqrt(np.float64(out[1, c]) + eps)
        out[3, c] = out[2, c] * weight[c] if flags & 1 else out[2, c]
        out[4, c] = bias[c] - out[0, c] * out[3, c] if flags & 2 else -(out[0, c] * out[3, c])
        finite = finite and math.isfinite(out[0, c]) and math.isfinite(out[1, c])
    if flags & 4 and finite:
        keep = 1.0 - momentum
        unbiased = momentum * count / (count - 1)
        for c in range(channels):
            running_mean[c] = running_mean[c] * keep + out[0, c] * momentum
            running_var[c] = running_var[c] * keep + out[1, c] * unbiased
    return finite
