"""Cache-sized blocks of a canonical view, processed in parallel by a small thread pool.

The NumPy backend's path for tensors above the direct path's sizes (`numpy_direct`): below
them, planning blocks and waking threads costs more than it saves.

The NumPy backend streams each tensor once, block by block; a block's extra per-element passes
(casting fp16/bf16 to fp32, centring, the second operand of a sum) run while it is in cache.
NumPy's ufuncs and BLAS release the GIL, so blocks run in parallel on the CPU's cores.

What the design answers to (measured on a 2-core Xeon against PyTorch's CPU kernels):

- **Few, large NumPy calls.** Every call re-acquires the GIL, and two threads issuing many
  short calls spend their time handing it over (tens of microseconds each where the waiting
  thread has to be woken). A block is about `BLOCK_ELEMENTS` values (4 MB of float32; a
  tensor under twice that is cut into one block per core, of at least `MIN_BLOCK_ELEMENTS`),
  and the work on it is two to five calls. Blocks of 1 MB, which fit a 2 MB L2 cache beside
  their scratch, were 10-25% slower on large tensors with two threads: the GIL hand-overs
  cost more than the cache misses (`benchmarks/README.md`).
- **No broadcast inner loops.** A ufunc runs 1.5-4x slower when its innermost operand is
  broadcast (a per-row scalar) than when all operands are contiguous, so per-channel
  coefficients are laid out as contiguous patterns that the blocks line up with, and the
  patterns are small enough to stay in cache beside the block.
- **No fresh memory per call.** Scratch blocks and patterns live in per-thread `workspace`
  reused from call to call; first-touch page faults cost as much as a pass.
- **Balanced shares.** Each core takes one contiguous share of the blocks, of equal size.

A block is a run of the flat data seen as a 2-D matrix `(rows, cols)`. Three kinds of plan:

- **periods**: MC, and NCS when one sample (`C*S` values) fits in a block. A period is one
  row of MC or one sample of NCS; `cols` is a whole number of periods (at least
  `MIN_COLUMNS` values), so one coefficient pattern of `cols` values, broadcast along the
  rows only, lines up with every block. Column sums see the block as rows of `sum_cols`.
- **groups**: NCS when a sample is larger than a block: a block is a balanced group of one
  sample's channels (rows of `S` values); its coefficient tile is that group's rows of the
  `(C, S)` pattern. An elementwise pass cuts narrower groups and takes up to `GROUP_SAMPLES`
  samples per block, a strided `(samples, rows, S)` view over which the tile broadcasts: as
  many calls, and tiles small enough to stay in cache.
- **segments**: NCS when one channel of one sample is larger than a block: a block is a
  balanced segment of one row and the coefficient is a scalar.

Plans for elementwise passes (`coefficients=True`) keep patterns to half a block or less;
plans for reductions, which have no patterns, use whole blocks.

Per-channel sums of a block come out as a vector for its channels `c0 : c0 + width`; rows of
`S >= ROW_SUMS_MIN` values are summed along the row (BLAS `gemv` or `einsum` with long inner
loops), other blocks down the columns, then folded to channels. `Plan.total` adds the
blocks' partial sums in float64.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from cupy_bn.intmath import ceil_div, round_up
from cupy_bn.layout import NCS, View

#: Values per block of a large tensor (4 MB of float32): few enough calls that the threads
#: rarely wait for each other's GIL (see the module docstring).
BLOCK_ELEMENTS = 1 << 20
#: The fewest values per block when a smaller tensor is cut into one block per core.
MIN_BLOCK_ELEMENTS = 1 << 18
#: Least number of columns of a periods block: ufuncs pay per row of a broadcast operand.
MIN_COLUMNS = 1 << 14
#: The most rows a periods block is summed down in sequence: a block is seen as rows of at
#: least `block_elements / MAX_SUM_ROWS` columns, so no float32 accumulator of a column sum
#: adds more values than this before the float64 total.
MAX_SUM_ROWS = 1 << 8
#: Samples per block of an elementwise pass over channel groups.
GROUP_SAMPLES = 8
#: Rows at least this long are summed along the row rather than down the columns.
ROW_SUMS_MIN = 64

#: Bytes per memory page: buffers are placed by their offset within one.
PAGE = 4096
_local = threading.local()
_tokens = itertools.count()


def workspace(slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A buffer of the calling thread for `slot`, reused from call to call.

    Fresh memory costs a page fault per page on first touch, as much as the pass itself for a
    block-sized buffer, so scratch blocks and coefficient patterns live here. Slots start at
    different offsets within a page, so that a pass reading one slot and writing another does
    not alias in the CPU's store buffer.
    """
    dtype = np.dtype(dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    nbytes = math.prod(shape) * dtype.itemsize
    buf = buffers.get(slot)
    if buf is None or nbytes > buf.nbytes:
        raw = np.empty(round_up(nbytes, PAGE) + PAGE, np.uint8)
        start = (-raw.ctypes.data + (2 * slot + 1) * PAGE // 16) % PAGE
        buf = buffers[slot] = raw[start:]
    return buf[:nbytes].view(dtype).reshape(shape)


def worker_count() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, worker_count() - 1), thread_name_prefix="cupy-bn")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def _share_bounds(sizes: list[int], shares: int) -> list[int]:
    """Indices cutting `sizes` into `shares` contiguous runs of about equal total size."""
    total, bounds, running = sum(sizes), [0], 0
    for i, size in enumerate(sizes):
        if len(bounds) < shares and running + size / 2 > total * len(bounds) / shares:
            bounds.append(i)
        running += size
    bounds += [len(sizes)] * (shares + 1 - len(bounds))
    return bounds


def run_parallel(fn, items, sizes: list[int] | None = None) -> None:
    """Call `fn(index, item)` for every item, in one contiguous share per CPU core.

    Shares have about equal total `sizes` (default: equal counts). The calling thread works
    through the first share while pool threads take the others; one task per core keeps the
    pool's per-task cost out of the per-block loop.
    """
    items = list(items)
    shares = min(worker_count(), len(items))
    if shares == 0:
        return
    bounds = _share_bounds(sizes if sizes is not None else [1] * len(items), shares)

    def work(k: int) -> None:
        for i in range(bounds[k], bounds[k + 1]):
            fn(i, items[i])

    futures = [_pool().submit(work, k) for k in range(1, shares) if bounds[k] < bounds[k + 1]]
    work(0)
    for f in futures:
        f.result()  # re-raises a worker's exception


@dataclass(frozen=True)
class Block:
    """`flat[start : start + rows * cols]` seen as `(rows, cols)`, channels from `c0` on.

    A groups block of an elementwise plan may span `samples > 1` consecutive samples: it is
    then the strided `(samples, rows, cols)` view starting at `start`.
    """

    start: int
    rows: int
    cols: int
    c0: int
    samples: int = 1

    @property
    def size(self) -> int:
        return self.samples * self.rows * self.cols


class Plan:
    """How a view of one shape is cut into blocks, and how per-channel vectors map onto them."""

    def __init__(
        self,
        layout: str,
        shape: tuple[int, ...],
        block_elements: int = BLOCK_ELEMENTS,
        coefficients: bool = False,
    ):
        """A plan for canonical data of `layout` and `shape` ((N, C, S) or (M, C)).

        `coefficients`: the pass multiplies by per-channel patterns, which must share the
        cache with the block: a periods pattern may then fill at most half a block, and a
        group's tile a block's share of one of up to `GROUP_SAMPLES` samples.
        """
        self.channels = c = shape[1]
        s = shape[2] if layout == NCS else 1
        self.samples = n = shape[0]
        self.spatial = s
        self.period = period = c * s
        self.blocks: list[Block] = []
        if period <= (block_elements // 2 if coefficients else block_elements):
            self.kind, self.width = "periods", c
            # periods per row of a column sum, then per row of a block
            per_sum_row = ceil_div(ceil_div(block_elements, MAX_SUM_ROWS), period)
            per_row = per_sum_row * ceil_div(MIN_COLUMNS, per_sum_row * period)
            self.cols, self.sum_cols = per_row * period, per_sum_row * period
            rows = max(1, block_elements // self.cols)
            full_rows, tail = divmod(n, per_row)
            for r0 in range(0, full_rows, rows):
                r1 = min(full_rows, r0 + rows)
                self.blocks.append(Block(r0 * self.cols, r1 - r0, self.cols, 0))
            if tail:
                self.blocks.append(Block(full_rows * self.cols, 1, tail * period, 0))
        elif s <= block_elements:
            self.kind = "groups"
            # an elementwise pass takes up to GROUP_SAMPLES samples of a narrower group per
            # call: as many calls, smaller tiles
            step = min(n, GROUP_SAMPLES) if coefficients else 1
            groups = ceil_div(period * step, block_elements)
            self.width = ceil_div(c, groups)
            step = max(1, block_elements // (self.width * s)) if coefficients else 1
            for c0 in range(0, c, self.width):  # group by group, so a group's tile is reused
                rows = min(self.width, c - c0)
                self.blocks.extend(
                    Block((i * c + c0) * s, rows, s, c0, min(step, n - i))
                    for i in range(0, n, step)
                )
        else:
            self.kind, self.width = "segments", 1
            pieces = ceil_div(s, block_elements)
            bounds = [s * k // pieces for k in range(pieces + 1)]
            for ch in range(c):
                for i in range(n):
                    row = (i * c + ch) * s
                    self.blocks.extend(
                        Block(row + s0, 1, s1 - s0, ch)
                        for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True)
                    )
        self.sizes = [b.size for b in self.blocks]
        self._row_sums = self.kind != "periods" or s >= ROW_SUMS_MIN

    def run(self, fn) -> None:
        """`fn(index, block)` for every block, in parallel (see `run_parallel`)."""
        run_parallel(fn, self.blocks, self.sizes)

    # -- blocks ---------------------------------------------------------------------------
    def block(self, data: np.ndarray, block: Block) -> np.ndarray:
        """The block's view of a C-contiguous canonical array (no copy)."""
        if block.samples > 1:
            n0, c0 = divmod(block.start // self.spatial, self.channels)
            return data.reshape(self.samples, self.channels, self.spatial)[
                n0 : n0 + block.samples, c0 : c0 + block.rows
            ]
        return data.reshape(-1)[block.start : block.start + block.size].reshape(
            block.rows, block.cols
        )

    def coefficients(self, dtype: np.dtype, *vectors: np.ndarray) -> list:
        """Per-channel vectors as accessors `get(block)` for operands of the blocks.

        periods: one pattern of `cols` values, shared by all blocks; groups: each thread lays
        out its group's rows of the `(C, S)` pattern when its blocks reach a new group (they
        go group by group), or a broadcast column for fewer than 4 samples; segments: a
        scalar. Patterns live in reused workspace, one slot per vector (slots 2, 3, ...).
        """
        return [self._coefficient(v, dtype, 2 + k) for k, v in enumerate(vectors)]

    def _coefficient(self, vector: np.ndarray, dtype: np.dtype, slot: int):
        v = np.asarray(vector).astype(dtype)
        if self.kind == "segments":
            return lambda block: v[block.c0]
        if self.kind == "groups":
            if self.samples < 4:  # laying out tiles would cost a quarter of the data or more
                column = v[:, None]
                return lambda block: column[block.c0 : block.c0 + block.rows]
            return _GroupTile(v, self.spatial, slot)
        pattern = workspace(slot, (self.cols // self.period, self.channels, self.spatial), dtype)
        pattern[...] = v[:, None]
        flat = pattern.reshape(1, self.cols)
        return lambda block: flat[:, : block.cols]

    # -- per-channel sums of a block ------------------------------------------------------
    def sums(self, a: np.ndarray) -> np.ndarray:
        """Per-channel sums of block `a` (2-D, accumulation dtype) for channels from c0 on."""
        if self._row_sums:
            rows = self._row_view(a)
            return self._fold_rows(np.dot(rows, _ones(rows.shape[1], a.dtype)))
        a = self._column_view(a)
        return self._fold_columns(np.dot(_ones(a.shape[0], a.dtype), a))

    def dot_sums(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-channel sums of `a * b` over a block (same shape and dtype)."""
        if self._row_sums:
            rows_a, rows_b = self._row_view(a), self._row_view(b)
            return self._fold_rows(np.einsum("ij,ij->i", rows_a, rows_b))
        a, b = self._column_view(a), self._column_view(b)
        return self._fold_columns(np.einsum("ij,ij->j", a, b))

    def _row_view(self, a: np.ndarray) -> np.ndarray:
        """A block as rows of one channel each (a periods block holds several per row)."""
        return a.reshape(-1, self.spatial) if self.kind == "periods" else a

    def _column_view(self, a: np.ndarray) -> np.ndarray:
        """A periods block as rows of `sum_cols` values (a tail block stays one row)."""
        return a.reshape(-1, self.sum_cols) if a.shape[1] % self.sum_cols == 0 else a

    def _fold_rows(self, per_row: np.ndarray) -> np.ndarray:
        if self.kind != "periods" or per_row.size == self.channels:
            return per_row
        return per_row.reshape(-1, self.channels).sum(axis=0)

    def _fold_columns(self, per_column: np.ndarray) -> np.ndarray:
        if per_column.size == self.channels:
            return per_column
        return per_column.reshape(-1, self.channels, self.spatial).sum(axis=(0, 2))

    # -- partial sums ---------------------------------------------------------------------
    def partials(self, dtype: np.dtype, sums: int = 1) -> np.ndarray:
        """Storage for `sums` kinds of partial sums: `[k, i]` holds block i's channels from c0."""
        return np.zeros((sums, len(self.blocks), self.width), dtype)

    def total(self, partials: np.ndarray) -> np.ndarray:
        """Per-channel float64 totals `(sums, C)` of the blocks' partial sums."""
        p = partials.astype(np.float64)
        if self.width == self.channels:
            return p.sum(axis=1)
        first = np.array([b.c0 for b in self.blocks], np.intp)
        index = np.minimum(first[:, None] + np.arange(self.width), self.channels - 1).ravel()
        return np.stack([np.bincount(index, weights=k.ravel(), minlength=self.channels) for k in p])


def block_elements(size: int) -> int:
    """Values per block for a tensor of `size` values: BLOCK_ELEMENTS, or fewer (down to
    MIN_BLOCK_ELEMENTS) so that every core has a block to work on."""
    return min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, ceil_div(size, worker_count())))


@lru_cache(maxsize=64)
def _cached_plan(layout: str, shape: tuple[int, ...], coefficients: bool) -> Plan:
    return Plan(layout, shape, block_elements(math.prod(shape)), coefficients)


def plan_for(view: View, coefficients: bool = False) -> Plan:
    """The (cached) plan for a view's layout and shape; see `Plan`."""
    return _cached_plan(view.layout, tuple(view.data.shape), coefficients)


class _GroupTile:
    """Rows `c0 : c0 + rows` of a `(C, S)` coefficient pattern, laid out per thread on demand."""

    def __init__(self, v: np.ndarray, spatial: int, slot: int):
        self.v, self.spatial, self.slot = v, spatial, slot
        self.token = next(_tokens)  # tells this call's tiles from those of earlier calls

    def __call__(self, block: Block) -> np.ndarray:
        held = getattr(_local, "tiles", None)
        if held is None:
            held = _local.tiles = {}
        key = (self.token, block.c0, block.rows)
        cached = held.get(self.slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        tile = workspace(self.slot, (block.rows, self.spatial), self.v.dtype)
        tile[...] = self.v[block.c0 : block.c0 + block.rows, None]
        held[self.slot] = (key, tile)
        return tile


@cache
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    return np.ones(n, dtype)


def store(partials: np.ndarray, i: int, *values: np.ndarray) -> None:
    """Block i's partial sums, one vector per kind (a narrower last group fills the start)."""
    for k, v in enumerate(values):
        partials[k, i, : v.shape[0]] = v
