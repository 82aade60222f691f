"""`cupy-bn fold MODEL.onnx`: folds what the graph shows, keeps the rest with reasons, runs
both graphs before writing, exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402
from onnx_graphs import (  # noqa: E402
    bn_initializers,
    bn_node,
    bn_parameters,
    make_model,
    tensor,
    value_info,
)

from cupy_bn.cli import main  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def conv_bn_relu_bn(path: Path) -> onnx.ModelProto:
    """Conv -> BN (foldable) -> Relu -> BN (kept: its input comes from Relu)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            bn_node("c", "y", "bn1"),
            helper.make_node("Relu", ["y"], ["r"], name="relu"),
            bn_node("r", "z", "bn2"),
        ],
        [value_info("x", "float32", ["N", 3, 5, 5])],
        [value_info("z", "float32", ["N", 4, 5, 5])],
        [tensor("w", weight)]
        + bn_initializers("bn1", bn_parameters(rng, 4), np.float32)
        + bn_initializers("bn2", bn_parameters(rng, 4), np.float32),
    )
    onnx.save(model, path)
    return model


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_folds_what_the_graph_shows_and_keeps_the_rest_with_reasons(tmp_path):
    model = tmp_path / "net.onnx"
    conv_bn_relu_bn(model)
    result = run("fold", model, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = tmp_path / "net.folded.onnx"
    assert report["output"] == str(out) and report["written"] and report["format"] == "onnx"
    assert [(f["bn"], f["layer"], f["op"]) for f in report["folded"]] == [("bn1", "conv", "Conv")]
    assert report["kept"] == [
        {"bn": "bn2", "reason": "input comes from Relu, not a Conv/ConvTranspose/Gemm/MatMul"}
    ]
    check = report["check"]
    assert check["ok"] and check["max_rel_error"] <= check["tolerance"] == 1e-4
    assert check["inputs"] == {"x": [2, 3, 5, 5]}  # the dynamic batch filled with 2
    folded = onnx.load(out)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "BatchNormalization"]
    x = np.random.default_rng(1).standard_normal((3, 3, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x), ort_run(model, x), rtol=1e-5, atol=1e-5)


def test_json_fields(tmp_path):
    """The report's field names and JSON types (docs/cli.md, Report)."""
    model = tmp_path / "net.onnx"
    conv_bn_relu_bn(model)
    report = json.loads(run("fold", model, "--json").stdout)
    assert list(report) == [
        "input",
        "format",
        "output",
        "written",
        "verified",
        "ok",
        "opset",
        "folded",
        "kept",
        "removed_initializers",
        "check",
    ]
    assert report["folded"] == [{"bn": "bn1", "layer": "conv", "op": "Conv", "channels": 4}]
    assert report["removed_initializers"] == 4  # the folded batch norm's four parameters
    assert list(report["check"]) == [
        "runtime",
        "inputs",
        "max_abs_error",
        "max_rel_error",
        "tolerance",
        "mismatches",
        "compared",
        "ok",
    ]
    assert report["check"]["mismatches"] == []
    unverified = json.loads(run("fold", model, "--no-verify", "--force", "--json").stdout)
    assert unverified["check"] is None and unverified["verified"] is False


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tolerance", "-1"], "tolerance must be a positive finite number, got -1.0"),
        (["--tolerance", "nan"], "tolerance must be a positive finite number, got nan"),
        (["--seed", "-2"], "seed must be an integer >= 0, got -2"),
    ],
)
def test_bad_check_options_exit_2(tmp_path, args, fragment):
    model = tmp_path / "net.onnx"
    conv_bn_relu_bn(model)
    result = run("fold", model, *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "net.folded.onnx").exists()


def test_human_report_and_file_mode(tmp_path):
    model = tmp_path / "net.onnx"
    conv_bn_relu_bn(model)
    old = os.umask(0o022)
    try:
        result = run("fold", model, "-o", tmp_path / "out.onnx")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert "kept: bn2 (input comes from Relu" in result.stdout
    assert "end-to-end check (onnxruntime" in result.stdout and " ok" in result.stdout
    assert "Folded 1 batch norm(s)" in result.stdout
    assert stat.S_IMODE((tmp_path / "out.onnx").stat().st_mode) == 0o644


def test_a_wrong_fold_exits_1_and_writes_nothing(tmp_path, monkeypatch):
    import cupy_bn.fold.onnx_graph as onnx_graph

    real = onnx_graph.fold_onnx

    def wrong(model):
        folded, report = real(model)
        for init in folded.graph.initializer:
            if init.name == "w":
                array = onnx.numpy_helper.to_array(init) * np.float32(1.01)
                init.CopyFrom(onnx.numpy_helper.from_array(array, "w"))
        return folded, report

    monkeypatch.setattr(onnx_graph, "fold_onnx", wrong)
    model = tmp_path / "net.onnx"
    conv_bn_relu_bn(model)
    result = run("fold", model, "--json")
    assert result.exit_code == 1, result.output
    assert "folded graph differs from the original" in result.stderr
    report = json.loads(result.stdout)
    assert report["written"] is False and report["check"]["ok"] is False
    assert not (tmp_path / "net.folded.onnx").exists()


@pytest.mark.parametrize(
    "option", [["--pair", "a=b"], ["--transpose", "a"], ["--assume-sequential"], ["--eps", "1e-3"]]
)
def test_state_dict_options_are_refused_for_graphs(tmp_path, option):
    model = tmp_path / "net.onnx"
    conv_bn_relu_bn(model)
    result = run("fold", model, *option)
    assert result.exit_code == 2
    assert f"{option[0]}: applies to state dicts" in result.stderr
    assert not (tmp_path / "net.folded.onnx").exists()


def test_a_file_that_is_not_onnx_is_named(tmp_path):
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"\x00\x01 not a protobuf model")
    result = run("fold", model)
    assert result.exit_code == 2 and str(model) in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(not (LIGHT / "light_shufflenet.onnx").exists(), reason="no light models")
def test_a_real_graph_folds_every_batch_norm(tmp_path):
    result = run("fold", LIGHT / "light_shufflenet.onnx", "-o", tmp_path / "s.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["folded"]) == 49 and report["kept"] == []
    assert report["check"]["ok"]
    folded = onnx.load(tmp_path / "s.onnx")
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
