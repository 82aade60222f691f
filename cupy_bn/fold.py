"""Folding eval-mode batch norm into the conv / linear / conv-transpose layer before it.

In eval mode batch norm is a per-channel affine map, `y = (z - mean) * s + beta` with
`s = gamma / sqrt(running_var + eps)`, applied to the layer output `z = W * x + b`. Both maps
are linear in the output channel, so they compose into one layer:

    W' = W * s   (per output channel)        b' = (b - mean) * s + beta

A missing layer bias counts as zero (the folded layer gets one); `affine=False` batch norm has
`gamma = 1, beta = 0`. Everything is computed in float64 and stored in the layer's dtypes.

Weight layouts are PyTorch's: Linear `(out, in)`, Conv1d/2d/3d `(out, in/groups, *k)`,
ConvTranspose1d/2d/3d `(in, out/groups, *k)`. For a transposed convolution with `groups > 1`,
output channel `g * (out/groups) + j` is column `j` of the rows of group `g`, so the scale is
applied per (group, column), not along axis 1 alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
"""State-dict entries of a PyTorch batch-norm module (all removed once it is folded)."""


class FoldError(ValueError):
    """The arrays cannot be folded as asked (the message names the offending array or module)."""


class FoldDtypeError(FoldError, TypeError):
    """An array has a dtype that cannot be folded (integer, bool, complex, object)."""


@dataclass(frozen=True)
class FoldedPair:
    """One batch norm folded into one layer by `fold_state_dict`."""

    layer: str
    """Prefix of the layer in the state dict (`"features.0"`); `""` for top-level keys."""
    bn: str
    """Prefix of the batch-norm module that was folded and removed."""
    kind: str
    """`linear`, `conv1d`..`conv3d`, `conv_transpose1d`..`conv_transpose3d`."""
    channels: int
    """Output channels of the layer (= batch-norm features)."""
    groups: int
    """Groups used for the fold (matters for transposed convolutions only)."""
    created_bias: bool
    """True when the layer had no bias and the folded one was added."""
    explicit: bool
    """True when the pair was given by the caller, False when found by the pairing rule."""


@dataclass
class FoldReport:
    """What `fold_state_dict` did: the pairs it folded and the batch norms it left alone."""

    pairs: list[FoldedPair] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)
    eps: float = 1e-5


def _float_array(name: str, value: ArrayLike) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise FoldDtypeError(f"{name}: expected a floating-point array, got dtype {array.dtype}")
    return array


def _check_eps(eps: float) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise FoldError(f"eps: expected a positive number, got {eps!r}") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise FoldError(f"eps: expected a positive finite number, got {eps!r}")
    return eps


def _channel_vector(name: str, value: ArrayLike, channels: int) -> np.ndarray:
    vector = _float_array(name, value)
    if vector.shape != (channels,):
        raise FoldError(f"{name}: expected shape ({channels},), got {vector.shape}")
    if not np.all(np.isfinite(vector)):
        bad = np.flatnonzero(~np.isfinite(vector))[:5].tolist()
        raise FoldError(f"{name}: non-finite values at channels {bad}")
    return vector


def _bn_scale_shift(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    channels: int,
    names: Mapping[str, str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate batch-norm statistics; return float64 (scale, mean, beta)."""
    eps = _check_eps(eps)
    mean = _channel_vector(names["running_mean"], running_mean, channels).astype(np.float64)
    var = _channel_vector(names["running_var"], running_var, channels).astype(np.float64)
    if np.any(var < 0):
        bad = np.flatnonzero(var < 0)[:5].tolist()
        raise FoldError(f"{names['running_var']}: negative variance at channels {bad}")
    g = (
        np.ones(channels)
        if gamma is None
        else _channel_vector(names["gamma"], gamma, channels).astype(np.float64)
    )
    b = (
        np.zeros(channels)
        if beta is None
        else _channel_vector(names["beta"], beta, channels).astype(np.float64)
    )
    return g / np.sqrt(var + eps), mean, b


def _store(name: str, value64: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        stored = value64.astype(dtype)
    if not np.all(np.isfinite(stored)) and np.all(np.isfinite(value64)):
        raise FoldError(f"{name}: folded values overflow {np.dtype(dtype).name}")
    return stored


def fold_conv_bn(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode batch norm into the convolution before it; return `(weight, bias)`.

    `weight` is `(out, in/groups, *k)`, or `(in, out/groups, *k)` with `transpose=True`
    (PyTorch's ConvTranspose layout; then `groups` must be the layer's groups). Rank 2
    (a linear layer or a 1x1 convolution without spatial axes) through 5 is accepted.
    `bias=None` means no bias; `gamma=None`/`beta=None` mean `affine=False` (1 and 0).
    The result is computed in float64; the weight keeps its dtype, the bias keeps its dtype
    (the weight's when it is created). Raises `FoldError` naming the argument on bad input.
    """
    names = {
        "weight": "weight",
        "bias": "bias",
        "running_mean": "running_mean",
        "running_var": "running_var",
        "gamma": "gamma",
        "beta": "beta",
    }
    return _fold(
        weight, bias, running_mean, running_var, gamma, beta, eps, transpose, groups, names
    )


def _fold(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    eps: float,
    transpose: bool,
    groups: int,
    names: Mapping[str, str],
) -> tuple[np.ndarray, np.ndarray]:
    """`fold_conv_bn`, with error messages naming the arrays by `names`."""
    w = _float_array(names["weight"], weight)
    if not 2 <= w.ndim <= 5:
        raise FoldError(f"{names['weight']}: expected rank 2 to 5, got shape {w.shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise FoldError(f"groups: expected a positive integer, got {groups!r}")
    groups = int(groups)
    if transpose:
        if w.ndim < 3:
            raise FoldError(
                f"{names['weight']}: a transposed convolution has rank 3 to 5, got {w.shape}"
            )
        if w.shape[0] % groups:
            raise FoldError(
                f"{names['weight']}: {w.shape[0]} input channels (axis 0) are not divisible "
                f"by groups={groups}"
            )
        channels = w.shape[1] * groups
    else:
        channels = w.shape[0]
        if channels % groups:
            raise FoldError(
                f"{names['weight']}: {channels} output channels are not divisible by "
                f"groups={groups}"
            )
    scale, mean, beta64 = _bn_scale_shift(
        running_mean, running_var, gamma, beta, eps, channels, names
    )
    if bias is None:
        b64 = np.zeros(channels)
        bias_dtype = w.dtype
    else:
        b = _float_array(names["bias"], bias)
        if b.shape != (channels,):
            raise FoldError(f"{names['bias']}: expected shape ({channels},), got {b.shape}")
        b64 = b.astype(np.float64)
        bias_dtype = b.dtype

    w64 = w.astype(np.float64)
    kernel_ones = (1,) * (w.ndim - 2)
    if transpose:
        per_group = w64.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        per_group = per_group * scale.reshape(groups, 1, w.shape[1], *kernel_ones)
        folded_w = per_group.reshape(w.shape)
    else:
        folded_w = w64 * scale.reshape(channels, 1, *kernel_ones)
    folded_b = (b64 - mean) * scale + beta64
    return (
        _store(names["weight"], folded_w, w.dtype),
        _store(names["bias"], folded_b, bias_dtype),
    )


def fold_linear_bn(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode `BatchNorm1d` into the `Linear` layer before it (`weight` `(out, in)`).

    Same conventions as `fold_conv_bn`; returns `(weight, bias)`.
    """
    w = _float_array("weight", weight)
    if w.ndim != 2:
        raise FoldError(f"weight: a linear layer's weight is (out, in), got shape {w.shape}")
    return fold_conv_bn(w, bias, running_mean, running_var, gamma, beta, eps)


# ---------------------------------------------------------------------------------------------
# Whole state dicts


def _split(key: str) -> tuple[str, str]:
    prefix, _, leaf = key.rpartition(".")
    return prefix, leaf


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _display(prefix: str) -> str:
    return prefix if prefix else "<top level>"


def _kind(rank: int, transpose: bool) -> str:
    if rank == 2:
        return "linear"
    return f"conv_transpose{rank - 2}d" if transpose else f"conv{rank - 2}d"


def _normalize_pairs(
    pairs: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> list[tuple[str, str]]:
    if pairs is None:
        return []
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    result = []
    for item in items:
        try:
            layer, bn = item
        except (TypeError, ValueError):
            raise FoldError(f"pairs: expected (layer, bn) name pairs, got {item!r}") from None
        if not isinstance(layer, str) or not isinstance(bn, str):
            raise FoldError(f"pairs: expected (layer, bn) name pairs, got {item!r}")
        result.append((layer, bn))
    return result


def fold_state_dict(
    state_dict: Mapping[str, ArrayLike],
    *,
    pairs: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    transpose: Iterable[str] = (),
    groups: Mapping[str, int] | None = None,
    eps: float = 1e-5,
    keep_unpaired: bool = False,
) -> tuple[dict[str, np.ndarray], FoldReport]:
    """Fold every batch norm of a PyTorch-style state dict into the layer before it.

    Batch norms are the key prefixes with both `running_mean` and `running_var` (`weight` and
    `bias` optional: `affine=False`). Layers are the other prefixes with a `weight` of rank 2-5.
    Each batch norm with `C` features is paired with the nearest layer before it in key order
    whose output channel count is `C` (`weight.shape[0]`; for names in `transpose`,
    `weight.shape[1] * groups`). If that layer already has a batch norm, or there is none, the
    batch norm is unpaired: an error naming it, unless `keep_unpaired=True` keeps its keys.

    `pairs` maps layer prefix -> batch-norm prefix and is applied first; the rest are paired by
    the rule. `transpose` names ConvTranspose layers, whose weight is `(in, out/groups, *k)`;
    `groups` maps layer prefix -> groups (for a transposed convolution without an entry, groups
    follow from the pairing: `C / weight.shape[1]`). `eps` is the batch norms' epsilon.

    Returns `(folded, report)`: `folded` keeps every key in order except the folded batch
    norms' (a created bias follows its weight); the input is not modified.
    """
    items: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise FoldError(f"state_dict: keys must be strings, got {key!r}")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise FoldDtypeError(f"{key}: object arrays cannot be folded")
        items[key] = array
    eps = _check_eps(eps)
    transpose_names = list(transpose)
    group_map = dict(groups or {})
    explicit = _normalize_pairs(pairs)

    # Modules by prefix, positioned by their first key.
    position: dict[str, int] = {}
    leaves: dict[str, dict[str, str]] = {}
    for index, key in enumerate(items):
        prefix, leaf = _split(key)
        position.setdefault(prefix, index)
        leaves.setdefault(prefix, {})[leaf] = key

    bns: list[str] = []
    for prefix, own in leaves.items():
        has_mean, has_var = "running_mean" in own, "running_var" in own
        if has_mean != has_var:
            present, missing = ("running_mean", "running_var")[:: 1 if has_mean else -1]
            raise FoldError(
                f"{_join(prefix, present)}: batch norm {_display(prefix)!r} has {present} "
                f"but no {missing}"
            )
        if has_mean:
            bns.append(prefix)
    bn_set = set(bns)
    layers = [
        p
        for p, own in leaves.items()
        if p not in bn_set and "weight" in own and 2 <= items[own["weight"]].ndim <= 5
    ]
    layer_set = set(layers)

    for name in transpose_names:
        if name not in layer_set:
            raise FoldError(f"transpose: {name!r} is not a layer with a weight of rank 3-5")
        if items[leaves[name]["weight"]].ndim < 3:
            raise FoldError(f"transpose: {name!r} has a rank-2 weight (a linear layer)")
    for name, g in group_map.items():
        if name not in layer_set:
            raise FoldError(f"groups: {name!r} is not a layer with a weight of rank 2-5")
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise FoldError(f"groups: {name!r} needs a positive integer, got {g!r}")
    transpose_set = set(transpose_names)

    def bn_channels(bn: str) -> int:
        key = leaves[bn]["running_mean"]
        shape = items[key].shape
        if len(shape) != 1:
            raise FoldError(f"{key}: expected a vector of per-channel values, got shape {shape}")
        return shape[0]

    def layer_groups(layer: str, channels: int) -> int | None:
        """Groups for which `layer` has `channels` outputs, or None if it cannot."""
        shape = items[leaves[layer]["weight"]].shape
        if layer not in transpose_set:
            return group_map.get(layer, 1) if shape[0] == channels else None
        if layer in group_map:
            return group_map[layer] if shape[1] * group_map[layer] == channels else None
        if channels % shape[1] == 0 and shape[0] % (channels // shape[1]) == 0:
            return channels // shape[1]
        return None

    paired: dict[str, tuple[str, int, bool]] = {}  # bn -> (layer, groups, explicit)
    layer_owner: dict[str, str] = {}
    for layer, bn in explicit:
        if layer not in layer_set:
            raise FoldError(f"pairs: {layer!r} is not a layer with a weight of rank 2-5")
        if bn not in bn_set:
            raise FoldError(f"pairs: {bn!r} is not a batch norm (no running_mean/running_var)")
        if bn in paired:
            raise FoldError(f"pairs: batch norm {bn!r} is paired twice")
        if layer in layer_owner:
            raise FoldError(f"pairs: layer {layer!r} is paired with two batch norms")
        channels = bn_channels(bn)
        g = layer_groups(layer, channels)
        if g is None:
            shape = items[leaves[layer]["weight"]].shape
            raise FoldError(
                f"pairs: layer {layer!r} (weight {shape}) does not have the {channels} output "
                f"channels of batch norm {bn!r}"
            )
        paired[bn] = (layer, g, True)
        layer_owner[layer] = bn

    unpaired: list[str] = []
    reasons: list[str] = []
    for bn in bns:
        if bn in paired:
            continue
        channels = bn_channels(bn)
        candidates = [p for p in layers if position[p] < position[bn]]
        found = None
        for layer in reversed(candidates):
            g = layer_groups(layer, channels)
            if g is not None:
                found = (layer, g)
                break
        if found is None:
            reason = f"no layer before it has {channels} output channels"
        elif found[0] in layer_owner:
            reason = (
                f"the nearest layer with {channels} output channels, {found[0]!r}, "
                f"already has batch norm {layer_owner[found[0]]!r}"
            )
            found = None
        if found is None:
            unpaired.append(bn)
            reasons.append(f"batch norm {_display(bn)!r}: {reason}")
            continue
        paired[bn] = (found[0], found[1], False)
        layer_owner[found[0]] = bn
    if unpaired and not keep_unpaired:
        raise FoldError(
            "unpaired batch norm: "
            + "; ".join(reasons)
            + " (pair it explicitly, or keep it unfolded)"
        )

    replacements: dict[str, np.ndarray] = {}
    created_after: dict[str, tuple[str, np.ndarray]] = {}
    removed: set[str] = set()
    report = FoldReport(unpaired=unpaired, eps=eps)
    for bn in bns:
        if bn not in paired:
            continue
        layer, g, was_explicit = paired[bn]
        own, bn_own = leaves[layer], leaves[bn]
        weight_key = own["weight"]
        bias_key = own.get("bias")
        is_transpose = layer in transpose_set
        weight = items[weight_key]
        channels = bn_channels(bn)
        names = {
            "weight": weight_key,
            "bias": bias_key or _join(layer, "bias"),
            "running_mean": bn_own["running_mean"],
            "running_var": bn_own["running_var"],
            "gamma": _join(bn, "weight"),
            "beta": _join(bn, "bias"),
        }
        new_w, new_b = _fold(
            weight,
            items[bias_key] if bias_key else None,
            items[bn_own["running_mean"]],
            items[bn_own["running_var"]],
            items[bn_own["weight"]] if "weight" in bn_own else None,
            items[bn_own["bias"]] if "bias" in bn_own else None,
            eps,
            is_transpose,
            g,
            names,
        )
        replacements[weight_key] = new_w
        if bias_key:
            replacements[bias_key] = new_b
        else:
            created_after[weight_key] = (_join(layer, "bias"), new_b)
        removed.update(bn_own[leaf] for leaf in BN_KEYS if leaf in bn_own)
        report.pairs.append(
            FoldedPair(
                layer=layer,
                bn=bn,
                kind=_kind(weight.ndim, is_transpose),
                channels=channels,
                groups=g,
                created_bias=bias_key is None,
                explicit=was_explicit,
            )
        )

    folded: dict[str, np.ndarray] = {}
    for key, value in items.items():
        if key in removed:
            continue
        folded[key] = replacements.get(key, value)
        if key in created_after:
            bias_key, bias = created_after[key]
            folded[bias_key] = bias
    report.pairs.sort(key=lambda p: position[p.layer])
    return folded, report
