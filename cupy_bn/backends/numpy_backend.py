"""The CPU backend: the five primitives in NumPy, one memory pass per tensor read or written.

Every primitive streams its tensors once, chunk by chunk (`tiling.py`); a chunk's extra
per-element passes (casting fp16/bf16 to fp32, shifting, squaring) run while it is in cache.
Per-channel sums go through BLAS (`np.dot(block, ones)`, `np.vecdot`), several times faster than
`np.sum`, and chunks' partial sums are added in float64.

Statistics are exact when |mean| >> std: the sums are taken of `x - K`, with a per-channel
shift K (the mean of a leading sample of the batch) close to the channel's mean, so
`M2 = sum((x-K)^2) - n*(mean-K)^2` does not cancel. When K turns out to be more than four
standard deviations from the mean (data sorted along the batch, say), the pass is repeated
with K = the mean just found. Gradient sums use `x - mean`, never `x` alone.
"""

from __future__ import annotations

import math
import threading
from functools import cache

import numpy as np

from cupy_bn.backends.base import Array
from cupy_bn.backends.tiling import CHUNK_ELEMENTS, Plan, run_parallel
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.layout import NCS, View

_PAGE = 4096
_scratch = threading.local()


def _scratch_buffer(slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable buffer (two slots) for a chunk's in-cache passes."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > buffers[slot].nbytes:
        # slots sit half a page apart so that passes reading one and writing the other
        # do not alias in the store buffer
        raw = np.empty(max(nbytes, CHUNK_ELEMENTS * 8) + _PAGE, np.uint8)
        start = (-raw.ctypes.data + (2 * slot + 1) * _PAGE // 4) % _PAGE
        buffers[slot] = raw[start:]
    return buffers[slot][:nbytes].view(dtype).reshape(shape)


@cache
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    return np.ones(n, dtype)


def empty_unaliased(shape: tuple[int, ...], dtype: np.dtype, *avoid: np.ndarray) -> np.ndarray:
    """An empty C-contiguous array whose address is far, modulo a page, from those of `avoid`.

    Three-operand ufuncs run 2-3x slower when input and output share a page offset (4K aliasing
    in the CPU's store forwarding), so outputs are placed away from their inputs.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < CHUNK_ELEMENTS * 4:  # one chunk or less: aliasing costs less than the search
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + _PAGE, np.uint8)
    base = raw.ctypes.data
    taken = [a.ctypes.data % _PAGE for a in avoid]
    best, best_gap = 0, -1
    for offset in range(0, _PAGE, 256):
        where = (base + offset) % _PAGE
        gap = min((min((where - t) % _PAGE, (t - where) % _PAGE) for t in taken), default=_PAGE)
        if gap > best_gap:
            best, best_gap = offset, gap
    return raw[best : best + nbytes].view(dtype).reshape(shape)


def _in_acc(block: np.ndarray, acc: np.dtype, slot: int) -> np.ndarray:
    """The block itself when it has the accumulation dtype, else an fp32 copy in cache."""
    if block.dtype == acc:
        return block
    buf = _scratch_buffer(slot, block.shape, acc)
    np.copyto(buf, block, casting="unsafe")
    return buf


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products (`np.dot` for a single row: it releases the GIL, vecdot not)."""
    if a.shape[0] == 1:
        return np.dot(a[0], b[0]).reshape(1)
    return np.vecdot(a, b)


def _store(partials: np.ndarray, i: int, values: np.ndarray) -> None:
    partials[i, : values.shape[0]] = values


def leading_mean(x: View) -> np.ndarray:
    """Per-channel float64 mean of a leading sample of about one chunk of the batch."""
    c = x.num_channels
    if x.layout == NCS:
        n, _, s = x.data.shape
        piece = x.data[: min(n, max(1, CHUNK_ELEMENTS // (c * s))), :, : max(1, CHUNK_ELEMENTS
                                                                               // c)]
        return piece.astype(np.float64).mean(axis=(0, 2))
    return x.data[: max(1, CHUNK_ELEMENTS // c)].astype(np.float64).mean(axis=0)


class NumpyBackend:
    """Batch-norm primitives on NumPy arrays (see `cupy_bn.backends.base` for the contract)."""

    name = "numpy"
    xp = np

    # -- statistics -----------------------------------------------------------------------
    def batch_stats(self, x: View) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0:
            return np.zeros(x.num_channels, acc), np.zeros(x.num_channels, acc)
        plan = Plan(x)
        mean, var, offset = self._shifted_stats(x, plan, acc, leading_mean(x))
        if np.any(offset * offset > 16 * var):  # the shift was far from the mean: re-centre
            mean, var, _ = self._shifted_stats(x, plan, acc, mean)
        return mean.astype(acc), var.astype(acc)

    @staticmethod
    def _shifted_stats(x: View, plan: Plan, acc: np.dtype, shift: np.ndarray):
        """Mean, biased variance and `mean - shift` from the sums of `x - shift`."""
        shift = shift.astype(acc)
        k = plan.coefficient(shift, acc)
        s1, s2 = plan.partials(acc), plan.partials(acc)

        def chunk_sums(i, chunk) -> None:
            block = plan.block(x.data, chunk)
            centred = _scratch_buffer(0, block.shape, acc)
            with np.errstate(invalid="ignore"):  # Inf - Inf: reported by the caller's check
                np.subtract(block, k(chunk), out=centred)
            if plan.ncs:  # per-row sums, folded to the chunk's channels
                rows = _ones(centred.shape[1], acc)
                _store(s1, i, plan.channel_sums(chunk, np.dot(centred, rows)))
                _store(s2, i, plan.channel_sums(chunk, _row_dots(centred, centred)))
            else:
                ones = _ones(centred.shape[0], acc)
                s1[i] = np.dot(ones, centred)
                np.multiply(centred, centred, out=centred)
                s2[i] = np.dot(ones, centred)

        run_parallel(chunk_sums, plan.chunks)
        n = x.count
        offset = plan.total(s1) / n
        m2 = plan.total(s2) - n * offset * offset
        return shift.astype(np.float64) + offset, np.maximum(m2, 0.0) / n, offset

    # -- forward apply --------------------------------------------------------------------
    def apply(self, x: View, scale: Array, shift: Array) -> Array:
        acc = accumulation_dtype(x.data.dtype)
        out = empty_unaliased(x.data.shape, x.data.dtype, x.data)
        if x.data.size == 0:
            return out
        plan = Plan(x)
        sc, sh = plan.coefficient(scale, acc), plan.coefficient(shift, acc)

        def chunk_apply(i, chunk) -> None:
            block, target = plan.block(x.data, chunk), plan.block(out, chunk)
            work = target if block.dtype == acc else _scratch_buffer(0, block.shape, acc)
            np.multiply(block, sc(chunk), out=work)
            np.add(work, sh(chunk), out=target)

        run_parallel(chunk_apply, plan.chunks)
        return out

    # -- backward -------------------------------------------------------------------------
    def backward_reduce(self, dy: View, x: View, mean: Array) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0:
            return np.zeros(x.num_channels, acc), np.zeros(x.num_channels, acc)
        plan = Plan(x)
        mu = plan.coefficient(mean, acc)
        sum_dy, sum_dy_xmu = plan.partials(acc), plan.partials(acc)

        def chunk_reduce(i, chunk) -> None:
            g = _in_acc(plan.block(dy.data, chunk), acc, 0)
            centred = _scratch_buffer(1, g.shape, acc)
            np.subtract(plan.block(x.data, chunk), mu(chunk), out=centred)
            if plan.ncs:
                _store(sum_dy, i, plan.channel_sums(chunk, np.dot(g, _ones(g.shape[1], acc))))
                _store(sum_dy_xmu, i, plan.channel_sums(chunk, _row_dots(g, centred)))
            else:
                ones = _ones(g.shape[0], acc)
                sum_dy[i] = np.dot(ones, g)
                np.multiply(centred, g, out=centred)
                sum_dy_xmu[i] = np.dot(ones, centred)

        run_parallel(chunk_reduce, plan.chunks)
        return plan.total(sum_dy).astype(acc), plan.total(sum_dy_xmu).astype(acc)

    def backward_apply(self, dy: View, x: View, mean: Array, invstd: Array, gamma: Array,
                       sum_dy: Array, sum_dy_xmu: Array, count: int) -> Array:
        """`dx = p * dy + q * (x - mean) + r`, with per-channel p, q, r computed in float64."""
        acc = accumulation_dtype(dy.data.dtype)
        out = empty_unaliased(dy.data.shape, dy.data.dtype, dy.data, x.data)
        if dy.data.size == 0:
            return out
        invstd64 = np.asarray(invstd, np.float64)
        p = np.asarray(gamma, np.float64) * invstd64
        q = -p * invstd64 * invstd64 * np.asarray(sum_dy_xmu, np.float64) / count
        r = -p * np.asarray(sum_dy, np.float64) / count
        plan = Plan(x)
        mu, pc, qc, rc = (plan.coefficient(v, acc) for v in (mean, p, q, r))

        def chunk_dx(i, chunk) -> None:
            target = plan.block(out, chunk)
            centred = _scratch_buffer(1, target.shape, acc)
            np.subtract(plan.block(x.data, chunk), mu(chunk), out=centred)
            np.multiply(centred, qc(chunk), out=centred)
            work = target if target.dtype == acc else _scratch_buffer(0, target.shape, acc)
            np.multiply(plan.block(dy.data, chunk), pc(chunk), out=work)
            np.add(work, centred, out=work)
            np.add(work, rc(chunk), out=target)

        run_parallel(chunk_dx, plan.chunks)
        return out

    # -- running statistics ---------------------------------------------------------------
    def update_running(self, running_mean: Array, running_var: Array, mean: Array, var: Array,
                       count: int, momentum: float) -> None:
        unbiased = np.asarray(var, np.float64) * (count / (count - 1))
        running_mean[...] = ((1.0 - momentum) * running_mean.astype(np.float64)
                             + momentum * np.asarray(mean, np.float64))
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased

    def traffic(self, phase: str, numel: int, itemsize: int) -> int:
        """Stats R1 + apply R1 W1; reduce R2 + apply R2 W1; eval apply R1 W1."""
        passes = {"forward_train": 3, "backward": 5, "eval": 2}[phase]
        return passes * numel * itemsize
