"""A small neural-network library in plain array code, with cupy_bn's batch norm as a layer.

Every layer has the interface of `cupy_bn.BatchNorm1d/2d`, so those drop in unchanged:

    y = layer(x)              # forward (training or eval mode)
    dx = layer.backward(dy)   # gradient of the last forward; fills layer.grads
    layer.params, layer.grads # dicts name -> array (the live arrays: SGD updates them in place)
    layer.train(); layer.eval(); layer.to(xp); layer.state_dict()

Conventions: images are NCHW, dense activations (N, C); weights use PyTorch's layouts (Linear
`(out, in)`, Conv2d `(out, in, kh, kw)`), so `Sequential.state_dict()` under PyTorch's dotted
names (`features.0.weight`, `features.1.running_mean`) is a PyTorch-style model file. Layers
compute with the array module of their parameters (`numpy` or `cupy`): `model.to(cupy)` moves
a model to the GPU and the same code runs there. Arrays are float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

Array = Any


def array_module(x: Array):
    """`cupy` for CuPy arrays, `numpy` otherwise."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(x: Array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


class Layer:
    """Base class: no parameters, identity train/eval, `to` moving params and buffers."""

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}
        self.training = True

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, dy: Array) -> Array:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Layer:
        self.training = bool(mode)
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def to(self, xp) -> Layer:
        def move(d: dict[str, Array]) -> dict[str, Array]:
            return {k: to_numpy(v) if xp is np else xp.asarray(v) for k, v in d.items()}

        self.params, self.grads, self.buffers = (
            move(self.params),
            move(self.grads),
            move(self.buffers),
        )
        return self

    def state_dict(self) -> dict[str, Array]:
        return {k: v.copy() for k, v in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state: dict[str, Array]) -> None:
        own = {**self.params, **self.buffers}
        if set(own) != set(state):
            raise KeyError(
                f"{type(self).__name__}: expected keys {sorted(own)}, got {sorted(state)}"
            )
        for k, target in own.items():
            if tuple(np.shape(state[k])) != tuple(target.shape):
                raise ValueError(
                    f"{type(self).__name__}: {k!r} must have shape "
                    f"{tuple(target.shape)}, got {tuple(np.shape(state[k]))}"
                )
        xp = array_module(next(iter(own.values()))) if own else np
        for k, target in own.items():
            target[...] = xp.asarray(to_numpy(state[k]) if xp is np else state[k])


# ------------------------------------------------------------------------------------------
# Weighted sums


def _fresh_params(
    shapes: dict[str, tuple[int, ...]], fan_in: int, init: str, rng: np.random.Generator, bias: bool
) -> dict[str, np.ndarray]:
    """Weight drawn from N(0, gain/fan_in) (`he`: gain 2, `lecun`: gain 1); zero bias."""
    gains = {"he": 2.0, "lecun": 1.0}
    if init not in gains:
        raise ValueError(f"init must be one of {sorted(gains)}, got {init!r}")
    std = np.sqrt(gains[init] / fan_in)
    params = {"weight": (rng.standard_normal(shapes["weight"]) * std).astype(np.float32)}
    if bias:
        params["bias"] = np.zeros(shapes["bias"], np.float32)
    return params


class Dense(Layer):
    """`y = x @ weight.T + bias`, weight `(out, in)` as PyTorch's Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rng: np.random.Generator,
        init: str = "he",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.params = _fresh_params(
            {"weight": (out_features, in_features), "bias": (out_features,)},
            in_features,
            init,
            rng,
            bias,
        )
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x: Array | None = None

    def forward(self, x: Array) -> Array:
        self._x = x
        y = x @ self.params["weight"].T
        if "bias" in self.params:
            y += self.params["bias"]
        return y

    def backward(self, dy: Array) -> Array:
        self.grads["weight"][...] = dy.T @ self._x
        if "bias" in self.params:
            self.grads["bias"][...] = dy.sum(axis=0)
        return dy @ self.params["weight"]


def im2col(x: Array, k: int, padding: int, stride: int) -> tuple[Array, int, int]:
    """Patches of `x` (N, C, H, W) as columns: `(C*k*k, N*Ho*Wo)`, plus (Ho, Wo).

    Row `(c, i, j)` holds input channel `c` at kernel offset `(i, j)`, matching a weight
    `(out, C, k, k)` reshaped to `(out, C*k*k)`; column `(n, ho, wo)` is one output position.
    One copy per kernel offset (k*k strided copies), then one matrix product does the conv.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    if padding:
        x = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = xp.empty((c, k, k, n, ho, wo), x.dtype)
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            cols[:, i, j] = patch.transpose(1, 0, 2, 3)
    return cols.reshape(c * k * k, n * ho * wo), ho, wo


def col2im(
    cols: Array, x_shape: tuple[int, int, int, int], k: int, padding: int, stride: int
) -> Array:
    """Adjoint of `im2col`: sum each column entry back into the input position it came from."""
    xp = array_module(cols)
    n, c, h, w = x_shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    cols = cols.reshape(c, k, k, n, ho, wo)
    dx = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), cols.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += cols[
                :, i, j
            ].transpose(1, 0, 2, 3)
    return dx[:, :, padding : padding + h, padding : padding + w] if padding else dx


class Conv2d(Layer):
    """2-D cross-correlation over NCHW input, weight `(out, in, k, k)` as PyTorch's Conv2d.

    Forward is im2col + one matrix product; backward is two matrix products + col2im.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rng: np.random.Generator,
        padding: int = 0,
        stride: int = 1,
        init: str = "he",
        bias: bool = True,
    ) -> None:
        super().__init__()
        k = kernel_size
        self.k, self.padding, self.stride = k, padding, stride
        self.params = _fresh_params(
            {"weight": (out_channels, in_channels, k, k), "bias": (out_channels,)},
            in_channels * k * k,
            init,
            rng,
            bias,
        )
        self.grads = {name: np.zeros_like(v) for name, v in self.params.items()}
        self._cols: Array | None = None
        self._x_shape: tuple[int, int, int, int] | None = None

    def forward(self, x: Array) -> Array:
        xp = array_module(x)
        n = x.shape[0]
        cols, ho, wo = im2col(x, self.k, self.padding, self.stride)
        self._cols, self._x_shape = cols, x.shape
        w = self.params["weight"]
        y = w.reshape(w.shape[0], -1) @ cols  # (out, N*Ho*Wo)
        if "bias" in self.params:
            y += self.params["bias"][:, None]
        return xp.ascontiguousarray(y.reshape(w.shape[0], n, ho, wo).transpose(1, 0, 2, 3))

    def backward(self, dy: Array) -> Array:
        w = self.params["weight"]
        out = w.shape[0]
        dy2 = dy.transpose(1, 0, 2, 3).reshape(out, -1)  # (out, N*Ho*Wo)
        self.grads["weight"][...] = (dy2 @ self._cols.T).reshape(w.shape)
        if "bias" in self.params:
            self.grads["bias"][...] = dy2.sum(axis=1)
        dcols = w.reshape(out, -1).T @ dy2
        return col2im(dcols, self._x_shape, self.k, self.padding, self.stride)


# ------------------------------------------------------------------------------------------
# Activations, pooling, reshaping


class ReLU(Layer):
    def forward(self, x: Array) -> Array:
        self._positive = x > 0
        return x * self._positive

    def backward(self, dy: Array) -> Array:
        return dy * self._positive


def sigmoid(x: Array) -> Array:
    """Logistic function without overflow: exp of a non-positive number only."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


class Sigmoid(Layer):
    def forward(self, x: Array) -> Array:
        self._y = sigmoid(x)
        return self._y

    def backward(self, dy: Array) -> Array:
        return dy * self._y * (1 - self._y)


class MaxPool2d(Layer):
    """Max over non-overlapping `size x size` windows of NCHW input (H, W divisible by size).

    The window's elements are visited as `size * size` strided views of the input; the
    gradient goes to the first maximum of each window, as in PyTorch.
    """

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        self.size = size

    def _offsets(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.size) for j in range(self.size)]

    def forward(self, x: Array) -> Array:
        xp = array_module(x)
        s = self.size
        if x.shape[2] % s or x.shape[3] % s:
            raise ValueError(f"MaxPool2d({s}) needs H and W divisible by {s}, got {x.shape}")
        out = x[:, :, ::s, ::s].copy()
        self._argmax = xp.zeros(out.shape, np.int8)  # which offset holds the maximum
        for k, (i, j) in enumerate(self._offsets()[1:], start=1):
            candidate = x[:, :, i::s, j::s]
            better = candidate > out  # strict: ties keep the first
            self._argmax[better] = k
            xp.maximum(out, candidate, out=out)
        self._x_shape = x.shape
        return out

    def backward(self, dy: Array) -> Array:
        xp = array_module(dy)
        s = self.size
        dx = xp.empty(self._x_shape, dy.dtype)
        for k, (i, j) in enumerate(self._offsets()):
            dx[:, :, i::s, j::s] = dy * (self._argmax == k)
        return dx


class Identity(Layer):
    """Passes its input through; holds the place of a layer folded away (keeps the names)."""

    def forward(self, x: Array) -> Array:
        return x

    def backward(self, dy: Array) -> Array:
        return dy


class Flatten(Layer):
    def forward(self, x: Array) -> Array:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Array) -> Array:
        return dy.reshape(self._shape)


# ------------------------------------------------------------------------------------------
# Containers


class Sequential(Layer):
    """Layers applied in order; state-dict names are `index.name` as in PyTorch's Sequential."""

    def __init__(self, *layers: Any) -> None:
        super().__init__()
        self.layers = list(layers)

    def __getitem__(self, i: int) -> Any:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy: Array) -> Array:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode: bool = True) -> Sequential:
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def to(self, xp) -> Sequential:
        for layer in self.layers:
            layer.to(xp)
        return self

    def child_names(self, prefix: str = "") -> list[str]:
        """The state-dict names of the direct children: their indices, as in PyTorch."""
        return [f"{prefix}{i}" for i in range(len(self.layers))]

    def named_layers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """(dotted name, leaf layer) for every layer, nested containers flattened."""
        for name, layer in zip(self.child_names(prefix), self.layers, strict=True):
            if isinstance(layer, Sequential):
                yield from layer.named_layers(name + ".")
            else:
                yield name, layer

    def fold_pairs(self, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
        """(layer name, batch-norm name, batch norm) for each Conv2d/Dense whose output goes
        straight into a batch norm: the pairs `cupy-bn fold` may fold, known from the graph."""
        names = self.child_names(prefix)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Sequential):
                yield from layer.fold_pairs(names[i] + ".")
            elif (
                i
                and "running_mean" in getattr(layer, "buffers", {})
                and isinstance(self.layers[i - 1], (Conv2d, Dense))
            ):
                yield names[i - 1], names[i], layer

    def parameters(self) -> Iterator[tuple[Array, Array]]:
        """(parameter, gradient) pairs of every layer, as live arrays."""
        for _, layer in self.named_layers():
            for k, p in layer.params.items():
                yield p, layer.grads[k]

    def state_dict(self) -> dict[str, Array]:
        return {
            f"{name}.{k}": v
            for name, layer in self.named_layers()
            for k, v in layer.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, Array]) -> None:
        layers = dict(self.named_layers())
        own = self.state_dict()
        if set(own) != set(state):
            raise KeyError(
                f"missing keys {sorted(set(own) - set(state))}, "
                f"unexpected keys {sorted(set(state) - set(own))}"
            )
        for name, layer in layers.items():
            sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.rpartition(".")[0] == name}
            if sub:
                layer.load_state_dict(sub)


class Named(Sequential):
    """Named sub-networks (`features`, `classifier`) applied in order, as a PyTorch module."""

    def __init__(self, **parts: Sequential) -> None:
        super().__init__(*parts.values())
        self.names = list(parts)

    def child_names(self, prefix: str = "") -> list[str]:
        return [f"{prefix}{name}" for name in self.names]


# ------------------------------------------------------------------------------------------
# Loss and optimizer


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[float, Array]:
    """Mean cross-entropy of integer `labels` under softmax(`logits`), and d loss / d logits."""
    xp = array_module(logits)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = xp.arange(n)
    loss = -float(log_p[rows, labels].mean())
    dlogits = xp.exp(log_p)
    dlogits[rows, labels] -= 1
    return loss, dlogits / n


class SGD:
    """SGD with momentum, PyTorch's form: `v = mu * v + g; p -= lr * v` (dampening 0)."""

    def __init__(
        self, parameters: Iterable[tuple[Array, Array]], lr: float, momentum: float = 0.9
    ) -> None:
        self.pairs = list(parameters)
        self.lr, self.momentum = lr, momentum
        self.velocity = [array_module(p).zeros_like(p) for p, _ in self.pairs]

    def step(self) -> None:
        for (p, g), v in zip(self.pairs, self.velocity, strict=True):
            v *= self.momentum
            v += g
            p -= self.lr * v
