"""Checking the algebra of each folded pair: layer + eval-mode batch norm vs the folded layer.

This verifies that each pair was folded correctly, not that the pair exists in the model: a
state dict holds no graph, so which batch norm follows which layer comes from
`cupy_bn.fold.pairing` (stated, recorded, proven or confirmed), never from this check.

Both sides run a float64 NumPy reference of the layer (linear map, or a stride-1, padding-free
convolution / transposed convolution with groups) on the same random input. The fold acts per
output channel, so this small correlation exercises every folded weight and bias.

The folded weights are stored in the model's dtype, so the two sides differ by that rounding:
at most `u * sum(|x| * |w'|) + u * |b'|` per output (`u` = half the dtype's machine epsilon),
plus float64 rounding. A pair passes when every output is within twice that bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cupy_bn.fold.algebra import FoldError
from cupy_bn.fold.pairing import join
from cupy_bn.fold.state_dict import FoldReport
from cupy_bn.jsonable import jsonable
from cupy_bn.validation import check_seed


@dataclass(frozen=True)
class PairCheck:
    """Result of checking one folded pair."""

    layer: str
    bn: str
    max_abs_error: float
    """Largest |original - folded| over all outputs."""
    max_abs_output: float
    """Largest |original| (for scale)."""
    error_to_bound: float
    """Largest error divided by its rounding bound; the pair passes when this is <= 1."""

    @property
    def ok(self) -> bool:
        return bool(self.error_to_bound <= 1.0)

    def to_json(self) -> dict[str, Any]:
        """The fields above and `ok`, as plain JSON values (None for a non-finite error)."""
        return jsonable({**dataclasses.asdict(self), "ok": self.ok})


def layer_forward(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> np.ndarray:
    """Float64 reference of a PyTorch layer with stride 1, no padding, no dilation.

    Linear: `x (N, in)`, `weight (out, in)`. Convolution: `x (N, in, *L)`,
    `weight (out, in/groups, *k)`, output `(N, out, *(L-k+1))`. Transposed convolution:
    `weight (in, out/groups, *k)`, output `(N, out, *(L+k-1))`.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 2:
        y = x @ w.T
    elif transpose:
        y = _transposed_correlation(x, w, groups)
    else:
        y = _correlation(x, w, groups)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(-1, *(1,) * (y.ndim - 2))
    return y


def _correlation(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    n, c_in, *length = x.shape
    c_out, per_group_in, *kernel = w.shape
    out_len = [n_i - k_i + 1 for n_i, k_i in zip(length, kernel, strict=True)]
    xg = x.reshape(n, groups, per_group_in, *length)
    wg = w.reshape(groups, c_out // groups, per_group_in, *kernel)
    y = np.zeros((n, groups, c_out // groups, *out_len))
    for offset in np.ndindex(*kernel):
        window = (Ellipsis, *(slice(o, o + m) for o, m in zip(offset, out_len, strict=True)))
        y += np.einsum("ngi...,goi->ngo...", xg[window], wg[(Ellipsis, *offset)])
    return y.reshape(n, c_out, *out_len)


def _transposed_correlation(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    n, c_in, *length = x.shape
    _, per_group_out, *kernel = w.shape
    out_len = [n_i + k_i - 1 for n_i, k_i in zip(length, kernel, strict=True)]
    xg = x.reshape(n, groups, c_in // groups, *length)
    wg = w.reshape(groups, c_in // groups, per_group_out, *kernel)
    y = np.zeros((n, groups, per_group_out, *out_len))
    for offset in np.ndindex(*kernel):
        window = (Ellipsis, *(slice(o, o + m) for o, m in zip(offset, length, strict=True)))
        y[window] += np.einsum("ngi...,gio->ngo...", xg, wg[(Ellipsis, *offset)])
    return y.reshape(n, groups * per_group_out, *out_len)


def bn_eval_forward(
    z: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
) -> np.ndarray:
    """Float64 eval-mode batch norm over axis 1: `(z - mean) / sqrt(var + eps) * gamma + beta`."""
    shape = (-1, *(1,) * (z.ndim - 2))
    y = (z - np.asarray(running_mean, np.float64).reshape(shape)) / np.sqrt(
        np.asarray(running_var, np.float64).reshape(shape) + eps
    )
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64).reshape(shape)
    if beta is not None:
        y = y + np.asarray(beta, np.float64).reshape(shape)
    return y


def _leaf(state: Mapping[str, np.ndarray], prefix: str, leaf: str) -> np.ndarray | None:
    return state.get(join(prefix, leaf))


def verify_fold(
    original: Mapping[str, np.ndarray],
    folded: Mapping[str, np.ndarray],
    report: FoldReport,
    *,
    seed: int = 0,
    batch: int = 2,
) -> list[PairCheck]:
    """Check every pair of `report` (from `fold_state_dict(original)`) on random input.

    `seed` (an integer >= 0) seeds the input; anything else raises `FoldError`.
    """
    rng = np.random.default_rng(check_seed(seed, FoldError))
    checks = []
    for pair in report.pairs:
        weight = original[join(pair.layer, "weight")]
        new_weight = folded[join(pair.layer, "weight")]
        new_bias = _leaf(folded, pair.layer, "bias")
        transpose = pair.kind.startswith("conv_transpose")
        kernel = weight.shape[2:]
        in_channels = weight.shape[0] if transpose else weight.shape[1] * pair.groups
        if weight.ndim == 2:
            in_channels = weight.shape[1]
        spatial = tuple(2 for _ in kernel) if transpose else tuple(k + 1 for k in kernel)
        x = rng.standard_normal((batch, in_channels, *spatial))
        z = layer_forward(
            x,
            weight,
            _leaf(original, pair.layer, "bias"),
            transpose=transpose,
            groups=pair.groups,
        )
        expected = bn_eval_forward(
            z,
            _leaf(original, pair.bn, "running_mean"),
            _leaf(original, pair.bn, "running_var"),
            _leaf(original, pair.bn, "weight"),
            _leaf(original, pair.bn, "bias"),
            pair.eps,
        )
        got = layer_forward(x, new_weight, new_bias, transpose=transpose, groups=pair.groups)
        magnitude = layer_forward(
            np.abs(x),
            np.abs(new_weight.astype(np.float64)),
            np.abs(new_bias.astype(np.float64)),
            transpose=transpose,
            groups=pair.groups,
        )
        fan_in = int(np.prod(weight.shape[1:]))
        if transpose:
            fan_in = weight.shape[0] * int(np.prod(kernel))
        unit = float(np.finfo(new_weight.dtype).eps)
        bound = (unit + (fan_in + 8) * np.finfo(np.float64).eps) * magnitude
        error = np.abs(expected - got)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(error == 0, 0.0, error / bound)
        checks.append(
            PairCheck(
                layer=pair.layer,
                bn=pair.bn,
                max_abs_error=float(np.max(error)) if error.size else 0.0,
                max_abs_output=float(np.max(np.abs(expected))) if expected.size else 0.0,
                error_to_bound=float(np.max(ratio)) if ratio.size else 0.0,
            )
        )
    return checks
