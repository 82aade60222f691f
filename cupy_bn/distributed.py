"""Sync batch norm: statistics over the batches of all processes, on an existing engine.

    from mpi4py import MPI
    bn = SyncBatchNorm(64, comm=MPI.COMM_WORLD)       # any input of rank 2 to 5
    y = bn(x_local); dx = bn.backward(dy_local)         # dx exact for the global batch
    layers = convert_sync_batchnorm(layers, MPI.COMM_WORLD)

Per training step and layer there are two collectives, each ONE all-reduce sum of a float64
buffer (`cupy_bn.communicators`):

- forward: `[failure flags, n, n*(mean - K), n*var + n*(mean - K)**2]` per channel, with a
  shift K common to all processes (the previous step's global mean). The sums give the global
  count, mean and M2 by Chan et al.'s count-weighted merge, `M2 = sum(M2_i + n_i*(mean_i -
  mean)**2)`, written around K: never a mean of means, and exact when |mean| >> std as long as K
  is within some standard deviations of the mean (`RECENTRE_RATIO`). When it is not (the
  first step on data far from zero), a second all-reduce of `n_i*var_i + n_i*(mean_i -
  mean)**2` gives M2 exactly; every process takes that decision from the same reduced numbers.
- backward: `[failure flags, sum_dy, sum_dy_xmu]`.

A process with an empty batch takes part with n = 0. Running statistics are updated from the
global statistics, so they stay identical on every process. Eval mode (running statistics)
does no communication. dweight/dbias are this process's share, as in PyTorch's SyncBatchNorm:
the data-parallel optimizer sums (or averages) them across processes like every other
parameter gradient.

Ghost batches (`virtual_batch`, `cupy_bn.ghost`) are refused with `ValueError`: each chunk is
normalized with the statistics of this process's samples alone, so there is nothing to
synchronize. `SyncBatchNorm(..., virtual_batch=G)` and `convert_sync_batchnorm` of a layer with
`virtual_batch` raise before any communication; each process can run a local
`BatchNorm*d(virtual_batch=G)` instead.

Failures: a process whose call fails before its all-reduce (bad input, say) still takes part,
setting its bit in the flags; every other process then raises `RemoteFailure` naming the failed
process(es) instead of waiting forever, and the failed process raises its own error. Nothing
is updated anywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np

from cupy_bn.arrays import array_module, to_host
from cupy_bn.backends import Backend
from cupy_bn.communicators import Communicator, as_communicator
from cupy_bn.functional import SavedForBackward, batch_norm
from cupy_bn.intmath import ceil_div
from cupy_bn.layers import _BatchNorm
from cupy_bn.renorm import DEFAULT_DMAX, DEFAULT_RMAX
from cupy_bn.validation import check_num_features, check_vector_shape, normalize_axis

Array = Any
Phase = Literal["stats", "grads"]

__all__ = [
    "RemoteFailure",
    "SyncBatchNorm",
    "SyncReducer",
    "convert_sync_batchnorm",
    "merge_shifted",
    "shifted_terms",
    "sync_batch_norm",
]

#: Failure flags: process r sets bit r % 52 of slot r // 52. Sums of distinct powers of two
#: below 2**52 are exact in float64, so the flags survive the all-reduce sum in any order.
FLAG_BITS = 52

#: The shifted sums are trusted while (mean - K)**2 <= ratio * var: M2 then loses at most
#: about `ratio` float64 ulps to cancellation. For float64 statistics that is 1024 ulps (about
#: 1e-13 relative); float32 statistics (float32/float16/bfloat16 data) carry 2**29 times
#: coarser rounding already, so K may be ~1000 standard deviations off before it shows.
RECENTRE_RATIO = {np.dtype(np.float64): 1024.0, np.dtype(np.float32): float(2**20)}

_PHASE_WORDS = {
    "stats": "the statistics all-reduce of a training forward",
    "grads": "the gradient all-reduce of a backward",
}


class RemoteFailure(RuntimeError):
    """Another process failed before a sync batch norm collective; `ranks` names them."""

    def __init__(self, ranks: list[int], size: int, phase: Phase):
        self.ranks = ranks
        self.size = size
        self.phase = phase
        who = ", ".join(map(str, ranks))
        super().__init__(
            f"sync batch norm: process(es) {who} of {size} failed before "
            f"{_PHASE_WORDS[phase]} (each raised its own error); this process's state is "
            "unchanged"
        )


def flag_slots(size: int) -> int:
    """Number of float64 slots holding the failure flags of `size` processes."""
    return ceil_div(size, FLAG_BITS)


def failure_flags(rank: int, size: int) -> np.ndarray:
    """The flag slots with only `rank`'s bit set."""
    flags = np.zeros(flag_slots(size), np.float64)
    flags[rank // FLAG_BITS] = float(2 ** (rank % FLAG_BITS))
    return flags


def failed_ranks(flags: np.ndarray) -> list[int]:
    """The processes whose bits are set in summed flag slots."""
    ranks = []
    for slot, value in enumerate(np.asarray(flags, np.float64)):
        bits = int(value)
        ranks += [slot * FLAG_BITS + b for b in range(FLAG_BITS) if bits >> b & 1]
    return ranks


# -- Chan's count-weighted merge, as sums -------------------------------------------------
def shifted_terms(count: int, mean: Array, var: Array, shift: Array) -> tuple[Array, Array]:
    """This process's `(n*(mean - K), n*var + n*(mean - K)**2)` in float64.

    Summed over processes (with the same shift K everywhere) they are the global
    `n*(mean - K)` and `M2 + n*(mean - K)**2`; `merge_shifted` recovers mean and variance.
    """
    d = mean.astype(np.float64) - shift
    return count * d, count * var.astype(np.float64) + count * d * d


def merge_shifted(
    count: int, s1: Array, s2: Array, shift: Array, ratio: float = 1024.0
) -> tuple[Array, Array, Array]:
    """Global `(mean, biased var, far)` from summed shifted terms over `count` values.

    `far` marks channels where K was more than sqrt(ratio) standard deviations from the mean,
    so that `M2 = s2 - n*(mean - K)**2` may have lost digits to cancellation (see
    RECENTRE_RATIO).
    """
    xp = array_module(s1)
    d = s1 / count
    mean = shift + d
    var = xp.maximum(s2 - count * d * d, 0.0) / count
    far = d * d > ratio * var
    return mean, var, far


def centred_m2(count: int, mean: Array, var: Array, global_mean: Array) -> Array:
    """This process's share of the global M2: `n*var + n*(mean - global_mean)**2` (float64)."""
    d = mean.astype(np.float64) - global_mean
    return count * var.astype(np.float64) + count * d * d


class SyncReducer:
    """The `StatsReducer` of sync batch norm: merges statistics and sums gradients over `comm`.

    Keep one per layer (SyncBatchNorm does): it remembers the last global mean, the shift of
    the next step's merge. `comm` is anything `cupy_bn.communicators.as_communicator` takes.
    """

    def __init__(self, comm: Any, num_features: int):
        self.num_features = check_num_features(num_features)
        self.comm: Communicator = as_communicator(comm)
        self._slots = flag_slots(self.comm.size)
        self._shift: Array | None = None
        self._depth = 0
        self._joined = False

    # -- taking part even when failing ----------------------------------------------------
    @contextmanager
    def collective(self, phase: Phase) -> Iterator[None]:
        """Run a call that reaches this reducer's `phase` collective; see the module docstring."""
        outermost = self._depth == 0
        if outermost:
            self._joined = False
        self._depth += 1
        try:
            yield
        except Exception:
            if outermost and not self._joined:
                self._announce_failure(phase)
            raise
        finally:
            self._depth -= 1

    def _buffer_length(self, phase: Phase) -> int:
        return self._slots + (1 if phase == "stats" else 0) + 2 * self.num_features

    def _announce_failure(self, phase: Phase) -> None:
        buffer = np.zeros(self._buffer_length(phase), np.float64)
        buffer[: self._slots] = failure_flags(self.comm.rank, self.comm.size)
        self._allreduce(buffer)

    def _allreduce(self, buffer: Array) -> Array:
        self._joined = True
        return self.comm.allreduce_sum(buffer)

    def _raise_on_failures(self, head: np.ndarray, phase: Phase) -> None:
        ranks = failed_ranks(head[: self._slots])
        if ranks:
            raise RemoteFailure(ranks, self.comm.size, phase)

    def _shift_for(self, xp) -> Array:
        if self._shift is None:
            self._shift = xp.zeros(self.num_features, np.float64)
        elif array_module(self._shift) is not xp:  # the layer moved between NumPy and CuPy
            self._shift = xp.asarray(to_host(self._shift))
        return self._shift

    # -- StatsReducer ---------------------------------------------------------------------
    def merge_stats(self, count: int, mean: Array, var: Array) -> tuple[int, Array, Array]:
        """Global `(count, mean, biased var)` from this process's; one all-reduce (rarely two)."""
        check_vector_shape("mean", mean, self.num_features)
        check_vector_shape("var", var, self.num_features)
        xp = array_module(mean)
        c, s = self.num_features, self._slots
        shift = self._shift_for(xp)
        buffer = xp.zeros(self._buffer_length("stats"), np.float64)
        buffer[s] = count
        buffer[s + 1 : s + 1 + c], buffer[s + 1 + c :] = shifted_terms(count, mean, var, shift)
        out = self._allreduce(buffer)
        head = to_host(out[: s + 1])
        self._raise_on_failures(head, "stats")
        total = int(head[s])
        if total == 0:
            return 0, xp.zeros_like(mean), xp.zeros_like(var)
        g_mean, g_var, far = merge_shifted(
            total,
            out[s + 1 : s + 1 + c],
            out[s + 1 + c :],
            shift,
            RECENTRE_RATIO[np.dtype(var.dtype)],
        )
        if total > 1 and bool(far.any()):  # the same reduced numbers everywhere: all decide alike
            m2 = self._allreduce(centred_m2(count, mean, var, g_mean))
            g_var = m2 / total
        finite = xp.isfinite(g_mean)
        self._shift = xp.where(finite, g_mean, shift)
        return total, g_mean.astype(mean.dtype), g_var.astype(var.dtype)

    def sum_grads(self, sum_dy: Array, sum_dy_xmu: Array) -> tuple[Array, Array]:
        """`(sum_dy, sum_dy_xmu)` summed over all processes; one all-reduce."""
        check_vector_shape("sum_dy", sum_dy, self.num_features)
        check_vector_shape("sum_dy_xmu", sum_dy_xmu, self.num_features)
        xp = array_module(sum_dy)
        c, s = self.num_features, self._slots
        buffer = xp.zeros(self._buffer_length("grads"), np.float64)
        buffer[s : s + c] = sum_dy
        buffer[s + c :] = sum_dy_xmu
        out = self._allreduce(buffer)
        head = to_host(out[:s])
        self._raise_on_failures(head, "grads")
        return out[s : s + c].astype(sum_dy.dtype), out[s + c :].astype(sum_dy_xmu.dtype)

    def __repr__(self) -> str:
        return f"SyncReducer({self.comm!r}, num_features={self.num_features})"


# -- functional form ----------------------------------------------------------------------
def _channels(x: Array, channel_axis: int, *vectors: Array | None) -> int:
    """The channel count: from the per-channel vectors when given (they are the same on every
    process even when one process's `x` is malformed), else from `x`."""
    for v in vectors:
        if v is not None and len(getattr(v, "shape", ())) == 1:
            return int(v.shape[0])
    if getattr(x, "ndim", 0) >= 2:
        return int(x.shape[normalize_axis(channel_axis, x.ndim)])
    raise ValueError(
        "sync batch norm cannot tell the number of channels: x must have rank >= 2 "
        "(pass comm=SyncReducer(comm, num_features) so that every process takes "
        "part in the collective even with malformed input)"
    )


def sync_batch_norm(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
    backend: str | Backend = "auto",
    *,
    comm: Any,
    activation: str | None = None,
    residual: Array | None = None,
    renorm: bool = False,
    rmax: float = DEFAULT_RMAX,
    dmax: float = DEFAULT_DMAX,
) -> tuple[Array, SavedForBackward]:
    """`batch_norm` with statistics over the batches of all processes of `comm`.

    Same arguments (the fused `activation` and `residual`, and batch renormalization's
    `renorm`, `rmax`, `dmax`, whose `r` and `d` come from the global statistics) and result as
    `cupy_bn.functional.batch_norm`; `batch_norm_backward(dy,
    saved)` gives the gradients (dx over the global batch, one all-reduce).
    `comm`: an mpi4py / NCCL / cupyx.distributed communicator, or a `SyncReducer` kept across
    steps (its shift saves the rare second all-reduce; it also fixes the channel count, so a
    process with malformed `x` still takes part in the collective).
    """
    reducer = (
        comm
        if isinstance(comm, SyncReducer)
        else SyncReducer(comm, _channels(x, channel_axis, weight, bias, running_mean, running_var))
    )
    return batch_norm(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training=training,
        momentum=momentum,
        eps=eps,
        channel_axis=channel_axis,
        backend=backend,
        reducer=reducer,
        activation=activation,
        residual=residual,
        renorm=renorm,
        rmax=rmax,
        dmax=dmax,
    )


# -- layer --------------------------------------------------------------------------------
class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover the batches of all processes of `comm`.

    Takes input of rank 2 to 5 (`(N, C)`, `(N, C, L)`, NCHW, NCDHW; channels-last with
    channel_axis=-1). Options and state are BatchNorm's; `comm` is an mpi4py communicator, a
    `cupy.cuda.nccl.NcclCommunicator`, a cupyx.distributed backend or a
    `cupy_bn.communicators.Communicator`. Every process must call forward/backward the same
    number of times in the same mode. `grads` hold this process's share of dweight/dbias.
    """

    ranks = (2, 3, 4, 5)

    def __init__(self, num_features: int, *options: Any, comm: Any, **named_options: Any):
        """`SyncBatchNorm(num_features, eps, momentum, affine, ..., comm=comm)`: BatchNorm's
        arguments, positional or named, and the communicator. `virtual_batch` is refused
        (module docstring)."""
        _refuse_virtual_batch(named_options.get("virtual_batch"))
        super().__init__(num_features, *options, **named_options)
        self.reducer = SyncReducer(comm, self.num_features)

    @property
    def comm(self) -> Communicator:
        return self.reducer.comm

    def _reducer(self) -> SyncReducer:
        return self.reducer

    def forward(self, x: Array, residual: Array | None = None) -> Array:
        if self.training or not self.track_running_stats:
            with self.reducer.collective("stats"):
                return super().forward(x, residual)
        return super().forward(x, residual)

    def backward(self, dy: Array) -> Array | tuple[Array, Array]:
        if self._saved is not None and self._saved.batch_statistics:
            with self.reducer.collective("grads"):
                return super().backward(dy)
        return super().backward(dy)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", comm={self.comm!r})"


def _refuse_virtual_batch(virtual_batch: int | None, layer: _BatchNorm | None = None) -> None:
    if virtual_batch is not None:
        which = "" if layer is None else f" ({layer!r})"
        raise ValueError(
            f"sync batch norm does not take virtual_batch={virtual_batch!r}{which}: ghost "
            "batches are normalized with the statistics of this process's samples alone, so "
            "there is nothing to synchronize; use a local BatchNorm with virtual_batch instead"
        )


def _to_sync(layer: _BatchNorm, comm: Any) -> SyncBatchNorm:
    _refuse_virtual_batch(layer.virtual_batch, layer)
    sync = SyncBatchNorm(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        channel_axis=layer.channel_axis,
        dtype=layer.dtype,
        backend=layer.backend,
        activation=layer.activation,
        renorm=layer.renorm,
        rmax=layer.rmax,
        dmax=layer.dmax,
        comm=comm,
    )
    sync.params, sync.grads, sync.buffers = (
        dict(layer.params),
        dict(layer.grads),
        dict(layer.buffers),
    )
    sync.training = layer.training
    return sync


def convert_sync_batchnorm(layers: Any, comm: Any) -> Any:
    """The same structure with every BatchNorm layer replaced by a SyncBatchNorm on `comm`.

    `layers`: a layer, or lists, tuples (named ones too) and dicts nesting layers and anything
    else (left as is; a container without a BatchNorm inside is returned itself). The new
    layers keep the options, mode and state of the old ones and share their parameter,
    gradient and running-statistics arrays (as PyTorch's conversion does), so optimizers
    holding those arrays keep working. A layer appearing twice becomes one SyncBatchNorm
    appearing twice. A layer with `virtual_batch` raises `ValueError` (module docstring).
    """
    comm = as_communicator(comm)
    done: dict[int, Any] = {}

    def convert(obj: Any) -> Any:
        if id(obj) in done:
            return done[id(obj)]
        if isinstance(obj, _BatchNorm):
            out: Any = _to_sync(obj, comm)
        elif isinstance(obj, (dict, list, tuple)):
            items = list(obj.values() if isinstance(obj, dict) else obj)
            new = [convert(v) for v in items]
            if all(a is b for a, b in zip(new, items, strict=True)):
                out = obj  # no batch norm inside: the very same container
            elif isinstance(obj, dict):
                out = copy.copy(obj)  # keeps the dict's type (OrderedDict, defaultdict, ...)
                out.update(zip(obj.keys(), new, strict=True))
            elif isinstance(obj, list):
                out = copy.copy(obj)
                out[:] = new
            else:
                out = type(obj)(*new) if hasattr(obj, "_fields") else type(obj)(new)
        else:
            return obj
        done[id(obj)] = out
        return out

    return convert(layers)
