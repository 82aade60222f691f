"""Which batch norm of a state dict folds into which layer, and how that is known.

A state dict holds parameters, not the graph: activations, additions and concatenations have
no keys, so nothing in the file says that a batch norm takes the output of a given layer. A
pair is folded only when one of these establishes it (checked in this order):

- **explicit**: the caller names it (`pairs={"layer": "bn"}`, `cupy-bn fold --pair LAYER=BN`).
- **recorded**: the file carries the model author's own list under `FOLD_RECORD_KEY`
  (`cupy_bn.fold.record`).
- **proven**: the layer and the batch norm are consecutive numbered children of one container,
  `P.n` and `P.(n+1)` (`features.3` -> `features.4`). In an `nn.Sequential` every child, an
  activation too, takes an index of its own, so consecutive indices leave nothing between the
  two. This is the one assumption made without being told: numbered containers run their
  children in order (`nn.Sequential`). A `ModuleList` whose own `forward` does something
  between its items looks the same in a state dict; pair such models explicitly.
- **confirmed**: the caller states that the file's key order is the data flow
  (`assume_sequential=True`, `--assume-sequential`): each batch norm takes the output of the
  module whose keys come just before its own, with nothing between them. Where the file shows
  otherwise, the statement does not hold and the pair stays unresolved: numbered siblings
  `P.n` and `P.m` with `m > n + 1` have a module without parameters between them (`P.(n+1)`,
  an activation or a pooling).

Every other batch norm is unresolved: `decide_pairs` returns it with the layer it would be
paired with under the key-order assumption, so a caller can show the proposal and ask.

A rank-3..5 weight `(a, b, *k)` fits a convolution with `C` outputs when `a == C`, and a
ConvTranspose with `C` outputs when `b * g == C` for groups `g` dividing `a`. Both readings fit
whenever `b` divides `C = a` (every Conv2d(64, 64), every depthwise convolution), and folding a
ConvTranspose as a convolution scales the wrong axis. So the kind of a layer is taken:
- as stated (`transpose=`/`--transpose`, or the record);
- as the only reading that fits;
- or, where both fit, as a convolution only for explicit and confirmed pairs, noted in the
  pair's `assumption`; a proven pair with an ambiguous weight stays unresolved.
A rank-2 weight is a linear layer `(out, in)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cupy_bn.fold.algebra import FoldDtypeError, FoldError

EXPLICIT, RECORDED, PROVEN, CONFIRMED = "explicit", "recorded", "proven", "confirmed"
"""How a pair was established (`FoldedPair.established`)."""

_NUMBERED = re.compile(r"^(?:(?P<container>.*)\.)?(?P<index>\d+)$")


def display(prefix: str) -> str:
    """A module prefix for messages (`""` is the state dict's top level)."""
    return prefix if prefix else "<top level>"


def join(prefix: str, leaf: str) -> str:
    """The state-dict key of `leaf` in module `prefix`."""
    return f"{prefix}.{leaf}" if prefix else leaf


@dataclass(frozen=True)
class StateIndex:
    """The modules of a state dict: each key prefix with its leaves, in key order."""

    arrays: dict[str, np.ndarray]
    modules: dict[str, dict[str, str]]
    """Prefix -> {leaf name -> key}; prefixes in the order of their first key."""
    bns: list[str]
    """Batch norms: prefixes with `running_mean` and `running_var`."""
    layers: list[str]
    """Other prefixes with a `weight` of rank 2 to 5."""

    def weight_shape(self, layer: str) -> tuple[int, ...]:
        return self.arrays[self.modules[layer]["weight"]].shape

    def channels(self, bn: str) -> int:
        key = self.modules[bn]["running_mean"]
        shape = self.arrays[key].shape
        if len(shape) != 1:
            raise FoldError(f"{key}: expected a vector of per-channel values, got shape {shape}")
        return shape[0]

    def module_before(self, prefix: str) -> str | None:
        """The module whose keys come just before those of `prefix`."""
        order = list(self.modules)
        position = order.index(prefix)
        return order[position - 1] if position else None


def index_state_dict(state_dict: Mapping[str, object], skip: Iterable[str] = ()) -> StateIndex:
    """Group the keys of `state_dict` by module prefix; find batch norms and layers."""
    skipped = set(skip)
    arrays: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise FoldError(f"state_dict: keys must be strings, got {key!r}")
        if key in skipped:
            continue
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise FoldDtypeError(f"{key}: object arrays cannot be folded")
        arrays[key] = array
    modules: dict[str, dict[str, str]] = {}
    for key in arrays:
        prefix, _, leaf = key.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = key
    bns = []
    for prefix, own in modules.items():
        has_mean, has_var = "running_mean" in own, "running_var" in own
        if has_mean != has_var:
            present, missing = ("running_mean", "running_var")[:: 1 if has_mean else -1]
            raise FoldError(
                f"{join(prefix, present)}: batch norm {display(prefix)!r} has {present} "
                f"but no {missing}"
            )
        if has_mean:
            bns.append(prefix)
    bn_set = set(bns)
    layers = [
        prefix
        for prefix, own in modules.items()
        if prefix not in bn_set and "weight" in own and 2 <= arrays[own["weight"]].ndim <= 5
    ]
    return StateIndex(arrays, modules, bns, layers)


@dataclass(frozen=True)
class PairStatement:
    """A pair as the caller or the file's record states it; `None` fields are not stated."""

    layer: str
    bn: str
    transpose: bool | None = None
    groups: int | None = None
    eps: float | None = None


@dataclass(frozen=True)
class Pair:
    """A pair decided by `decide_pairs`, with the layer's kind and how the pair is known."""

    layer: str
    bn: str
    transpose: bool
    groups: int
    eps: float | None
    """The batch norm's epsilon when recorded; `None` means the caller's default."""
    established: str
    """`explicit`, `recorded`, `proven` or `confirmed` (see the module docstring)."""
    assumption: str | None
    """What was assumed about the layer's kind, or `None` when it was stated or certain."""


@dataclass(frozen=True)
class Unresolved:
    """A batch norm that no statement or proof pairs with a layer."""

    bn: str
    candidate: str | None
    """The layer it would fold into under the key-order assumption (`None`: no such layer)."""
    reason: str

    def to_json(self) -> dict[str, str | None]:
        """`bn`, `would_pair_with` (the candidate) and `reason`."""
        return {"bn": self.bn, "would_pair_with": self.candidate, "reason": self.reason}


@dataclass(frozen=True)
class _Kind:
    transpose: bool
    groups: int
    assumption: str | None = None


def _transpose_groups(shape: tuple[int, ...], channels: int, groups: int | None) -> int | None:
    """Groups with which a ConvTranspose weight `(in, out/g, *k)` has `channels` outputs."""
    if groups is not None:
        return groups if shape[1] * groups == channels and shape[0] % groups == 0 else None
    if channels % shape[1] == 0 and shape[0] % (channels // shape[1]) == 0:
        return channels // shape[1]
    return None


def _readings(shape: tuple[int, ...], channels: int, groups: int | None) -> list[_Kind]:
    """The kinds of layer whose weight `shape` gives `channels` outputs."""
    readings = []
    if shape[0] == channels:
        readings.append(_Kind(False, groups or 1))
    if len(shape) >= 3:
        g = _transpose_groups(shape, channels, groups)
        if g is not None:
            readings.append(_Kind(True, g))
    return readings


def _layer_kind(
    index: StateIndex,
    layer: str,
    bn: str,
    transpose: bool | None,
    groups: int | None,
    allow_assumption: bool,
) -> _Kind | str:
    """The kind of `layer` folded with `bn`, or the reason it cannot be decided."""
    shape = index.weight_shape(layer)
    channels = index.channels(bn)
    readings = _readings(shape, channels, groups)
    if transpose is not None:
        stated = [k for k in readings if k.transpose == transpose]
        if stated:
            return stated[0]
        what = "ConvTranspose" if transpose else "convolution"
        extra = f" with groups={groups}" if groups is not None else ""
        return (
            f"as a {what}{extra}, {display(layer)!r} (weight {shape}) does not have "
            f"{channels} outputs"
        )
    if not readings:
        return f"{display(layer)!r} (weight {shape}) does not have {channels} output channels"
    if len(readings) == 1:
        return readings[0]
    conv, transposed = readings
    ambiguity = (
        f"its weight {shape} fits a convolution and a ConvTranspose with groups={transposed.groups}"
    )
    if not allow_assumption:
        return ambiguity
    return _Kind(False, conv.groups, f"convolution ({ambiguity}; not named as a ConvTranspose)")


def proven_predecessor(bn: str) -> str | None:
    """`P.n` for a batch norm `P.(n+1)`: the numbered sibling just before it, if any."""
    match = _NUMBERED.match(bn)
    if match is None or int(match["index"]) == 0 or match["index"] != str(int(match["index"])):
        return None
    return join(match["container"] or "", str(int(match["index"]) - 1))


def skipped_indices(layer: str, bn: str) -> str | None:
    """The first numbered sibling between `P.n` and `P.m` (m > n + 1), which has no keys."""
    a, b = _NUMBERED.match(layer), _NUMBERED.match(bn)
    if a is None or b is None or a["container"] != b["container"]:
        return None
    first, last = int(a["index"]), int(b["index"])
    return join(a["container"] or "", str(first + 1)) if last > first + 1 else None


def _check_statements(index: StateIndex, statements: list[PairStatement], origin: str) -> None:
    layers, bns = set(index.layers), set(index.bns)
    for s in statements:
        if s.layer not in layers:
            raise FoldError(f"{origin}: {s.layer!r} is not a layer with a weight of rank 2-5")
        if s.bn not in bns:
            raise FoldError(f"{origin}: {s.bn!r} is not a batch norm (no running_mean/running_var)")


def decide_pairs(
    index: StateIndex,
    *,
    explicit: Iterable[PairStatement] = (),
    recorded: Iterable[PairStatement] = (),
    transpose: Iterable[str] = (),
    groups: Mapping[str, int] | None = None,
    assume_sequential: bool = False,
) -> tuple[list[Pair], list[Unresolved]]:
    """Pair each batch norm of `index` with its layer, or say why it cannot be.

    `explicit` and `recorded` statements come first (a batch norm in both takes the explicit
    one), then proven pairs, then, with `assume_sequential`, confirmed ones. `transpose` names
    ConvTranspose layers; `groups` gives layers' groups (needed only where a ConvTranspose's
    groups do not follow from its batch norm's channels). Raises `FoldError` for statements
    that name missing modules, pair a module twice, or contradict the weights' shapes.
    """
    group_map = dict(groups or {})
    transpose_set = set(transpose)
    layer_set = set(index.layers)
    for name in transpose_set:
        if name not in layer_set:
            raise FoldError(f"transpose: {name!r} is not a layer with a weight of rank 3-5")
        if len(index.weight_shape(name)) < 3:
            raise FoldError(f"transpose: {name!r} has a rank-2 weight (a linear layer)")
    for name, g in group_map.items():
        if name not in layer_set:
            raise FoldError(f"groups: {name!r} is not a layer with a weight of rank 2-5")
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise FoldError(f"groups: {name!r} needs a positive integer, got {g!r}")

    explicit, recorded = list(explicit), list(recorded)
    _check_statements(index, explicit, "pairs")
    _check_statements(index, recorded, "recorded pairs")
    stated: dict[str, tuple[PairStatement, str]] = {}
    for origin, statements in ((EXPLICIT, explicit), (RECORDED, recorded)):
        seen: set[str] = set()
        for s in statements:
            if s.bn in seen:
                raise FoldError(f"{origin} pairs: batch norm {s.bn!r} is paired twice")
            seen.add(s.bn)
            stated.setdefault(s.bn, (s, origin))

    pairs: dict[str, Pair] = {}
    owner: dict[str, str] = {}  # layer -> bn

    def take(bn: str, layer: str, kind: _Kind, eps: float | None, how: str) -> None:
        pairs[bn] = Pair(layer, bn, kind.transpose, kind.groups, eps, how, kind.assumption)
        owner[layer] = bn

    def stated_kind(layer: str, recorded_transpose: bool | None) -> bool | None:
        return True if layer in transpose_set else recorded_transpose

    for bn in index.bns:
        if bn not in stated:
            continue
        s, how = stated[bn]
        if s.layer in owner:
            raise FoldError(
                f"{how} pairs: layer {s.layer!r} is paired with two batch norms "
                f"({owner[s.layer]!r} and {bn!r})"
            )
        kind = _layer_kind(
            index,
            s.layer,
            bn,
            stated_kind(s.layer, s.transpose),
            group_map.get(s.layer, s.groups),
            allow_assumption=True,
        )
        if isinstance(kind, str):
            raise FoldError(f"{how} pair {s.layer}={bn}: {kind}")
        take(bn, s.layer, kind, s.eps, how)

    unresolved: list[Unresolved] = []
    for bn in index.bns:
        if bn in pairs:
            continue
        before = index.module_before(bn)
        candidate = before if before in layer_set and before not in owner else None
        proof = proven_predecessor(bn)
        if proof is not None and proof in layer_set and proof not in owner:
            kind = _layer_kind(
                index,
                proof,
                bn,
                stated_kind(proof, None),
                group_map.get(proof),
                allow_assumption=assume_sequential,
            )
            if not isinstance(kind, str):
                take(bn, proof, kind, None, PROVEN)
                continue
            if not assume_sequential:
                unresolved.append(Unresolved(bn, proof, f"follows {proof!r}, but {kind}"))
                continue
        if candidate is None:
            reason = _no_candidate_reason(index, bn, before, owner)
            unresolved.append(Unresolved(bn, None, reason))
            continue
        kind = _layer_kind(
            index,
            candidate,
            bn,
            stated_kind(candidate, None),
            group_map.get(candidate),
            allow_assumption=True,
        )
        gap = skipped_indices(candidate, bn)
        if isinstance(kind, str):
            unresolved.append(Unresolved(bn, None, f"the module before it: {kind}"))
        elif gap:
            unresolved.append(
                Unresolved(
                    bn,
                    candidate,
                    f"{display(gap)!r} lies between {display(candidate)!r} and it: a module "
                    "without parameters (an activation, a pooling), so they are not adjacent",
                )
            )
        elif assume_sequential:
            take(bn, candidate, kind, None, CONFIRMED)
        else:
            unresolved.append(Unresolved(bn, candidate, "nothing in the file shows what feeds it"))
    ordered = [pairs[bn] for bn in index.bns if bn in pairs]
    return ordered, unresolved


def _no_candidate_reason(
    index: StateIndex, bn: str, before: str | None, owner: Mapping[str, str]
) -> str:
    if before is None:
        return "no module comes before it"
    if before in owner:
        return f"the layer before it, {before!r}, already has batch norm {owner[before]!r}"
    if before in index.bns:
        return f"the module before it, {before!r}, is a batch norm"
    return f"the module before it, {display(before)!r}, is not a conv/linear layer"
