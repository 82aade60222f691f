"""Folding the batch norms of a PyTorch-style state dict: index, pair, apply.

`fold_state_dict` indexes the keys by module (`pairing.index_state_dict`), decides which batch
norm folds into which layer and how that is known (`pairing.decide_pairs`), then applies the
fold to each pair (`algebra.fold_named`). It never guesses: a batch norm whose layer is not
stated, recorded, proven or confirmed raises `UnresolvedPairsError` listing the pair it would
make, unless `keep_unpaired=True` keeps it unfolded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from cupy_bn.fold.algebra import FoldError, fold_named
from cupy_bn.fold.pairing import (
    Pair,
    PairStatement,
    StateIndex,
    Unresolved,
    decide_pairs,
    display,
    index_state_dict,
    join,
)
from cupy_bn.fold.record import FOLD_RECORD_KEY, read_fold_record
from cupy_bn.jsonable import jsonable
from cupy_bn.validation import check_eps

if TYPE_CHECKING:
    from cupy_bn.fold.check import PairCheck

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
"""State-dict entries of a PyTorch batch-norm module (all removed once it is folded)."""


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
    eps: float
    """The batch norm's epsilon used for the fold."""
    created_bias: bool
    """True when the layer had no bias and the folded one was added."""
    established: str
    """How the pair is known: `explicit`, `recorded`, `proven` or `confirmed`."""
    assumption: str | None = None
    """What was assumed about the layer's kind (`None`: stated or certain)."""

    def to_json(self) -> dict[str, Any]:
        """The fields above under their names, as plain JSON values."""
        return jsonable(self)


@dataclass
class FoldReport:
    """What `fold_state_dict` did: the pairs it folded and the batch norms it kept."""

    pairs: list[FoldedPair] = field(default_factory=list)
    kept: list[Unresolved] = field(default_factory=list)
    """Batch norms left unfolded (`keep_unpaired=True`), with the reason and the proposal."""

    def to_json(self, checks: Iterable[PairCheck] | None = None) -> dict[str, Any]:
        """`pairs` (each `FoldedPair.to_json()`, with its algebra check from `checks` as
        `algebra_max_abs_error`, `algebra_error_to_bound`, `algebra_ok`: None for a pair
        without a check) and `kept` (each `Unresolved.to_json()`)."""
        by_pair = {(c.layer, c.bn): c for c in checks or ()}
        rows = []
        for pair in self.pairs:
            check = by_pair.get((pair.layer, pair.bn))
            rows.append(
                {
                    **pair.to_json(),
                    "algebra_max_abs_error": None if check is None else check.max_abs_error,
                    "algebra_error_to_bound": None if check is None else check.error_to_bound,
                    "algebra_ok": None if check is None else check.ok,
                }
            )
        return jsonable({"pairs": rows, "kept": [u.to_json() for u in self.kept]})


class UnresolvedPairsError(FoldError):
    """Some batch norms have no established layer; `unresolved` lists them with proposals."""

    def __init__(self, unresolved: list[Unresolved]) -> None:
        self.unresolved = unresolved
        described = "; ".join(
            f"{display(u.bn)!r} ({u.reason}"
            + (f"; would pair with {display(u.candidate)!r})" if u.candidate else ")")
            for u in unresolved
        )
        super().__init__(
            f"{len(unresolved)} batch norm(s) without an established layer: {described}. "
            "Name the pairs (pairs=), state that the key order is the data flow "
            "(assume_sequential=True), or keep them unfolded (keep_unpaired=True)"
        )


def _kind(rank: int, transpose: bool) -> str:
    if rank == 2:
        return "linear"
    return f"conv_transpose{rank - 2}d" if transpose else f"conv{rank - 2}d"


def _statements(
    pairs: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> list[PairStatement]:
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
        result.append(PairStatement(layer, bn))
    return result


def _apply(index: StateIndex, pair: Pair, eps: float) -> tuple[np.ndarray, np.ndarray, FoldedPair]:
    """Fold one pair; return the new weight and bias and the report entry."""
    layer, bn = index.modules[pair.layer], index.modules[pair.bn]
    arrays = index.arrays
    weight_key, bias_key = layer["weight"], layer.get("bias")
    eps = eps if pair.eps is None else pair.eps
    names = {
        "weight": weight_key,
        "bias": bias_key or join(pair.layer, "bias"),
        "running_mean": bn["running_mean"],
        "running_var": bn["running_var"],
        "gamma": join(pair.bn, "weight"),
        "beta": join(pair.bn, "bias"),
    }
    new_weight, new_bias = fold_named(
        arrays[weight_key],
        arrays[bias_key] if bias_key else None,
        arrays[bn["running_mean"]],
        arrays[bn["running_var"]],
        arrays[bn["weight"]] if "weight" in bn else None,
        arrays[bn["bias"]] if "bias" in bn else None,
        eps,
        pair.transpose,
        pair.groups,
        names,
    )
    folded = FoldedPair(
        layer=pair.layer,
        bn=pair.bn,
        kind=_kind(arrays[weight_key].ndim, pair.transpose),
        channels=index.channels(pair.bn),
        groups=pair.groups,
        eps=eps,
        created_bias=bias_key is None,
        established=pair.established,
        assumption=pair.assumption,
    )
    return new_weight, new_bias, folded


def fold_state_dict(
    state_dict: Mapping[str, ArrayLike],
    *,
    pairs: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    transpose: Iterable[str] = (),
    groups: Mapping[str, int] | None = None,
    eps: float = 1e-5,
    keep_unpaired: bool = False,
    assume_sequential: bool = False,
) -> tuple[dict[str, np.ndarray], FoldReport]:
    """Fold the batch norms of a PyTorch-style state dict into the layers that feed them.

    Batch norms are the key prefixes with both `running_mean` and `running_var` (`weight` and
    `bias` optional: `affine=False`); layers are the other prefixes with a `weight` of rank
    2-5. A pair is folded only when it is established (`cupy_bn.fold.pairing`): named in
    `pairs` (layer prefix -> batch-norm prefix), recorded in the file under
    `FOLD_RECORD_KEY`, proven by consecutive indices of one container (`features.3` ->
    `features.4`), or, with `assume_sequential=True`, by the key order, which the caller then
    states is the data flow with nothing between a layer and the batch norm after it.

    `transpose` names ConvTranspose layers, whose weight is `(in, out/groups, *k)`; `groups`
    maps layer prefix -> groups (a ConvTranspose without an entry takes
    `channels / weight.shape[1]`). `eps` is the batch norms' epsilon unless recorded.

    Any other batch norm raises `UnresolvedPairsError` (listing each with the layer it would
    be paired with), unless `keep_unpaired=True` keeps its keys. Returns `(folded, report)`:
    `folded` keeps every key in order except the folded batch norms' and the record (a
    created bias follows its weight); the input is not modified.
    """
    eps = check_eps(eps, FoldError)
    index = index_state_dict(state_dict, skip=(FOLD_RECORD_KEY,))
    recorded = (
        read_fold_record(np.asarray(state_dict[FOLD_RECORD_KEY]))
        if FOLD_RECORD_KEY in state_dict
        else []
    )
    decided, unresolved = decide_pairs(
        index,
        explicit=_statements(pairs),
        recorded=recorded,
        transpose=transpose,
        groups=groups,
        assume_sequential=assume_sequential,
    )
    if unresolved and not keep_unpaired:
        raise UnresolvedPairsError(unresolved)

    replacements: dict[str, np.ndarray] = {}
    created_after: dict[str, tuple[str, np.ndarray]] = {}
    removed: set[str] = set()
    report = FoldReport(kept=unresolved)
    for pair in decided:
        new_weight, new_bias, folded_pair = _apply(index, pair, eps)
        weight_key = index.modules[pair.layer]["weight"]
        replacements[weight_key] = new_weight
        bias_key = index.modules[pair.layer].get("bias")
        if bias_key:
            replacements[bias_key] = new_bias
        else:
            created_after[weight_key] = (join(pair.layer, "bias"), new_bias)
        bn = index.modules[pair.bn]
        removed.update(bn[leaf] for leaf in BN_KEYS if leaf in bn)
        report.pairs.append(folded_pair)

    folded: dict[str, np.ndarray] = {}
    for key, value in index.arrays.items():
        if key in removed:
            continue
        folded[key] = replacements.get(key, value)
        if key in created_after:
            bias_key, bias = created_after[key]
            folded[bias_key] = bias
    order = list(index.modules)
    report.pairs.sort(key=lambda p: order.index(p.layer))
    return folded, report
