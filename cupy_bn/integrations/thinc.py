"""Batch norm as a Thinc layer: `BatchNorm`, a `Model` with params "G" and "b".

    from thinc.api import Relu, Softmax, chain
    from cupy_bn.integrations.thinc import BatchNorm

    model = chain(Relu(128, normalize=False), BatchNorm(), Softmax())
    Y, backprop = model.begin_update(X)   # training: batch statistics, running ones updated
    Y = model.predict(X)                  # inference: running statistics

"G" (the scale, gamma) and "b" (the shift, beta) are Thinc's names for LayerNorm's
parameters. The running statistics live in the attr "running_stats" (a `RunningStatistics`),
which `to_bytes`/`from_bytes` (and `to_disk`/`from_disk`) carry. Parameters and running
statistics take the dtype of the sample `X` given to `initialize` (float32 without one).

The forward is `cupy_bn.batch_norm` on the arrays of `model.ops`: NumPy with `NumpyOps`,
CuPy (the CUDA backend) with `CupyOps`; the running statistics follow the model to the ops'
device on the next call. Conventions are the core's: `momentum` is the weight of the new batch
(PyTorch's; None keeps a cumulative average), `channel_axis` -1 for Thinc's `(N, nO)` and
channels-last input, 1 for NCHW-style.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import srsly
from thinc.api import Model, registry
from thinc.model import deserialize_attr, serialize_attr
from thinc.types import FloatsXd

from cupy_bn.arrays import array_module, to_host
from cupy_bn.dtypes import check_float_dtype
from cupy_bn.functional import batch_norm, batch_norm_backward
from cupy_bn.validation import (
    check_array,
    check_channel_axis,
    check_eps,
    check_momentum,
    normalize_axis,
)

__all__ = ["BatchNorm", "RunningStatistics"]

Array = Any
#: Input ranks the layer takes: (N, C) up to (N, C, D, H, W).
RANKS = (2, 3, 4, 5)


@dataclass
class RunningStatistics:
    """A BatchNorm layer's running averages: per-channel mean and (unbiased) variance, and the
    number of training batches they have seen (what `momentum=None` averages over)."""

    mean: Array | None = None
    var: Array | None = None
    num_batches_tracked: int = 0


@serialize_attr.register(RunningStatistics)
def _serialize_running(_: Any, value: RunningStatistics, name: str, model: Model) -> bytes:
    def host(a):
        return None if a is None else to_host(a)

    return srsly.msgpack_dumps(
        {
            "mean": host(value.mean),
            "var": host(value.var),
            "num_batches_tracked": int(value.num_batches_tracked),
        }
    )


@deserialize_attr.register(RunningStatistics)
def _deserialize_running(_: Any, value: bytes, name: str, model: Model) -> RunningStatistics:
    msg = srsly.msgpack_loads(value)
    xp = model.ops.xp

    def array(a):  # a writable copy on the model's device (msgpack's arrays are read-only)
        return None if a is None else xp.array(np.asarray(a))

    return RunningStatistics(array(msg["mean"]), array(msg["var"]), int(msg["num_batches_tracked"]))


@registry.layers("cupy_bn.BatchNorm.v1")
def BatchNorm(
    nO: int | None = None,
    *,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    channel_axis: int = -1,
) -> Model[FloatsXd, FloatsXd]:
    """A batch-norm layer over `nO` channels (inferred from the data at `initialize` if None).

    `begin_update` normalizes with the batch statistics and updates the running ones;
    `predict` normalizes with the running statistics.
    """
    if nO is not None and (isinstance(nO, bool) or not isinstance(nO, Integral) or nO < 1):
        raise ValueError(f"nO must be an int >= 1 or None, got {nO!r}")
    return Model(
        "cupy_bn_batchnorm",
        _forward,
        init=_init,
        dims={"nO": None if nO is None else int(nO)},
        params={"G": None, "b": None},
        attrs={
            "momentum": check_momentum(momentum, allow_none=True),
            "eps": check_eps(eps),
            "channel_axis": check_channel_axis(channel_axis, RANKS),
            "running_stats": RunningStatistics(),
        },
    )


def _init(model: Model, X: FloatsXd | None = None, Y: FloatsXd | None = None) -> None:
    sample = X if X is not None else Y
    dtype = np.dtype(np.float32)
    if sample is not None:
        check_array("X" if X is not None else "Y", sample)
        axis = normalize_axis(model.attrs["channel_axis"], sample.ndim)
        model.set_dim("nO", int(sample.shape[axis]))
        dtype = check_float_dtype("X" if X is not None else "Y", sample.dtype)
    nO = model.get_dim("nO")
    xp = model.ops.xp
    model.set_param("G", xp.ones(nO, dtype))
    model.set_param("b", xp.zeros(nO, dtype))
    model.attrs["running_stats"] = RunningStatistics(xp.zeros(nO, dtype), xp.ones(nO, dtype), 0)


def _running_statistics(model: Model) -> RunningStatistics:
    """The model's running statistics as arrays of its ops' library (moved there if needed)."""
    stats: RunningStatistics = model.attrs["running_stats"]
    xp = model.ops.xp
    if stats.mean is not None and array_module(stats.mean) is not xp:
        move = to_host if xp is np else xp.asarray
        stats.mean, stats.var = move(stats.mean), move(stats.var)
    return stats


def _forward(model: Model, X: FloatsXd, is_train: bool) -> tuple[FloatsXd, Callable]:
    channel_axis = model.attrs["channel_axis"]
    check_array("X", X)
    nO = model.get_dim("nO")
    if X.ndim not in RANKS or X.shape[normalize_axis(channel_axis, X.ndim)] != nO:
        raise ValueError(
            f"X must have rank 2 to 5 and nO={nO} channels on axis {channel_axis}, "
            f"got shape {tuple(X.shape)}"
        )
    stats = _running_statistics(model)
    momentum = model.attrs["momentum"]
    if is_train and momentum is None:  # cumulative average over the batches seen
        momentum = 1.0 / (stats.num_batches_tracked + 1)
    Y, saved = batch_norm(
        X,
        model.get_param("G"),
        model.get_param("b"),
        stats.mean,
        stats.var,
        training=is_train,
        momentum=0.0 if momentum is None else momentum,
        eps=model.attrs["eps"],
        channel_axis=channel_axis,
    )
    if is_train:
        stats.num_batches_tracked += 1

    def backprop(dY: FloatsXd) -> FloatsXd:
        dX, dG, db = batch_norm_backward(dY, saved)
        model.inc_grad("G", dG)
        model.inc_grad("b", db)
        return dX

    return Y, backprop
