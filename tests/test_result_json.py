"""Result objects serialize themselves as plain JSON values (`cupy_bn.jsonable`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cupy_bn.fold.check import PairCheck
from cupy_bn.fold.pairing import Unresolved
from cupy_bn.fold.state_dict import FoldedPair, FoldReport
from cupy_bn.jsonable import finite_or_none, jsonable


def round_trips(value) -> bool:
    return json.loads(json.dumps(value, allow_nan=False)) == value


def test_jsonable_gives_plain_values():
    value = {
        "tuple": (1, (2, 3)),
        "numpy": [np.float32(0.5), np.int64(7), np.bool_(True), np.arange(3)],
        "floats": [math.nan, math.inf, -math.inf, 1.5],
        "path": Path("/tmp/x.npz"),
        "plain": [None, "s", False],
    }
    assert jsonable(value) == {
        "tuple": [1, [2, 3]],
        "numpy": [0.5, 7, True, [0, 1, 2]],
        "floats": [None, None, None, 1.5],
        "path": "/tmp/x.npz",
        "plain": [None, "s", False],
    }
    converted = jsonable(value)
    assert type(converted["numpy"][1]) is int and type(converted["numpy"][2]) is bool
    assert round_trips(converted)


@pytest.mark.parametrize("value", [object(), {1: "a"}, {"a": {1, 2}}, b"bytes"])
def test_jsonable_refuses_what_json_cannot_hold_instead_of_its_repr(value):
    with pytest.raises(TypeError):
        jsonable(value)


def test_finite_or_none():
    assert finite_or_none(2) == 2.0 and type(finite_or_none(np.float64(2))) is float
    assert finite_or_none(math.nan) is None and finite_or_none(None) is None


def _pair(layer: str, bn: str) -> FoldedPair:
    return FoldedPair(layer, bn, "conv2d", 8, 1, 1e-5, True, "proven")


def test_fold_report_lists_pairs_with_their_algebra_check_and_kept_batch_norms():
    report = FoldReport(
        pairs=[_pair("f.0", "f.1"), _pair("f.3", "f.4")],
        kept=[Unresolved("g.1", None, "nothing in the file shows what feeds it")],
    )
    checks = [PairCheck("f.0", "f.1", math.nan, 2.0, math.inf)]
    document = report.to_json(checks)
    assert round_trips(document)
    first, second = document["pairs"]
    assert first["layer"] == "f.0" and first["created_bias"] is True
    assert first["assumption"] is None and first["established"] == "proven"
    # a non-finite error is None in JSON; the check still fails
    assert first["algebra_max_abs_error"] is None and first["algebra_error_to_bound"] is None
    assert first["algebra_ok"] is False
    # a pair without a check has None for its check
    assert [second[k] for k in ("algebra_max_abs_error", "algebra_ok")] == [None, None]
    assert document["kept"] == [
        {
            "bn": "g.1",
            "would_pair_with": None,
            "reason": "nothing in the file shows what feeds it",
        }
    ]
    assert report.to_json()["pairs"][0]["algebra_ok"] is None


def test_pair_check_serializes_itself():
    check = PairCheck("", "bn", np.float64(1e-7), 3.0, 0.25)
    assert check.to_json() == {
        "layer": "",
        "bn": "bn",
        "max_abs_error": 1e-7,
        "max_abs_output": 3.0,
        "error_to_bound": 0.25,
        "ok": True,
    }
    assert type(check.to_json()["max_abs_error"]) is float


def test_onnx_results_serialize_themselves():
    pytest.importorskip("onnx")
    from cupy_bn.fold.onnx_check import OnnxCheck
    from cupy_bn.fold.onnx_graph import FoldedNode, KeptNode, OnnxFoldReport

    report = OnnxFoldReport(
        folded=[FoldedNode("bn1", "conv", "Conv", 4)],
        kept=[KeptNode("bn2", "input comes from Relu")],
        removed_initializers=4,
        opset=15,
    )
    assert report.to_json() == {
        "opset": 15,
        "folded": [{"bn": "bn1", "layer": "conv", "op": "Conv", "channels": 4}],
        "kept": [{"bn": "bn2", "reason": "input comes from Relu"}],
        "removed_initializers": 4,
    }
    check = OnnxCheck(
        runtime="onnx.reference",
        inputs={"x": (2, 3, 5, 5)},
        max_abs_error=math.inf,
        max_rel_error=math.nan,
        tolerance=1e-4,
        mismatches=("output 'y': NaN at 1 new places",),
    )
    document = check.to_json()
    assert round_trips(document)
    assert document["inputs"] == {"x": [2, 3, 5, 5]}
    assert document["mismatches"] == ["output 'y': NaN at 1 new places"]
    assert document["max_abs_error"] is None and document["max_rel_error"] is None
    assert document["ok"] is False
