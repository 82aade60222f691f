"""Cache-sized chunks of a canonical view, processed in parallel by a small thread pool.

The NumPy backend streams each tensor from memory once and does the extra per-element passes
of a chunk (casting, shifting, squaring) while the chunk is in cache. NumPy's ufuncs and BLAS
release the GIL, so chunks run in parallel on the CPU's cores.

NumPy's ufuncs are 2-4x slower when an operand is broadcast than when all operands have the
same shape, so per-channel coefficients never broadcast inside a chunk. Two plans get there:

- **pattern** (MC, and NCS whose `C*S` fits in cache): the data is a matrix of rows (MC: `M`
  rows of `C`; NCS: `N*C` rows of `S`) and per-channel coefficients repeat every `period` rows
  (1 for MC, C for NCS). Chunks start on a period boundary, so one coefficient tile, built once
  per call, has the chunk's shape and serves every chunk.
- **slab** (NCS with large `C*S`): a chunk is one channel's `(samples, positions)` block, and
  its coefficient is a scalar.

Each chunk yields per-channel partial sums: a `(C,)` vector (pattern) or one channel's scalar
(slab); `Plan.total` adds them up in float64.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

from cupy_bn.layout import NCS, View

#: Values per chunk: a float32 chunk and its scratch copies stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 17
#: NCS inputs whose `C*S` exceeds this many values use slabs rather than pattern chunks.
PATTERN_LIMIT = CHUNK_ELEMENTS


def _worker_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, _worker_count() - 1),
                              thread_name_prefix="cupy-bn")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def run_parallel(fn, items) -> None:
    """Call `fn(index, item)` for every item, split into one contiguous share per CPU core.

    The calling thread works through the first share while pool threads take the others; one
    task per core keeps the pool's per-task cost out of the per-chunk loop.
    """
    items = list(items)
    shares = min(_worker_count(), len(items))
    bounds = [len(items) * k // max(shares, 1) for k in range(shares + 1)]

    def work(k: int) -> None:
        for i in range(bounds[k], bounds[k + 1]):
            fn(i, items[i])

    futures = [_pool().submit(work, k) for k in range(1, shares)]
    if shares:
        work(0)
    for f in futures:
        f.result()  # re-raises a worker's exception


@dataclass(frozen=True)
class Chunk:
    """Pattern: rows `r0:r1` of the matrix. Slab: channel `channel`, samples `r0:r1`,
    positions `s0:s1`."""

    r0: int
    r1: int
    channel: int = -1
    s0: int = 0
    s1: int = 0


class Plan:
    """How a view of one shape is cut into chunks, and how coefficients map onto them."""

    def __init__(self, view: View, chunk_elements: int = CHUNK_ELEMENTS):
        self.channels = c = view.num_channels
        self.layout = view.layout
        if view.layout == NCS:
            n, _, s = view.data.shape
            self.slab = c * s > PATTERN_LIMIT
            self.matrix_shape = (n * c, s)
            self.period = c
        else:
            self.slab = False
            self.matrix_shape = view.data.shape
            self.period = 1
        rows, width = self.matrix_shape
        self.chunks: list[Chunk] = []
        if self.slab:
            n, s = view.data.shape[0], view.data.shape[2]
            seg = min(s, chunk_elements)
            step = max(1, chunk_elements // s) if seg == s else 1
            for ch in range(c):
                for r0 in range(0, n, step):
                    for s0 in range(0, s, seg):
                        self.chunks.append(Chunk(r0, min(n, r0 + step), ch, s0, min(s, s0 + seg)))
            self.channel_index = np.array([k.channel for k in self.chunks], np.intp)
        else:
            period_elements = max(1, self.period * width)
            step = min(self.period * max(1, chunk_elements // period_elements), max(rows, 1))
            self.chunks = [Chunk(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
            self.chunk_rows = step

    # -- blocks ---------------------------------------------------------------------------
    def block(self, data: np.ndarray, chunk: Chunk) -> np.ndarray:
        """The chunk's 2-D block of a canonical array (a view, no copy)."""
        if self.slab:
            return data[chunk.r0 : chunk.r1, chunk.channel, chunk.s0 : chunk.s1]
        return data.reshape(self.matrix_shape)[chunk.r0 : chunk.r1]

    def coefficient(self, vector: np.ndarray, dtype: np.dtype):
        """A per-channel vector as an accessor `get(chunk)` returning what multiplies a block."""
        v = np.asarray(vector).astype(dtype)
        if self.slab:
            return lambda chunk: v[chunk.channel]
        rows, width = self.matrix_shape
        if len(self.chunks) == 1:  # one small chunk: a broadcasting view is cheaper to build
            tile = np.tile(v, rows // self.channels)[:, None] if self.layout == NCS else v[None]
            return lambda chunk: tile
        if self.layout == NCS:
            period = np.repeat(v, width).reshape(self.channels, width)
            tile = np.tile(period, (self.chunk_rows // self.channels, 1))
        else:
            tile = np.ascontiguousarray(np.broadcast_to(v, (self.chunk_rows, width)))
        return lambda chunk: tile[: chunk.r1 - chunk.r0]

    # -- partial sums ---------------------------------------------------------------------
    def partials(self, dtype: np.dtype) -> np.ndarray:
        """Storage for one partial sum per chunk: `(chunks,)` for slabs, `(chunks, C)` else."""
        if self.slab:
            return np.zeros(len(self.chunks), dtype)
        return np.zeros((len(self.chunks), self.channels), dtype)

    def channel_sums(self, block_sums: np.ndarray) -> np.ndarray:
        """Per-channel sums of a pattern chunk's per-row (NCS) or per-column (MC) sums."""
        if self.layout == NCS:
            return block_sums.reshape(-1, self.channels).sum(axis=0)
        return block_sums

    def total(self, partials: np.ndarray) -> np.ndarray:
        """Per-channel float64 totals of the chunks' partial sums."""
        p = partials.astype(np.float64)
        if self.slab:
            return np.bincount(self.channel_index, weights=p, minlength=self.channels)
        return p.sum(axis=0)
