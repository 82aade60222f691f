"""The CPU backend: the five primitives in NumPy, one DRAM pass per tensor read or written.

Each primitive streams its tensors once, tile by tile (`tiling.py`); the extra per-element
passes of a tile (centering, squaring, casting fp16/bf16 to fp32) run in cache. Per-channel
sums go through BLAS (`tile @ ones`, `np.vecdot`), which beats `np.sum` several times over.

Statistics are exact when |mean| >> std: each tile is centred on its own mean before its
squares are summed (the corrected two-pass formula), and the tiles' (count, mean, M2) partials
are merged with Chan's formula in float64. Gradient sums use `x - mean`, never `x` alone.
"""

from __future__ import annotations

import threading
from functools import cache

import numpy as np

from cupy_bn.backends.base import Array
from cupy_bn.backends.tiling import TILE_ELEMENTS, Tile, Tiling, run_parallel
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.layout import NCS, View

_PAGE = 4096
_scratch = threading.local()


def _scratch_buffer(slot: int, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A per-thread reusable buffer (two slots) for in-cache passes over one tile."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = [np.empty(TILE_ELEMENTS * 8 + 64, np.uint8) for _ in (0, 1)]
    count = shape[0] * shape[1]
    if count * dtype.itemsize > buffers[slot].nbytes:
        buffers[slot] = np.empty(count * dtype.itemsize, np.uint8)
    return buffers[slot][: count * dtype.itemsize].view(dtype).reshape(shape)


@cache
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    return np.ones(n, dtype)


def empty_unaliased(shape: tuple[int, ...], dtype: np.dtype, *avoid: np.ndarray) -> np.ndarray:
    """An empty C-contiguous array whose address is far, modulo a page, from those of `avoid`.

    Three-operand ufuncs run 2-3x slower when input and output share a page offset (4K aliasing
    in the CPU's store forwarding), so outputs are placed half a page away from their inputs.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
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


def _as_acc(block: np.ndarray, acc: np.dtype, slot: int) -> np.ndarray:
    """The block itself when it already has the accumulation dtype, else an fp32 copy in cache."""
    if block.dtype == acc:
        return block
    buf = _scratch_buffer(slot, block.shape, acc)
    np.copyto(buf, block, casting="unsafe")
    return buf


class _Coefficients:
    """Per-channel vectors cast to the accumulation dtype and shaped to broadcast over a tile."""

    def __init__(self, tiling: Tiling, acc: np.dtype, **vectors: np.ndarray):
        self.ncs = tiling.layout == NCS
        self.vectors = {
            name: (tiling.per_row(v.astype(acc))[:, None] if self.ncs else v.astype(acc)[None, :])
            for name, v in vectors.items()
        }

    def __call__(self, name: str, tile: Tile) -> np.ndarray:
        v = self.vectors[name]
        return v[tile.r0 : tile.r1] if self.ncs else v[:, tile.c0 : tile.c1]


class NumpyBackend:
    """Batch-norm primitives on NumPy arrays (see `cupy_bn.backends.base` for the contract)."""

    name = "numpy"
    xp = np

    # -- statistics ---------------------------------------------------------------------------
    def batch_stats(self, x: View) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.data.dtype)
        channels = x.num_channels
        if x.count == 0:
            return np.zeros(channels, acc), np.zeros(channels, acc)
        tiling = Tiling(x)
        matrix = tiling.matrix(x)
        sums = np.empty(tiling.partial_shape, acc)
        m2s = np.empty(tiling.partial_shape, acc)

        def tile_stats(tile: Tile) -> None:
            block = _as_acc(matrix[tile.r0 : tile.r1, tile.c0 : tile.c1], acc, 0)
            if tiling.layout == NCS:  # one partial per row
                n = tile.c1 - tile.c0
                ones = _ones(n, acc)
                total = block @ ones
                centred = _scratch_buffer(1, block.shape, acc)
                np.subtract(block, (total / n)[:, None], out=centred)
                residual = centred @ ones
                sums[tile.r0 : tile.r1, tile.part] = total
                m2s[tile.r0 : tile.r1, tile.part] = (np.vecdot(centred, centred)
                                                     - residual * residual / n)
            else:  # one partial per channel
                n = tile.r1 - tile.r0
                ones = _ones(n, acc)
                total = ones @ block
                centred = _scratch_buffer(1, block.shape, acc)
                np.subtract(block, total / n, out=centred)
                residual = ones @ centred
                np.multiply(centred, centred, out=centred)
                sums[tile.part, tile.c0 : tile.c1] = total
                m2s[tile.part, tile.c0 : tile.c1] = ones @ centred - residual * residual / n

        run_parallel(tile_stats, tiling.tiles)
        mean, var = _merge_partials(tiling, sums, m2s, x.count)
        return mean.astype(acc), var.astype(acc)

    # -- forward apply ------------------------------------------------------------------------
    def apply(self, x: View, scale: Array, shift: Array) -> Array:
        acc = accumulation_dtype(x.data.dtype)
        out = empty_unaliased(x.data.shape, x.data.dtype, x.data)
        if x.data.size == 0:
            return out
        tiling = Tiling(x)
        src, dst = tiling.matrix(x), out.reshape(tiling.shape)
        coef = _Coefficients(tiling, acc, scale=scale, shift=shift)

        def tile_apply(tile: Tile) -> None:
            block = src[tile.r0 : tile.r1, tile.c0 : tile.c1]
            target = dst[tile.r0 : tile.r1, tile.c0 : tile.c1]
            work = target if block.dtype == acc else _scratch_buffer(0, block.shape, acc)
            np.multiply(block, coef("scale", tile), out=work)
            np.add(work, coef("shift", tile), out=target)

        run_parallel(tile_apply, tiling.tiles)
        return out

    # -- backward -----------------------------------------------------------------------------
    def backward_reduce(self, dy: View, x: View, mean: Array) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0:
            return np.zeros(x.num_channels, acc), np.zeros(x.num_channels, acc)
        tiling = Tiling(x)
        xs, dys = tiling.matrix(x), tiling.matrix(dy)
        coef = _Coefficients(tiling, acc, mean=mean)
        sum_dy = np.empty(tiling.partial_shape, acc)
        sum_dy_xmu = np.empty(tiling.partial_shape, acc)

        def tile_reduce(tile: Tile) -> None:
            rows, cols = slice(tile.r0, tile.r1), slice(tile.c0, tile.c1)
            g = _as_acc(dys[rows, cols], acc, 0)
            centred = _scratch_buffer(1, g.shape, acc)
            np.subtract(xs[rows, cols], coef("mean", tile), out=centred)
            if tiling.layout == NCS:
                sum_dy[rows, tile.part] = g @ _ones(g.shape[1], acc)
                sum_dy_xmu[rows, tile.part] = np.vecdot(g, centred)
            else:
                ones = _ones(g.shape[0], acc)
                sum_dy[tile.part, cols] = ones @ g
                np.multiply(centred, g, out=centred)
                sum_dy_xmu[tile.part, cols] = ones @ centred

        run_parallel(tile_reduce, tiling.tiles)
        return (_sum_partials(tiling, sum_dy).astype(acc),
                _sum_partials(tiling, sum_dy_xmu).astype(acc))

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
        tiling = Tiling(x)
        xs, dys, dst = tiling.matrix(x), tiling.matrix(dy), out.reshape(tiling.shape)
        coef = _Coefficients(tiling, acc, mean=mean, p=p, q=q, r=r)

        def tile_dx(tile: Tile) -> None:
            rows, cols = slice(tile.r0, tile.r1), slice(tile.c0, tile.c1)
            target = dst[rows, cols]
            centred = _scratch_buffer(1, target.shape, acc)
            np.subtract(xs[rows, cols], coef("mean", tile), out=centred)
            np.multiply(centred, coef("q", tile), out=centred)
            work = target if target.dtype == acc else _scratch_buffer(0, target.shape, acc)
            np.multiply(dys[rows, cols], coef("p", tile), out=work)
            np.add(work, centred, out=work)
            np.add(work, coef("r", tile), out=target)

        run_parallel(tile_dx, tiling.tiles)
        return out

    # -- running statistics -------------------------------------------------------------------
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


def _sum_partials(tiling: Tiling, partials: np.ndarray) -> np.ndarray:
    """Per-channel float64 totals of the per-tile partials."""
    p = partials.astype(np.float64)
    if tiling.layout == NCS:
        return p.reshape(-1, tiling.channels, p.shape[1]).sum(axis=(0, 2))
    return p.sum(axis=0)


def _merge_partials(tiling: Tiling, sums: np.ndarray, m2s: np.ndarray,
                    count: int) -> tuple[np.ndarray, np.ndarray]:
    """Chan's merge of the tiles' (count, mean, M2) into per-channel mean and biased variance."""
    counts = tiling.partial_counts
    s = sums.astype(np.float64)
    if tiling.layout == NCS:
        s = s.reshape(-1, tiling.channels, s.shape[1])
        mean = s.sum(axis=(0, 2)) / count
        deviation = s / counts - mean[None, :, None]
        m2 = (m2s.astype(np.float64).reshape(s.shape).sum(axis=(0, 2))
              + (counts * deviation * deviation).sum(axis=(0, 2)))
    else:
        mean = s.sum(axis=0) / count
        deviation = s / counts[:, None] - mean[None, :]
        m2 = m2s.astype(np.float64).sum(axis=0) + (counts[:, None] * deviation**2).sum(axis=0)
    return mean, np.maximum(m2, 0.0) / count
