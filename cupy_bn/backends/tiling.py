"""Cache-sized tiles of a canonical view, processed by a small thread pool.

The NumPy backend streams each tensor through memory once and does its per-element passes on
tiles of about `TILE_ELEMENTS` values, which stay in cache between passes. NumPy's ufuncs and
BLAS release the GIL, so tiles run in parallel on the CPU's cores.

A tile is a 2-D block of the canonical data:
- NCS `(N, C, S)` is seen as rows `(N*C, S)`; a tile is a run of whole rows (or a segment of
  one row when S is huge), and reductions run along the rows (one partial per row).
- MC `(M, C)`: a tile is a run of rows (and a range of columns when C is huge); reductions run
  down the columns (one partial per channel).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

from cupy_bn.layout import NCS, View

TILE_ELEMENTS = 1 << 17


def _worker_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, _worker_count() - 1),
                              thread_name_prefix="cupy-bn")


def run_parallel(fn, items) -> None:
    """Call `fn(item)` for every item, split into one contiguous share per CPU core.

    The calling thread works through the first share while pool threads take the others; one
    task per core keeps the pool's per-task cost out of the per-tile loop.
    """
    items = list(items)
    shares = min(_worker_count(), len(items))
    if shares <= 1:
        for item in items:
            fn(item)
        return
    bounds = [len(items) * k // shares for k in range(shares + 1)]

    def work(k: int) -> None:
        for item in items[bounds[k] : bounds[k + 1]]:
            fn(item)

    futures = [_pool().submit(work, k) for k in range(1, shares)]
    work(0)
    for f in futures:
        f.result()  # re-raises a worker's exception


@dataclass(frozen=True)
class Tile:
    """Rows `r0:r1` and columns `c0:c1` of the 2-D matrix; `part` indexes the partial slot."""

    r0: int
    r1: int
    c0: int
    c1: int
    part: int


class Tiling:
    """Tiles of a view's 2-D matrix, and the shapes of per-tile partial reductions.

    Partials are stored in an array of shape `partial_shape`: NCS `(N*C, segments)`, one per row
    and column segment; MC `(row_blocks, C)`, one per row block and channel.
    """

    def __init__(self, view: View, tile_elements: int = TILE_ELEMENTS):
        self.layout = view.layout
        self.channels = view.num_channels
        if view.layout == NCS:
            n, c, s = view.data.shape
            rows, cols = n * c, s
        else:
            rows, cols = view.data.shape
        self.shape = (rows, cols)
        self.tiles: list[Tile] = []
        if view.layout == NCS:
            seg = min(cols, tile_elements) or 1
            nseg = -(-cols // seg)
            step = max(1, tile_elements // max(cols, 1)) if nseg == 1 else 1
            for r0 in range(0, rows, step):
                for j in range(nseg):
                    self.tiles.append(Tile(r0, min(rows, r0 + step), j * seg,
                                           min(cols, (j + 1) * seg), j))
            self.partial_shape = (rows, nseg)
            self.partial_counts = np.array([t.c1 - t.c0 for t in self.tiles[:nseg]], np.float64)
        else:
            width = min(cols, tile_elements) or 1
            step = max(1, tile_elements // width)
            blocks = -(-rows // step)
            for b in range(blocks):
                r0 = b * step
                for c0 in range(0, cols, width):
                    self.tiles.append(Tile(r0, min(rows, r0 + step), c0, min(cols, c0 + width), b))
            self.partial_shape = (blocks, cols)
            self.partial_counts = np.array([min(rows, (b + 1) * step) - b * step
                                            for b in range(blocks)], np.float64)

    def matrix(self, view: View) -> np.ndarray:
        """The view's data as the 2-D matrix the tiles index."""
        return view.data.reshape(self.shape)

    def per_row(self, vector: np.ndarray) -> np.ndarray:
        """NCS only: a per-channel vector repeated for every row of the `(N*C, S)` matrix."""
        return np.tile(vector, self.shape[0] // self.channels)
