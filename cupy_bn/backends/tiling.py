"""Cache-sized chunks of a canonical view, processed in parallel by a small thread pool.

The NumPy backend streams each tensor from memory once and does the extra per-element passes
of a chunk (casting, shifting, squaring) while the chunk is in cache. NumPy's ufuncs and BLAS
release the GIL, so chunks run in parallel on the CPU's cores.

Every chunk is a contiguous block `matrix[r0:r1, s0:s1]` of the data seen as a matrix (MC:
`M` rows of `C`; NCS: `N*C` rows of `S`). NumPy's ufuncs are 2-4x slower when an operand is
broadcast than when all operands have the same shape, so per-channel coefficients come as
tiles of the block's shape, built once per call and shared by the chunks:

- **MC**: chunks are runs of whole rows; every row has the same coefficients.
- **NCS, small `C*S`**: chunks are runs of whole samples (multiples of C rows); the tile
  repeats the `(C, S)` pattern of one sample.
- **NCS, larger `C*S`**: a chunk is one sample's run of channels `c0:c1`; the tile is rows
  `c0:c1` of the pattern. Chunks go channel group by channel group, so a group's tile stays in
  cache while the samples stream past.
- **NCS, huge `S`**: a chunk is a segment of one row (one sample, one channel) and the
  coefficient is a scalar.

Each chunk yields partial sums for its channels `c0:c0+width`; `Plan.total` adds them up in
float64.
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
    """Block `matrix[r0:r1, s0:s1]`, holding channels from `c0` on (see the module docstring)."""

    r0: int
    r1: int
    s0: int
    s1: int
    c0: int


class Plan:
    """How a view of one shape is cut into chunks, and how coefficients map onto them."""

    def __init__(self, view: View, chunk_elements: int = CHUNK_ELEMENTS):
        self.channels = c = view.num_channels
        self.ncs = view.layout == NCS
        if self.ncs:
            n, _, s = view.data.shape
            self.matrix_shape = (n * c, s)
        else:
            self.matrix_shape = view.data.shape
        rows, s = self.matrix_shape
        self.scalar = self.ncs and 2 * s > chunk_elements
        self.chunks: list[Chunk] = []
        if self.scalar:  # segments of single rows
            for ch in range(c):
                for r in range(ch, rows, c):
                    for s0 in range(0, s, chunk_elements):
                        self.chunks.append(Chunk(r, r + 1, s0, min(s, s0 + chunk_elements), ch))
            self.chunk_rows, self.width = 1, 1
        elif self.ncs and c * s > chunk_elements:  # channel groups of one sample
            group = chunk_elements // s
            for c0 in range(0, c, group):
                for r in range(c0, rows, c):
                    self.chunks.append(Chunk(r, r + min(group, c - c0), 0, s, c0))
            self.chunk_rows, self.width = group, group
        else:  # runs of whole samples (NCS) or rows (MC)
            period = c if self.ncs else 1
            step = period * max(1, chunk_elements // max(1, period * s))
            step = min(step, max(rows, period))
            self.chunks = [Chunk(r0, min(rows, r0 + step), 0, s, 0)
                           for r0 in range(0, rows, step)]
            self.chunk_rows, self.width = step, c

    # -- blocks ---------------------------------------------------------------------------
    def block(self, data: np.ndarray, chunk: Chunk) -> np.ndarray:
        """The chunk's contiguous 2-D block of a canonical array (a view, no copy)."""
        return data.reshape(self.matrix_shape)[chunk.r0 : chunk.r1, chunk.s0 : chunk.s1]

    def coefficient(self, vector: np.ndarray, dtype: np.dtype):
        """A per-channel vector as an accessor `get(chunk)` returning what multiplies a block."""
        v = np.asarray(vector).astype(dtype)
        if self.scalar:
            return lambda chunk: v[chunk.c0]
        rows, width = self.matrix_shape
        if len(self.chunks) == 1:  # one small chunk: a broadcasting view is cheaper to build
            tile = np.tile(v, rows // self.channels)[:, None] if self.ncs else v[None]
            return lambda chunk: tile
        if self.ncs:
            pattern = np.repeat(v, width).reshape(self.channels, width)
            tile = np.tile(pattern, (max(1, self.chunk_rows // self.channels), 1))
            return lambda chunk: tile[chunk.c0 : chunk.c0 + chunk.r1 - chunk.r0]
        tile = np.ascontiguousarray(np.broadcast_to(v, (self.chunk_rows, width)))
        return lambda chunk: tile[: chunk.r1 - chunk.r0]

    # -- partial sums ---------------------------------------------------------------------
    def partials(self, dtype: np.dtype) -> np.ndarray:
        """Storage for the chunks' partial sums: row i holds chunk i's channels from c0 on."""
        return np.zeros((len(self.chunks), self.width), dtype)

    def channel_sums(self, chunk: Chunk, sums: np.ndarray) -> np.ndarray:
        """A chunk's per-channel sums from its per-row (NCS) or per-column (MC) sums."""
        if self.ncs:
            rows = chunk.r1 - chunk.r0
            return sums.reshape(-1, min(rows, self.channels)).sum(axis=0)
        return sums

    def total(self, partials: np.ndarray) -> np.ndarray:
        """Per-channel float64 totals of the chunks' partial sums."""
        p = partials.astype(np.float64)
        if self.width == self.channels:
            return p.sum(axis=0)
        first = np.array([k.c0 for k in self.chunks], np.intp)
        index = np.minimum(first[:, None] + np.arange(self.width), self.channels - 1)
        return np.bincount(index.ravel(), weights=p.ravel(), minlength=self.channels)
