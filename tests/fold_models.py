"""State dicts laid out as PyTorch exports them, and a float64 reference of conv + eval BN.

The convolution reference is written independently of `cupy_bn.foldcheck`: a valid
cross-correlation through `sliding_window_view`, and the transposed convolution through its
textbook identity (pad by k-1, flip the kernel, swap in/out channels within each group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class Layer:
    """A conv/linear layer spec: PyTorch's weight layout follows from these fields."""

    kind: str  # "linear", "conv", "conv_transpose"
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_channels, self.in_channels)
        if self.kind == "conv":
            return (self.out_channels, self.in_channels // self.groups, *self.kernel)
        return (self.in_channels, self.out_channels // self.groups, *self.kernel)


def conv_nd(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """PyTorch Conv{1,2,3}d, stride 1, no padding: x (N, Cin, *L), w (Cout, Cin/g, *k)."""
    nd = w.ndim - 2
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    windows = sliding_window_view(x, w.shape[2:], axis=tuple(range(2, 2 + nd)))
    out_spatial = windows.shape[2 : 2 + nd]
    windows = windows.reshape(n, groups, c_in // groups, *out_spatial, -1)
    wg = w.reshape(groups, c_out // groups, c_in // groups, -1)
    y = np.einsum("ngi...k,goik->ngo...", windows, wg)
    return y.reshape(n, c_out, *out_spatial)


def conv_transpose_nd(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """PyTorch ConvTranspose{1,2,3}d, stride 1, no padding: w (Cin, Cout/g, *k)."""
    nd = w.ndim - 2
    c_in, per_out = w.shape[:2]
    kernel = w.shape[2:]
    padded = np.pad(x, [(0, 0), (0, 0)] + [(k - 1, k - 1) for k in kernel])
    flipped = np.flip(w, axis=tuple(range(2, 2 + nd)))
    # (g, Cin/g, Cout/g, *k) -> (g, Cout/g, Cin/g, *k) -> (Cout, Cin/g, *k)
    wg = flipped.reshape(groups, c_in // groups, per_out, *kernel).swapaxes(1, 2)
    return conv_nd(padded, wg.reshape(groups * per_out, c_in // groups, *kernel), groups)


def layer_apply(layer: Layer, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if layer.kind == "linear":
        y = x @ w.T
    elif layer.kind == "conv":
        y = conv_nd(x, w, layer.groups)
    else:
        y = conv_transpose_nd(x, w, layer.groups)
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape(-1, *(1,) * (y.ndim - 2))
    return y


def bn_eval(z: np.ndarray, mean, var, gamma, beta, eps: float) -> np.ndarray:
    shape = (-1, *(1,) * (z.ndim - 2))
    y = (z - np.asarray(mean, np.float64).reshape(shape)) / np.sqrt(
        np.asarray(var, np.float64).reshape(shape) + eps
    )
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(shape)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(shape)
    return y


def layer_state(
    prefix: str, layer: Layer, rng: np.random.Generator, dtype=np.float32
) -> dict[str, np.ndarray]:
    state = {f"{prefix}.weight": rng.standard_normal(layer.weight_shape).astype(dtype)}
    if layer.bias:
        state[f"{prefix}.bias"] = rng.standard_normal(layer.out_channels).astype(dtype)
    return state


def bn_state(
    prefix: str, channels: int, rng: np.random.Generator, affine: bool = True, dtype=np.float32
) -> dict[str, np.ndarray]:
    """PyTorch's BatchNorm state-dict entries, in its key order."""
    state = {}
    if affine:
        state[f"{prefix}.weight"] = rng.uniform(-2, 2, channels).astype(dtype)
        state[f"{prefix}.bias"] = rng.standard_normal(channels).astype(dtype)
    state[f"{prefix}.running_mean"] = rng.standard_normal(channels).astype(dtype)
    state[f"{prefix}.running_var"] = rng.uniform(0.05, 3.0, channels).astype(dtype)
    state[f"{prefix}.num_batches_tracked"] = np.array(100, dtype=np.int64)
    return state


def random_input(layer: Layer, rng: np.random.Generator, batch: int = 2) -> np.ndarray:
    if layer.kind == "linear":
        return rng.standard_normal((batch, layer.in_channels))
    spatial = tuple(k + 2 for k in layer.kernel)
    return rng.standard_normal((batch, layer.in_channels, *spatial))


def leaf(state, prefix: str, name: str):
    return state.get(f"{prefix}.{name}")


def original_output(state, layer: Layer, conv: str, bn: str, x: np.ndarray, eps=1e-5):
    z = layer_apply(layer, x, state[f"{conv}.weight"], leaf(state, conv, "bias"))
    return bn_eval(
        z,
        state[f"{bn}.running_mean"],
        state[f"{bn}.running_var"],
        leaf(state, bn, "weight"),
        leaf(state, bn, "bias"),
        eps,
    )


def folded_output(folded, layer: Layer, conv: str, x: np.ndarray):
    return layer_apply(layer, x, folded[f"{conv}.weight"], folded[f"{conv}.bias"])


#: Layers as PyTorch models use them (weight layouts follow from the specs).
LAYERS: dict[str, Layer] = {
    "linear": Layer("linear", 5, 7),
    "linear_nobias": Layer("linear", 6, 4, bias=False),
    "conv1d": Layer("conv", 3, 6, (3,)),
    "conv2d": Layer("conv", 3, 8, (3, 3)),
    "conv2d_nobias": Layer("conv", 4, 6, (3, 2), bias=False),
    "conv2d_grouped": Layer("conv", 6, 9, (3, 3), groups=3, bias=False),
    "conv2d_depthwise": Layer("conv", 5, 10, (3, 3), groups=5, bias=False),
    "conv3d": Layer("conv", 2, 4, (2, 3, 2)),
    "conv_transpose1d": Layer("conv_transpose", 4, 6, (3,)),
    "conv_transpose2d_groups": Layer("conv_transpose", 6, 8, (3, 2), groups=2, bias=False),
    "conv_transpose3d_groups": Layer("conv_transpose", 6, 9, (2, 2, 2), groups=3),
}
