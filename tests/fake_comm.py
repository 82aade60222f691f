"""In-process stand-ins for a communicator: `size` fake processes as threads.

`run_group(size, fn)` calls `fn(comm)` in one thread per fake process, each `comm` a
`cupy_bn.communicators.Communicator` whose all-reduce sums the buffers of all threads in rank
order (the same bits everywhere, like NCCL and MPI). A thread that never reaches a collective
the others are in makes them fail with `BrokenBarrierError` after `timeout` seconds instead of
hanging. `Counting` wraps any communicator and counts its all-reduces.
"""

from __future__ import annotations

import threading

import numpy as np


class _Group:
    def __init__(self, size: int, timeout: float):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[np.ndarray | None] = [None] * size


class ThreadComm:
    """One fake process of a thread group."""

    def __init__(self, group: _Group, rank: int):
        self._group = group
        self.rank = rank
        self.size = group.size

    def allreduce_sum(self, buffer):
        g = self._group
        g.slots[self.rank] = np.array(buffer, np.float64, copy=True)
        g.barrier.wait()
        lengths = {len(s) for s in g.slots}
        total = None
        if len(lengths) == 1:
            total = np.zeros_like(g.slots[0])
            for s in g.slots:
                total += s
        g.barrier.wait()
        if total is None:
            raise ValueError(f"all-reduce buffers of different lengths: {sorted(lengths)}")
        buffer[...] = total
        return buffer


class Counting:
    """A communicator that counts the all-reduces it forwards to `inner`."""

    def __init__(self, inner):
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.calls = 0

    def allreduce_sum(self, buffer):
        self.calls += 1
        return self.inner.allreduce_sum(buffer)


def run_group(size: int, fn, timeout: float = 20.0) -> list:
    """Run `fn(comm)` on `size` fake processes; return their results, re-raising the first
    exception (with its rank) if any thread raised."""
    group = _Group(size, timeout)
    results: list = [None] * size
    errors: list = [None] * size

    def work(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as exc:  # reported to the caller below
            errors[rank] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank, exc in enumerate(errors):
        if exc is not None:
            raise AssertionError(f"fake process {rank} of {size} raised {exc!r}") from exc
    return results
