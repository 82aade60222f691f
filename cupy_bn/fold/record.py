"""The fold record: a model file's own list of (layer, batch norm) pairs, pickle-free.

A model writer that knows its graph stores the pairs beside the arrays, so that
`cupy-bn fold model.npz` folds exactly them without options:

    state[FOLD_RECORD_KEY] = fold_record([PairStatement("features.0", "features.1")])
    np.savez("model.npz", **state)

The record is one array member named `__cupy_bn_fold__`: a 0-d NumPy unicode string holding
JSON (`np.load(..., allow_pickle=False)` reads it):

    {"format": "cupy-bn.fold-pairs/1",
     "pairs": [{"layer": "features.0", "bn": "features.1"},
               {"layer": "up", "bn": "up_bn", "transpose": true, "groups": 2, "eps": 0.001}]}

`layer` and `bn` are module prefixes of the state dict. Optional per pair: `transpose` (the
layer is a ConvTranspose; default false), `groups` (a ConvTranspose's groups; default: from
the batch norm's channels) and `eps` (the batch norm's epsilon; default: the fold's `eps`).
The folded model does not carry the record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np

from cupy_bn.fold.algebra import FoldError
from cupy_bn.fold.pairing import PairStatement

FOLD_RECORD_KEY = "__cupy_bn_fold__"
"""The array member that holds the record."""

FORMAT = "cupy-bn.fold-pairs/1"


def fold_record(pairs: Iterable[PairStatement]) -> np.ndarray:
    """The record of `pairs`, as the array to store under `FOLD_RECORD_KEY`."""
    entries = []
    for pair in pairs:
        entry: dict[str, object] = {"layer": pair.layer, "bn": pair.bn}
        if pair.transpose is not None:
            entry["transpose"] = bool(pair.transpose)
        if pair.groups is not None:
            entry["groups"] = int(pair.groups)
        if pair.eps is not None:
            entry["eps"] = float(pair.eps)
        entries.append(entry)
    record = np.array(json.dumps({"format": FORMAT, "pairs": entries}), dtype=np.str_)
    read_fold_record(record)  # the same checks as on reading: a bad pair fails here, not later
    return record


def _field(entry: dict, name: str, kind: type, where: str):
    value = entry.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FoldError(f"{where}: {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def read_fold_record(value: np.ndarray) -> list[PairStatement]:
    """Parse a record array; `FoldError` naming `FOLD_RECORD_KEY` when it is malformed."""
    where = FOLD_RECORD_KEY
    array = np.asarray(value)
    if array.dtype.kind != "U" or array.ndim != 0:
        raise FoldError(f"{where}: expected a 0-d unicode string of JSON, got {array.dtype}")
    try:
        document = json.loads(str(array))
    except json.JSONDecodeError as e:
        raise FoldError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise FoldError(f'{where}: expected a JSON object with "format": "{FORMAT}"')
    entries = document.get("pairs")
    if not isinstance(entries, list):
        raise FoldError(f'{where}: "pairs" must be a list')
    statements = []
    for number, entry in enumerate(entries):
        at = f"{where} pair {number}"
        if not isinstance(entry, dict):
            raise FoldError(f"{at}: expected an object, got {entry!r}")
        layer, bn = entry.get("layer"), entry.get("bn")
        if not isinstance(layer, str) or not isinstance(bn, str):
            raise FoldError(f'{at}: "layer" and "bn" must be strings')
        unknown = set(entry) - {"layer", "bn", "transpose", "groups", "eps"}
        if unknown:
            raise FoldError(f"{at}: unknown fields {sorted(unknown)}")
        groups = _field(entry, "groups", int, at)
        if groups is not None and groups < 1:
            raise FoldError(f"{at}: 'groups' must be positive, got {groups}")
        eps = _field(entry, "eps", float, at)
        if eps is not None and not (eps > 0 and math.isfinite(eps)):
            raise FoldError(f"{at}: 'eps' must be positive and finite, got {eps}")
        statements.append(
            PairStatement(layer, bn, _field(entry, "transpose", bool, at), groups, eps)
        )
    return statements
