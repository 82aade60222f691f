"""One small interface over existing collective engines: an all-reduce sum of one buffer.

Sync batch norm needs exactly one operation from an engine: the element-wise sum, over all
processes, of a 1-D float64 buffer of a few per-channel vectors. `Communicator` names it;
`as_communicator` wraps what users already have:

- an mpi4py communicator (`MPI.COMM_WORLD`, or a `Split` of it): NumPy buffers go straight to
  `Allreduce`; CuPy buffers go through host memory, or straight from the GPU when the MPI library
  is CUDA-aware (Open MPI's `MPIX_Query_cuda_support`, or `cuda_aware=True`);
- a NCCL communicator from CuPy (`cupy.cuda.nccl.NcclCommunicator`): CuPy buffers, reduced on
  the current stream;
- a `cupyx.distributed` backend (`cupyx.distributed.init_process_group(...)`).

Anything with `rank`, `size` and `allreduce_sum(buffer) -> buffer` is a communicator already.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from typing import Any, Protocol, runtime_checkable

from cupy_bn.arrays import is_cupy, to_host

Array = Any

__all__ = [
    "Communicator",
    "CupyxCommunicator",
    "MPICommunicator",
    "NCCLCommunicator",
    "as_communicator",
    "mpi_cuda_aware",
]


@runtime_checkable
class Communicator(Protocol):
    """An all-reduce sum over `size` processes; this process is number `rank`."""

    rank: int
    size: int

    def allreduce_sum(self, buffer: Array) -> Array:
        """Element-wise sum of a 1-D float64 `buffer` (NumPy or CuPy) over all processes.

        Returns an array of the same module and shape holding the sum (it may be `buffer`
        itself, overwritten). Every process must call it with a buffer of the same length.
        """


def _on_gpu(buffer: Array) -> tuple[Array, bool]:
    """`buffer` as a contiguous float64 CuPy array (itself when it is one), and whether it was
    in host memory (a NumPy buffer: the engines reduce on the GPU only)."""
    import cupy

    return cupy.ascontiguousarray(cupy.asarray(buffer, dtype=cupy.float64)), not is_cupy(buffer)


@cache
def mpi_cuda_aware() -> bool:
    """Whether the MPI library mpi4py loaded takes GPU buffers (Open MPI's own query).

    Looks up `MPIX_Query_cuda_support` in the loaded libmpi (Linux); False where the library
    or the query is missing. MPI must be initialized (importing `mpi4py.MPI` does that).
    """
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi." in line}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return False


class MPICommunicator:
    """An mpi4py communicator behind the `Communicator` interface.

    cuda_aware: hand CuPy buffers to MPI directly (True), stage them through host memory
    (False), or ask the MPI library (None, the default).
    """

    def __init__(self, comm: Any, cuda_aware: bool | None = None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())
        self.cuda_aware = mpi_cuda_aware() if cuda_aware is None else bool(cuda_aware)

    def allreduce_sum(self, buffer: Array) -> Array:
        if not is_cupy(buffer):
            self.comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)
            return buffer
        import cupy

        if self.cuda_aware:
            cupy.cuda.get_current_stream().synchronize()  # MPI reads the memory right away
            self.comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)
            return buffer
        host = to_host(buffer)
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM)
        return cupy.asarray(host)

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self.rank}, size={self.size})"


class NCCLCommunicator:
    """A `cupy.cuda.nccl.NcclCommunicator` behind the `Communicator` interface.

    The sum runs on CuPy's current stream, ordered with the kernels around it. NumPy buffers
    (a process whose input was rejected still takes part in the collective) are staged
    through the GPU.
    """

    def __init__(self, comm: Any):
        self.comm = comm
        self.rank = int(comm.rank_id())
        self.size = int(comm.size())

    def allreduce_sum(self, buffer: Array) -> Array:
        import cupy
        from cupy.cuda import nccl

        work, on_host = _on_gpu(buffer)
        stream = cupy.cuda.get_current_stream()
        self.comm.allReduce(
            work.data.ptr, work.data.ptr, work.size, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, stream.ptr
        )
        return to_host(work) if on_host else work

    def __repr__(self) -> str:
        return f"NCCLCommunicator(rank={self.rank}, size={self.size})"


class CupyxCommunicator:
    """A `cupyx.distributed` backend (e.g. its NCCLBackend) behind the `Communicator` interface.

    cupyx.distributed has no public size attribute: the size is the `n_devices` the backend
    was created with (its `_n_devices`), or pass `size` explicitly.
    """

    def __init__(self, backend: Any, size: int | None = None):
        self.backend = backend
        self.rank = int(backend.rank)
        found = size if size is not None else getattr(backend, "_n_devices", None)
        if found is None:
            raise TypeError(
                "cannot tell the number of processes of this cupyx.distributed backend; pass size="
            )
        self.size = int(found)

    def allreduce_sum(self, buffer: Array) -> Array:
        import cupy

        work, on_host = _on_gpu(buffer)
        out = cupy.empty_like(work)
        self.backend.all_reduce(work, out, op="sum")
        return to_host(out) if on_host else out

    def __repr__(self) -> str:
        return f"CupyxCommunicator(rank={self.rank}, size={self.size})"


def as_communicator(comm: Any) -> Communicator:
    """Wrap an mpi4py, NCCL or cupyx.distributed communicator (a `Communicator` passes through)."""
    if isinstance(comm, Communicator):
        return comm
    if hasattr(comm, "Allreduce") and hasattr(comm, "Get_rank"):
        return MPICommunicator(comm)
    if hasattr(comm, "allReduce") and hasattr(comm, "rank_id"):
        return NCCLCommunicator(comm)
    if hasattr(comm, "all_reduce") and hasattr(comm, "rank"):
        return CupyxCommunicator(comm)
    raise TypeError(
        "comm must be an mpi4py communicator, a cupy.cuda.nccl.NcclCommunicator, "
        "a cupyx.distributed backend, or an object with rank, size and "
        f"allreduce_sum(buffer); got {type(comm).__module__}.{type(comm).__name__}"
    )
