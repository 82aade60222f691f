"""Folding eval-mode batch norm into the conv / linear layer that feeds it, for inference.

- `algebra`: the fold of one layer and one batch norm (`fold_conv_bn`, `fold_linear_bn`).
- `pairing`: which batch norm of a state dict follows which layer, and how that is known.
- `record`: the pickle-free list of pairs a model file may carry (`FOLD_RECORD_KEY`).
- `state_dict`: `fold_state_dict`, index + pair + apply over a whole state dict.
- `check`: the numeric check of each folded pair's algebra.
- `onnx_graph`: folding ONNX graphs, where the graph itself shows the pairs.
"""

from cupy_bn.fold.algebra import FoldDtypeError, FoldError, fold_conv_bn, fold_linear_bn
from cupy_bn.fold.pairing import PairStatement
from cupy_bn.fold.record import FOLD_RECORD_KEY, fold_record, read_fold_record
from cupy_bn.fold.state_dict import (
    FoldedPair,
    FoldReport,
    UnresolvedPairsError,
    fold_state_dict,
)

__all__ = [
    "FOLD_RECORD_KEY",
    "FoldDtypeError",
    "FoldError",
    "FoldReport",
    "FoldedPair",
    "PairStatement",
    "UnresolvedPairsError",
    "fold_conv_bn",
    "fold_linear_bn",
    "fold_record",
    "fold_state_dict",
    "read_fold_record",
]
