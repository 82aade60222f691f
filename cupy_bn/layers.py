"""BatchNorm1d/2d/3d layers for array code: parameters, running statistics, train/eval.

    bn = BatchNorm2d(64)
    y = bn(x)                       # training mode: batch statistics, running stats updated
    dx = bn.backward(dy)            # fills bn.grads["weight"], bn.grads["bias"]
    for k in bn.params: bn.params[k] -= lr * bn.grads[k]
    bn.eval(); y = bn(x)            # inference: running statistics

    block = BatchNorm2d(64, activation="relu")
    y = block(x, residual=z)        # relu(bn(x) + z), ResNet's BN + add + ReLU
    dx, dz = block.backward(dy)     # (dx, dresidual) after a forward with a residual

`momentum` is the weight of the new batch (PyTorch's convention; Keras/Chainer/Flax use
`1 - momentum`); `momentum=None` keeps a cumulative average over all batches seen. `grads`
hold the gradients of the last `backward` (overwritten, not accumulated). `state_dict` uses
PyTorch's key names, so weights move between the two with `np.savez`/`torch.from_numpy`.

`activation="relu"` fuses a ReLU after the normalization, and `forward(x, residual=z)` adds
`z` before it (`cupy_bn.functional.batch_norm`'s fused forms). `backward(dy)` returns `dx`
alone after a forward without residual and the pair `(dx, dresidual)` after one with a residual.

`virtual_batch=G` (ghost batches, `cupy_bn.ghost`) normalizes each chunk of `G` consecutive
samples with its own statistics whenever batch statistics are used (training, or eval without
running statistics); eval mode with running statistics ignores it.

`renorm=True` trains with batch renormalization (`cupy_bn.renorm`); `rmax` and `dmax` are
plain attributes, read at every training forward, so a warm-up schedule sets them between
steps (`bn.rmax = ...`). Inference and `state_dict` are those of batch norm. With
`virtual_batch` each chunk is renormalized against the running statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cupy_bn.arrays import array_module, to_host
from cupy_bn.backends import Backend
from cupy_bn.dtypes import check_float_dtype
from cupy_bn.functional import SavedForBackward, batch_norm, batch_norm_backward
from cupy_bn.ghost import GhostSaved, check_virtual_batch
from cupy_bn.renorm import DEFAULT_DMAX, DEFAULT_RMAX, check_renorm_options
from cupy_bn.validation import (
    check_activation,
    check_array,
    check_array_module,
    check_channel_axis,
    check_eps,
    check_momentum,
    check_num_features,
    normalize_axis,
    ranks_text,
)

Array = Any


class _BatchNorm:
    """Shared machinery of BatchNorm1d/2d/3d; subclasses set the accepted input ranks."""

    ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_axis: int = 1,
        dtype: Any = np.float32,
        backend: str | Backend = "auto",
        activation: str | None = None,
        *,
        virtual_batch: int | None = None,
        renorm: bool = False,
        rmax: float = DEFAULT_RMAX,
        dmax: float = DEFAULT_DMAX,
    ):
        self.num_features = check_num_features(num_features)
        self.channel_axis = check_channel_axis(channel_axis, self.ranks)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum, allow_none=True)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = check_float_dtype("dtype", dtype)
        self.backend = backend
        self.activation = check_activation(activation)
        self.virtual_batch = check_virtual_batch(virtual_batch)
        self.renorm, self.rmax, self.dmax = check_renorm_options(
            renorm, rmax, dmax, self.track_running_stats
        )
        self.training = True
        self._saved: SavedForBackward | GhostSaved | None = None
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}
        self._allocate(np)

    def _allocate(self, xp) -> None:
        c = self.num_features
        if self.affine:
            self.params = {"weight": xp.ones(c, self.dtype), "bias": xp.zeros(c, self.dtype)}
            self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}
        if self.track_running_stats:
            self.buffers = {
                "running_mean": xp.zeros(c, self.dtype),
                "running_var": xp.ones(c, self.dtype),
                "num_batches_tracked": xp.zeros((), np.int64),
            }

    # -- attribute access in PyTorch's names ----------------------------------------------
    @property
    def weight(self) -> Array | None:
        return self.params.get("weight")

    @property
    def bias(self) -> Array | None:
        return self.params.get("bias")

    @property
    def running_mean(self) -> Array | None:
        return self.buffers.get("running_mean")

    @property
    def running_var(self) -> Array | None:
        return self.buffers.get("running_var")

    @property
    def num_batches_tracked(self) -> int | None:
        n = self.buffers.get("num_batches_tracked")
        return None if n is None else int(n)

    # -- modes and devices ----------------------------------------------------------------
    def train(self, mode: bool = True) -> _BatchNorm:
        self.training = bool(mode)
        return self

    def eval(self) -> _BatchNorm:
        return self.train(False)

    def to(self, xp) -> _BatchNorm:
        """Move parameters, gradients and buffers to array module `xp` (numpy or cupy)."""

        def move(d: dict[str, Array]) -> dict[str, Array]:
            if xp is np:
                return {k: to_host(v) for k, v in d.items()}
            return {k: xp.asarray(v) for k, v in d.items()}

        self.params, self.grads, self.buffers = (
            move(self.params),
            move(self.grads),
            move(self.buffers),
        )
        self._saved = None
        return self

    # -- forward / backward ---------------------------------------------------------------
    def _check_input(self, x: Array) -> None:
        check_array("x", x)
        if x.ndim not in self.ranks:
            raise ValueError(
                f"{type(self).__name__} expects input of rank "
                f"{ranks_text(self.ranks)}, got shape {tuple(x.shape)}"
            )
        axis = normalize_axis(self.channel_axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"x has {x.shape[axis]} channels on axis {self.channel_axis}, "
                f"expected num_features={self.num_features}"
            )
        state = self.params.get("weight", self.buffers.get("running_mean"))
        if state is not None:
            here = array_module(x).__name__
            check_array_module(
                "x", x, array_module(state), "like the layer's state", f"; call .to({here}) first"
            )

    def __call__(self, x: Array, residual: Array | None = None) -> Array:
        return self.forward(x, residual)

    def forward(self, x: Array, residual: Array | None = None) -> Array:
        """Normalize `x` (batch statistics when training or not tracking running stats), add
        `residual` (None: nothing) and apply the layer's activation."""
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:  # cumulative average over the batches seen
            momentum = 1.0 / (int(self.buffers["num_batches_tracked"]) + 1)
        y, saved = batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean
            if self.track_running_stats and (update or not use_batch_stats)
            else None,
            self.running_var
            if self.track_running_stats and (update or not use_batch_stats)
            else None,
            training=use_batch_stats,
            momentum=0.0 if momentum is None else momentum,
            eps=self.eps,
            channel_axis=self.channel_axis,
            backend=self.backend,
            reducer=self._reducer(),
            activation=self.activation,
            residual=residual,
            virtual_batch=self.virtual_batch,
            renorm=self.renorm,
            rmax=self.rmax,
            dmax=self.dmax,
        )
        if update:
            self.buffers["num_batches_tracked"] += 1
        self._saved = saved
        return y

    def _reducer(self):
        """Cross-process statistics reducer; None for a local layer (SyncBatchNorm overrides)."""
        return None

    def backward(self, dy: Array) -> Array | tuple[Array, Array]:
        """Gradient w.r.t. the last forward's input, and `(dx, dresidual)` when that forward
        had a residual; stores weight/bias gradients in `grads`."""
        if self._saved is None:
            raise RuntimeError("backward called before any forward")
        dx, dweight, dbias, *dresidual = batch_norm_backward(dy, self._saved)
        if self.affine:
            self.grads["weight"][...] = dweight
            self.grads["bias"][...] = dbias
        return (dx, *dresidual) if dresidual else dx

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Array]:
        """Copies of the state under PyTorch's key names."""
        return {k: v.copy() for k, v in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state: dict[str, Array], strict: bool = True) -> None:
        """Load a state (PyTorch key names); all keys are checked before anything changes."""
        own = {**self.params, **self.buffers}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or (strict and unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for k, target in own.items():
            value = state[k]
            if tuple(np.shape(value)) != tuple(target.shape):
                raise ValueError(
                    f"load_state_dict: {k!r} must have shape {tuple(target.shape)}, "
                    f"got {tuple(np.shape(value))}"
                )
            kind = np.asarray(value).dtype.kind if not hasattr(value, "dtype") else value.dtype.kind
            if k == "num_batches_tracked" and kind not in "iu":
                raise TypeError(f"load_state_dict: {k!r} must be an integer, got dtype {kind}")
            if k != "num_batches_tracked" and kind != "f":
                raise TypeError(f"load_state_dict: {k!r} must be a float array")
        xp = array_module(next(iter(own.values()))) if own else np
        for k, target in own.items():
            value = state[k]
            target[...] = to_host(value) if xp is np else xp.asarray(value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, "
            f"channel_axis={self.channel_axis}"
            + ("" if self.activation is None else f", activation={self.activation!r}")
            + ("" if self.virtual_batch is None else f", virtual_batch={self.virtual_batch}")
            + (f", renorm=True, rmax={self.rmax}, dmax={self.dmax}" if self.renorm else "")
            + ")"
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over `(N, C)` or `(N, C, L)` input (or `(N, L, C)` with channel_axis=-1)."""

    ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over `(N, C, H, W)` input (or NHWC with channel_axis=-1)."""

    ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over `(N, C, D, H, W)` input (or NDHWC with channel_axis=-1)."""

    ranks = (5,)
