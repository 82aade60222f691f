"""Folding inference BatchNormalization into the layer before it, in ONNX graphs.

Every folded graph is checked three ways: structurally (no batch norm left, names kept, input
model unchanged, onnx.checker passes), numerically against an independent float64 NumPy
computation of the original graph, and by running original and folded graphs with a runtime.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx_graphs import (  # noqa: E402
    batch_norm_ref,
    bn_initializers,
    bn_node,
    bn_parameters,
    conv2d_ref,
    conv_transpose2d_ref,
    gemm_ref,
    make_model,
    np_dtype,
    reference_run,
    tensor,
    value_info,
)

from cupy_bn.fold.onnx_check import OnnxCheck, verify_onnx_fold  # noqa: E402
from cupy_bn.fold.onnx_files import has_external_data, load_onnx, save_onnx  # noqa: E402
from cupy_bn.fold.onnx_graph import FoldedNode, KeptNode, OnnxFoldError, fold_onnx  # noqa: E402

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ["resnet50", "shufflenet", "inception_v2", "densenet121"]


# ---------------------------------------------------------------------------------------------
# Helpers


def run_model(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with onnxruntime when it can, else the onnx reference evaluator."""
    try:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)
    except Exception:  # noqa: BLE001 - missing runtime or unsupported type: use the reference
        return reference_run(model, feeds)


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected).astype(np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def op_types(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


def initializer(model, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def fold_checked(model, *, folded: int | None = None, kept: int | None = None):
    """Fold; assert the input is untouched, the checker passes and the counts (if given)."""
    before = model.SerializeToString()
    result, report = fold_onnx(model)
    assert model.SerializeToString() == before, "fold_onnx modified its argument"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:  # noqa: BLE001 - e.g. no shape inference for bfloat16 Conv
        onnx.checker.check_model(result)
    else:
        onnx.checker.check_model(result, full_check=True)
    if folded is not None:
        assert len(report.folded) == folded, report
    if kept is not None:
        assert len(report.kept) == kept, report
    assert op_types(result).count("BatchNormalization") == len(report.kept)
    return result, report


def per_channel_scale(params: dict[str, np.ndarray], dtype, epsilon: float = 1e-5) -> np.ndarray:
    """Batch-norm scale computed from the parameters as stored in `dtype`."""
    p = {k: v.astype(dtype).astype(np.float64) for k, v in params.items()}
    return p["scale"] / np.sqrt(p["var"] + np.float64(np.float32(epsilon)))


def stored(params: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    return {k: v.astype(dtype).astype(np.float64) for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# Conv


CONV_CASES = [
    pytest.param(True, 1, (1, 1), (0, 0, 0, 0), (1, 1), id="bias"),
    pytest.param(False, 1, (2, 2), (1, 1, 1, 1), (1, 1), id="nobias-stride2-pad1"),
    pytest.param(True, 2, (1, 2), (1, 0, 2, 1), (2, 1), id="group2-asym-pads-dilation"),
    pytest.param(False, 4, (1, 1), (1, 1, 1, 1), (1, 1), id="depthwise-nobias"),
]


@pytest.mark.parametrize(("with_bias", "group", "strides", "pads", "dilations"), CONV_CASES)
def test_conv_bn_folds_exactly(with_bias, group, strides, pads, dilations):
    rng = np.random.default_rng(1)
    c_in, c_out = 4, 8
    w = rng.standard_normal((c_out, c_in // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if with_bias else None
    params = bn_parameters(rng, c_out)
    inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    conv = helper.make_node(
        "Conv",
        inputs,
        ["y"],
        name="conv",
        group=group,
        strides=list(strides),
        pads=list(pads),
        dilations=list(dilations),
    )
    inits = [tensor("w", w)] + ([tensor("b", b)] if with_bias else [])
    model = make_model(
        [conv, bn_node("y", "z", "bn")],
        [value_info("x", "float32", ["N", c_in, 9, 8])],
        [value_info("z", "float32", ["N", c_out, "H", "W"])],
        inits + bn_initializers("bn", params, np.float32),
        value_infos=[value_info("y", "float32", ["N", c_out, "H", "W"])],
    )
    folded, report = fold_checked(model, folded=1)
    assert report.folded == [FoldedNode(bn="bn", layer="conv", op="Conv", channels=c_out)]
    assert report.removed_initializers == 4
    assert report.opset == 13
    node = folded.graph.node[0]
    assert node.op_type == "Conv" and list(node.output) == ["z"]
    assert [o.name for o in folded.graph.output] == ["z"]
    assert [v.name for v in folded.graph.value_info] == [], "value_info of the dead 'y' stays"
    assert folded.producer_name == "cupy-bn-tests"

    # The folded weights, channel by channel, from the definition.
    s = per_channel_scale(params, np.float32)
    p = stored(params, np.float32)
    w_folded = initializer(folded, node.input[1]).astype(np.float64)
    b_folded = initializer(folded, node.input[2]).astype(np.float64)
    for c in range(c_out):
        np.testing.assert_allclose(w_folded[c], w[c].astype(np.float64) * s[c], rtol=1e-6)
    b64 = b.astype(np.float64) if with_bias else np.zeros(c_out)
    np.testing.assert_allclose(b_folded, (b64 - p["mean"]) * s + p["B"], rtol=1e-6, atol=1e-6)

    # The folded graph computes batch_norm(conv(x)) of the original parameters.
    x = rng.standard_normal((2, c_in, 9, 8)).astype(np.float32)
    expected = batch_norm_ref(
        conv2d_ref(
            x.astype(np.float64),
            w.astype(np.float64),
            None if b is None else b.astype(np.float64),
            strides=strides,
            pads=pads,
            dilations=dilations,
            group=group,
        ),
        p,
        1e-5,
    )
    (original_out,) = run_model(model, {"x": x})
    (folded_out,) = run_model(folded, {"x": x})
    assert rel_error(original_out, expected) < 1e-5
    assert rel_error(folded_out, expected) < 1e-5
    check = verify_onnx_fold(model, folded)
    assert check.ok and check.max_rel_error < 1e-5
    assert check.inputs == {"x": (2, c_in, 9, 8)}


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn_folds_per_group_column(group):
    rng = np.random.default_rng(2)
    c_in, c_out = 4, 6
    per_group = c_out // group
    w = rng.standard_normal((c_in, per_group, 3, 2)).astype(np.float32)
    params = bn_parameters(rng, c_out)
    attrs = dict(
        group=group, strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2], dilations=[1, 2]
    )
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", **attrs)
    model = make_model(
        [node, bn_node("y", "z", "bn", epsilon=1e-3)],
        [value_info("x", "float32", [1, c_in, 4, 3])],
        [value_info("z", "float32", [1, c_out, "H", "W"])],
        [tensor("w", w)] + bn_initializers("bn", params, np.float32),
    )
    folded, report = fold_checked(model, folded=1)
    assert report.folded[0].op == "ConvTranspose" and report.folded[0].channels == c_out
    conv = folded.graph.node[0]
    assert len(conv.input) == 3, "a bias is created"

    s = per_channel_scale(params, np.float32, 1e-3)
    w_folded = initializer(folded, conv.input[1]).astype(np.float64)
    rows = c_in // group
    for o in range(c_out):
        g, j = divmod(o, per_group)
        block = w[g * rows : (g + 1) * rows, j].astype(np.float64)
        np.testing.assert_allclose(w_folded[g * rows : (g + 1) * rows, j], block * s[o], rtol=1e-6)
    if group > 1:  # onnx.reference's ConvTranspose does not implement groups
        pytest.importorskip("onnxruntime")

    x = rng.standard_normal((1, c_in, 4, 3)).astype(np.float32)
    expected = batch_norm_ref(
        conv_transpose2d_ref(
            x.astype(np.float64),
            w.astype(np.float64),
            None,
            strides=(2, 3),
            pads=(1, 0, 0, 1),
            output_padding=(1, 2),
            dilations=(1, 2),
            group=group,
        ),
        stored(params, np.float32),
        1e-3,
    )
    (original_out,) = run_model(model, {"x": x})
    (folded_out,) = run_model(folded, {"x": x})
    assert rel_error(original_out, expected) < 1e-5
    assert rel_error(folded_out, expected) < 1e-5
    assert verify_onnx_fold(model, folded).ok


# ---------------------------------------------------------------------------------------------
# Gemm and MatMul


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 1), (3, 5), ()])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, -2.0)])
def test_gemm_bn_folds(trans_b, c_shape, alpha, beta):
    rng = np.random.default_rng(3)
    m, k, n = 3, 4, 5
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = None if c_shape is None else rng.standard_normal(c_shape).astype(np.float32)
    params = bn_parameters(rng, n)
    inputs = ["a", "B"] + ([] if c is None else ["C"])
    gemm = helper.make_node(
        "Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta
    )
    inits = [tensor("B", b)] + ([] if c is None else [tensor("C", c)])
    model = make_model(
        [gemm, bn_node("y", "z", "bn")],
        [value_info("a", "float32", [m, k])],
        [value_info("z", "float32", [m, n])],
        inits + bn_initializers("bn", params, np.float32),
    )
    folded, report = fold_checked(model, folded=1)
    assert report.folded == [FoldedNode(bn="bn", layer="fc", op="Gemm", channels=n)]
    (node,) = folded.graph.node
    assert len(node.input) == 3 and list(node.output) == ["z"]

    a = rng.standard_normal((m, k)).astype(np.float32)
    expected = batch_norm_ref(
        gemm_ref(
            a.astype(np.float64),
            b.astype(np.float64),
            None if c is None else c.astype(np.float64),
            alpha=alpha,
            beta=beta,
            trans_b=trans_b,
        ),
        stored(params, np.float32),
        1e-5,
    )
    (folded_out,) = run_model(folded, {"a": a})
    assert rel_error(folded_out, expected) < 1e-5
    check = verify_onnx_fold(model, folded, dim_size=3)
    assert check.ok, check


def test_matmul_2d_bn_folds_with_an_add():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 5))
    params = bn_parameters(rng, 5)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), bn_node("y", "z", "bn")],
        [value_info("x", "float64", ["batch", 6])],
        [value_info("z", "float64", ["batch", 5])],
        [tensor("w", w)] + bn_initializers("bn", params, np.float64),
    )
    folded, report = fold_checked(model, folded=1)
    assert report.folded[0].op == "MatMul"
    assert op_types(folded) == ["MatMul", "Add"]
    assert folded.graph.node[1].name == "bn" and list(folded.graph.node[1].output) == ["z"]
    x = rng.standard_normal((7, 6))
    expected = batch_norm_ref(x @ w, params, 1e-5)
    (out,) = run_model(folded, {"x": x})
    assert rel_error(out, expected) < 1e-12
    check = verify_onnx_fold(model, folded, dim_size=7)
    assert check.ok and check.inputs == {"x": (7, 6)} and check.max_rel_error < 1e-12


def test_matmul_rank3_and_unknown_rank_are_kept():
    rng = np.random.default_rng(5)
    params = bn_parameters(rng, 3)
    inits = [tensor("w", rng.standard_normal((4, 3)).astype(np.float32))]
    inits += bn_initializers("bn", params, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), bn_node("y", "z", "bn")]
    rank3 = make_model(
        nodes,
        [value_info("x", "float32", [2, 3, 4])],
        [value_info("z", "float32", [2, 3, 3])],
        inits,
    )
    _, report = fold_checked(rank3, folded=0, kept=1)
    assert report.kept == [
        KeptNode("bn", "MatMul output is rank 3: channel axis 1 is not the weight's output axis")
    ]
    unknown = make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [], inits
    )
    unknown.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    _, report = fold_onnx(unknown)
    assert len(report.kept) == 1 and "rank is unknown" in report.kept[0].reason


# ---------------------------------------------------------------------------------------------
# Batch norms that must stay


def conv_bn_parts(rng, channels=3):
    params = bn_parameters(rng, channels)
    w = rng.standard_normal((channels, 2, 1, 1)).astype(np.float32)
    return [tensor("w", w)] + bn_initializers("bn", params, np.float32)


def kept_reason(model) -> str:
    folded, report = fold_checked(model, folded=0, kept=1)
    assert folded.SerializeToString() == model.SerializeToString(), "kept graph must be as is"
    return report.kept[0].reason


X = value_info("x", "float32", [1, 2, 3, 3])
Z = value_info("z", "float32", [1, 3, 3, 3])


def test_kept_when_layer_output_has_two_consumers():
    rng = np.random.default_rng(6)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"]),
            bn_node("y", "z", "bn"),
            helper.make_node("Relu", ["y"], ["r"]),
        ],
        [X],
        [Z, value_info("r", "float32", [1, 3, 3, 3])],
        conv_bn_parts(rng),
    )
    assert kept_reason(model) == "its input has 2 consumers"


def test_kept_after_relu_and_after_concat_and_after_graph_input():
    rng = np.random.default_rng(7)
    relu = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Relu", ["c"], ["y"]),
            bn_node("y", "z", "bn"),
        ],
        [X],
        [Z],
        conv_bn_parts(rng),
    )
    assert kept_reason(relu) == "input comes from Relu, not a Conv/ConvTranspose/Gemm/MatMul"
    concat = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Concat", ["c"], ["y"], axis=1),
            bn_node("y", "z", "bn"),
        ],
        [X],
        [Z],
        conv_bn_parts(rng),
    )
    assert kept_reason(concat) == "input comes from Concat, not a Conv/ConvTranspose/Gemm/MatMul"
    direct = make_model(
        [bn_node("x", "z", "bn")],
        [value_info("x", "float32", [1, 3, 3, 3])],
        [Z],
        conv_bn_parts(rng)[1:],
    )
    assert "is a graph input" in kept_reason(direct)


def test_kept_when_layer_output_is_a_graph_output():
    rng = np.random.default_rng(8)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn")],
        [X],
        [Z, value_info("y", "float32", [1, 3, 3, 3])],
        conv_bn_parts(rng),
    )
    assert kept_reason(model) == "its input 'y' (Conv output) is a graph output"


def test_kept_when_a_parameter_or_weight_is_not_constant():
    rng = np.random.default_rng(9)
    parts = conv_bn_parts(rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn")]
    mean_input = make_model(
        nodes,
        [X, value_info("bn.mean", "float32", [3])],
        [Z],
        [t for t in parts if t.name != "bn.mean"],
    )
    assert kept_reason(mean_input) == "mean is not a constant ('bn.mean' is a graph input)"
    # IR >= 4: a graph input named like an initializer overrides it, so it is not constant.
    overridable = make_model(nodes, [X, value_info("w", "float32", [3, 2, 1, 1])], [Z], parts)
    assert kept_reason(overridable) == (
        "Conv weight is not a constant ('w' is a graph input that can override its initializer)"
    )
    computed = make_model(
        [helper.make_node("Neg", ["v"], ["bn.var"]), *nodes],
        [X],
        [Z],
        parts + [tensor("v", np.ones(3, np.float32))],
    )
    computed.graph.initializer.remove(next(t for t in parts if t.name == "bn.var"))
    assert kept_reason(computed) == "var is not a constant ('bn.var' is computed by Neg 'bn.var')"


def test_kept_in_training_mode_and_with_spatial_0():
    rng = np.random.default_rng(10)
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    training_bn = bn_node("y", "z", "bn", training_mode=1)
    training_bn.output.extend(["running_mean", "running_var"])
    training = make_model([conv, training_bn], [X], [Z], conv_bn_parts(rng), opset=14)
    assert kept_reason(training) == "training_mode=1"
    spatial0 = make_model(
        [conv, bn_node("y", "z", "bn", spatial=0)],
        [X],
        [Z],
        conv_bn_parts(rng),
        opset=7,
        ir_version=3,
    )
    for t in spatial0.graph.initializer:
        spatial0.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    assert kept_reason(spatial0) == "spatial=0"


def test_kept_when_a_second_output_is_used():
    rng = np.random.default_rng(22)
    bn = bn_node("y", "z", "bn")
    bn.output.extend(["bn_mean", "bn_var"])
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn],
        [X],
        [Z, value_info("bn_var", "float32", [3])],
        conv_bn_parts(rng),
        opset=9,
    )
    _, report = fold_onnx(model)
    assert report.kept == [KeptNode("bn", "its output 2 ('bn_var') is used, not only Y")]
    del model.graph.output[1:]
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1, "unused extra outputs do not block the fold"
    assert op_types(folded) == ["Conv"]


def test_kept_when_the_layer_output_is_read_inside_a_subgraph():
    rng = np.random.default_rng(11)
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["t"])],
        "then",
        [],
        [value_info("t", "float32", [1, 3, 3, 3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["e"])],
        "else",
        [],
        [value_info("e", "float32", [1, 3, 3, 3])],
    )
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"]),
            bn_node("y", "z", "bn"),
            helper.make_node(
                "If", ["cond"], ["o"], then_branch=then_branch, else_branch=else_branch
            ),
        ],
        [X, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [Z, value_info("o", "float32", [1, 3, 3, 3])],
        conv_bn_parts(rng),
    )
    assert kept_reason(model) == "its input has 2 consumers"


# ---------------------------------------------------------------------------------------------
# Constants, sharing, IR 3, dtypes and opsets


def test_constant_nodes_and_constant_of_shape_fold_and_are_removed():
    rng = np.random.default_rng(12)
    params = bn_parameters(rng, 3)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=tensor("w", w)),
        helper.make_node("Constant", [], ["bn.scale"], value_floats=params["scale"].tolist()),
        helper.make_node("Constant", [], ["bn.B"], value=tensor("B", params["B"].astype("f4"))),
        helper.make_node("Constant", [], ["shape"], value_ints=[3]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["bn.mean"], value=tensor("m", np.array([0.25], "f4"))
        ),
        helper.make_node("Identity", ["v"], ["bn.var"]),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        bn_node("y", "z", "bn"),
    ]
    model = make_model(nodes, [X], [Z], [tensor("v", params["var"].astype("f4"))])
    folded, report = fold_checked(model, folded=1)
    assert op_types(folded) == ["Conv"], "dead Constant/ConstantOfShape/Identity nodes stay"
    assert report.removed_initializers == 1
    assert {t.name for t in folded.graph.initializer} == set(folded.graph.node[0].input[1:])
    params["mean"] = np.full(3, 0.25)
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    expected = batch_norm_ref(
        conv2d_ref(x.astype(np.float64), w.astype(np.float64), None), stored(params, "f4"), 1e-5
    )
    (out,) = run_model(folded, {"x": x})
    assert rel_error(out, expected) < 1e-5


def test_shared_weight_is_not_corrupted():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    p1, p2 = bn_parameters(rng, 3), bn_parameters(rng, 3)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y1"], name="c1"),
            bn_node("y1", "z1", "bn1"),
            helper.make_node("Conv", ["x", "w"], ["y2"], name="c2"),
            bn_node("y2", "z2", "bn2"),
        ],
        [X],
        [value_info("z1", "float32", [1, 3, 3, 3]), value_info("z2", "float32", [1, 3, 3, 3])],
        [tensor("w", w)] + bn_initializers("bn1", p1, "f4") + bn_initializers("bn2", p2, "f4"),
    )
    folded, _ = fold_checked(model, folded=2)
    c1, c2 = folded.graph.node
    assert c1.input[1] != c2.input[1]
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    conv = conv2d_ref(x.astype(np.float64), w.astype(np.float64), None)
    out1, out2 = run_model(folded, {"x": x})
    assert rel_error(out1, batch_norm_ref(conv, stored(p1, "f4"), 1e-5)) < 1e-5
    assert rel_error(out2, batch_norm_ref(conv, stored(p2, "f4"), 1e-5)) < 1e-5


def test_ir3_initializers_listed_as_inputs_are_constants():
    rng = np.random.default_rng(14)
    parts = conv_bn_parts(rng)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn")],
        [X] + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in parts],
        [Z],
        parts,
        opset=9,
        ir_version=3,
    )
    folded, report = fold_checked(model, folded=1)
    assert report.removed_initializers == 4
    initialized = {t.name for t in folded.graph.initializer}
    assert {i.name for i in folded.graph.input} == initialized | {"x"}
    check = verify_onnx_fold(model, folded)
    assert check.ok and check.inputs == {"x": (1, 2, 3, 3)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_low_and_high_precision_models(dtype):
    rng = np.random.default_rng(15)
    dt = np_dtype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dt)
    b = rng.standard_normal(4).astype(dt)
    params = bn_parameters(rng, 4)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"]), bn_node("y", "z", "bn")],
        [value_info("x", dtype, [1, 3, 6, 6])],
        [value_info("z", dtype, [1, 4, 4, 4])],
        [tensor("w", w), tensor("b", b)] + bn_initializers("bn", params, dt),
    )
    folded, _ = fold_checked(model, folded=1)
    conv = folded.graph.node[0]
    assert initializer(folded, conv.input[1]).dtype == dt
    assert initializer(folded, conv.input[2]).dtype == dt
    x = rng.standard_normal((1, 3, 6, 6)).astype(dt)
    expected = batch_norm_ref(
        conv2d_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)),
        stored(params, dt),
        1e-5,
    )
    (out,) = run_model(folded, {"x": x})
    assert out.dtype == dt
    bound = {"float16": 5e-3, "bfloat16": 3e-2, "float64": 1e-12}[dtype]
    assert rel_error(out, expected) < bound
    check = verify_onnx_fold(model, folded)
    assert check.ok, check
    assert check.tolerance == {"float16": 1e-2, "bfloat16": 3e-2, "float64": 1e-4}[dtype]


def test_float16_fold_that_would_overflow_is_kept():
    rng = np.random.default_rng(16)
    params = bn_parameters(rng, 3)
    params["var"][1] = 1e-8
    params["scale"][1] = 1e4
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn", epsilon=1e-7)],
        [value_info("x", "float16", [1, 2, 3, 3])],
        [value_info("z", "float16", [1, 3, 3, 3])],
        [tensor("w", np.full((3, 2, 1, 1), 100, np.float16))]
        + bn_initializers("bn", params, np.float16),
    )
    assert kept_reason(model) == "folded values overflow FLOAT16"


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15])
def test_opsets(opset):
    rng = np.random.default_rng(17)
    params = bn_parameters(rng, 3)
    inits = conv_bn_parts(rng)[:1] + bn_initializers("bn", params, np.float32)
    attrs = {"training_mode": 0} if opset >= 14 else {"spatial": 1} if opset < 9 else {}
    if opset == 15:  # scale/B and mean/var may have other types than X
        inits = inits[:1] + bn_initializers("bn", params, np.float64)
        inits[3:] = [tensor(t.name, numpy_helper.to_array(t).astype(np.float16)) for t in inits[3:]]
    ir_version = 3 if opset < 9 else 8
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn", **attrs)],
        [X],
        [Z],
        inits,
        opset=opset,
        ir_version=ir_version,
    )
    if ir_version == 3:
        for t in inits:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    folded, report = fold_checked(model, folded=1)
    assert report.opset == opset
    assert [(o.domain, o.version) for o in folded.opset_import] == [("", opset)]
    assert folded.ir_version == ir_version
    check = verify_onnx_fold(model, folded)
    assert check.ok and check.max_rel_error < 1e-5, check


def test_bn_inside_a_subgraph_is_left_alone():
    rng = np.random.default_rng(18)
    parts = conv_bn_parts(rng)
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "t", "bn")],
        "body",
        [],
        [value_info("t", "float32", [1, 3, 3, 3])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=body)],
        [X, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [Z],
        parts,
    )
    folded, report = fold_checked(model, folded=0, kept=0)
    assert folded.SerializeToString() == model.SerializeToString()


# ---------------------------------------------------------------------------------------------
# verify_onnx_fold must be able to fail


def test_verify_detects_a_one_percent_weight_error():
    rng = np.random.default_rng(19)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn")],
        [X],
        [Z],
        conv_bn_parts(rng),
    )
    folded, _ = fold_onnx(model)
    assert verify_onnx_fold(model, folded).ok
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    weight = next(t for t in broken.graph.initializer if t.name == broken.graph.node[0].input[1])
    values = numpy_helper.to_array(weight).copy()
    values[1, 0, 0, 0] *= 1.01
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    check = verify_onnx_fold(model, broken)
    assert isinstance(check, OnnxCheck) and not check.ok
    assert check.max_rel_error > 1e-4
    nan = onnx.ModelProto()
    nan.CopyFrom(folded)
    bias = next(t for t in nan.graph.initializer if t.name == nan.graph.node[0].input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] = np.nan
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    check = verify_onnx_fold(model, nan)
    assert not check.ok and any("NaN" in m for m in check.mismatches)
    invalid = onnx.ModelProto()
    invalid.CopyFrom(folded)
    invalid.graph.node[0].input[1] = "missing"
    with pytest.raises(OnnxFoldError, match="checker"):
        verify_onnx_fold(model, invalid)


def test_verify_compares_each_folded_layer_not_only_the_outputs():
    # Sign hides a 1% weight error in the final output; the batch norm's own output shows it
    rng = np.random.default_rng(20)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["y"]),
            bn_node("y", "z0", "bn"),
            helper.make_node("Sign", ["z0"], ["z"]),
        ],
        [X],
        [Z],
        conv_bn_parts(rng),
    )
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1
    check = verify_onnx_fold(model, folded)
    assert check.ok and check.compared == ("z", "z0")
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    weight = next(t for t in broken.graph.initializer if t.name == broken.graph.node[0].input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    check = verify_onnx_fold(model, broken)
    assert not check.ok and check.max_rel_error > 5e-3
    assert [o.name for o in broken.graph.output] == ["z"], "the models are not modified"


# ---------------------------------------------------------------------------------------------
# Real graphs shipped with onnx


def light_model(name: str):
    path = LIGHT_DIR / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    return load_onnx(path)


def with_random_weights(model, seed: int = 0):
    """Replace every float ConstantOfShape (all weights are stored that way) by a Constant
    with seeded random values: He-scaled weights, positive variances, small shifts, so that
    the output depends on the input through every layer."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    rng = np.random.default_rng(seed)
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    roles = {}
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for role, name in zip(("scale", "B", "mean", "var"), node.input[1:], strict=True):
                roles[name] = role
    for index, node in enumerate(graph.node):
        if node.op_type != "ConstantOfShape":
            continue
        shape = tuple(int(d) for d in values[node.input[0]])
        role = roles.get(node.output[0])
        if role in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif role is not None or len(shape) < 2:
            value = rng.normal(0.0, 0.02, shape)
        else:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        constant = helper.make_node(
            "Constant", [], [node.output[0]], value=tensor(node.output[0], value.astype("f4"))
        )
        graph.node[index].CopyFrom(constant)
    return result


def remaining_bn(model) -> int:
    return op_types(model).count("BatchNormalization")


@pytest.fixture(scope="module")
def light_results():
    """Collects per-model numbers; printed at the end (`pytest -s` shows them)."""
    results: dict = {}
    yield results
    for key, value in sorted(results.items()):
        print(key, value)


def with_bn_outputs(model):
    """The model with every batch norm's output also a graph output (typed by shape
    inference), so that a check compares each folded layer, not just the final output."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in inferred.graph.value_info}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for node in result.graph.node:
        if node.op_type == "BatchNormalization":
            result.graph.output.append(types[node.output[0]])
    return result


def corrupt_first_folded_layer(folded, report):
    """A copy of `folded` whose first folded Conv has one output channel 1% off (what a
    wrong per-channel scale would do)."""
    broken = onnx.ModelProto()
    broken.CopyFrom(folded)
    first = next(f for f in report.folded if f.op == "Conv")
    node = next(n for n in broken.graph.node if first.layer in (n.name, n.output[0]))
    weight = next(t for t in broken.graph.initializer if t.name == node.input[1])
    values = numpy_helper.to_array(weight).copy()
    channel = int(np.argmax(np.abs(values).reshape(values.shape[0], -1).sum(axis=1)))
    values[channel] *= 1.01
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    return broken


@pytest.mark.parametrize("variant", ["random", "shipped"])
@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_fold_like_onnxsim(name, variant, light_results):
    pytest.importorskip("onnxruntime")  # the reference evaluator would take minutes
    original = light_model(name)
    model = with_random_weights(original) if variant == "random" else original
    folded, report = fold_checked(model)
    total = remaining_bn(model)
    assert total > 0 and len(report.folded) > 0
    assert len(report.folded) + len(report.kept) == total

    # Compare every folded layer's output on its own, and the final output.
    exposed = with_bn_outputs(model)
    exposed_folded, exposed_report = fold_onnx(exposed)
    assert exposed_report == report
    assert [o.name for o in exposed_folded.graph.output] == [o.name for o in exposed.graph.output]
    check = verify_onnx_fold(exposed, exposed_folded, seed=1)
    assert check.ok and check.max_rel_error <= 1e-4, check
    if variant == "random":
        broken = verify_onnx_fold(exposed, corrupt_first_folded_layer(exposed_folded, report))
        assert not broken.ok, "the comparison cannot see a 1% error in one channel"

    result = {"bn": total, "folded": len(report.folded), "max_rel_error": check.max_rel_error}
    light_results[(name, variant)] = result
    onnxsim = pytest.importorskip("onnxsim")
    simplified, ok = onnxsim.simplify(model)
    assert ok
    result["onnxsim_folded"] = total - remaining_bn(simplified)
    assert remaining_bn(folded) <= remaining_bn(simplified)


# ---------------------------------------------------------------------------------------------
# PyTorch exports


def torch_models():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class ResBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

    class PreActBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(4)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv1(torch.relu(self.bn1(x)))
            return x + self.conv2(torch.relu(self.bn2(y)))

    return {
        # name: (model, input shape, batch norms folded, batch norms kept)
        "conv_transpose_groups": (
            nn.Sequential(nn.ConvTranspose2d(16, 16, 3, stride=2, groups=2), nn.BatchNorm2d(16)),
            (2, 16, 5, 5),
            1,
            0,
        ),
        "linear_bn1d": (nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)), (3, 8), 1, 0),
        "resnet_block": (ResBlock(), (2, 4, 8, 8), 3, 0),
        "conv_relu_bn": (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
            (1, 3, 6, 6),
            0,
            1,
        ),
        # bn2 follows conv1 (folds); bn1 reads the graph input x, which the skip also uses.
        "preact_block": (PreActBlock(), (1, 4, 5, 5), 1, 1),
    }


def randomize_batch_norms(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)


def export(model, x, path, opset: int, **kwargs):
    import torch

    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, **kwargs)
    return load_onnx(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "name", ["conv_transpose_groups", "linear_bn1d", "resnet_block", "conv_relu_bn", "preact_block"]
)
def test_pytorch_exports(name, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module, shape, n_folded, n_kept = torch_models()[name]
    randomize_batch_norms(module, seed=1)
    module.eval()
    x = torch.randn(*shape)
    # Eval-mode export folds Conv+BN itself with constant folding; keep the batch norms.
    model = export(
        module,
        x,
        tmp_path / "m.onnx",
        13,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    assert remaining_bn(model) == n_folded + n_kept
    folded, report = fold_checked(model, folded=n_folded, kept=n_kept)
    with torch.no_grad():
        expected = module(x).double().numpy()
    (out,) = run_model(folded, {model.graph.input[0].name: x.numpy()})
    assert rel_error(out, expected) < 1e-5
    check = verify_onnx_fold(model, folded)
    assert check.ok and check.max_rel_error < 1e-5, check
    if name == "conv_relu_bn":
        assert (
            report.kept[0].reason == "input comes from Relu, not a Conv/ConvTranspose/Gemm/MatMul"
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pytorch_fresh_batch_norm_uses_identity_constants(tmp_path):
    """A fresh BatchNorm1d has weight == running_var and bias == running_mean; the exporter
    writes `running_var = Identity(weight)`. Those are constants and fold."""
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6)).eval()
    x = torch.randn(3, 8)
    model = export(module, x, tmp_path / "m.onnx", 13, do_constant_folding=False)
    assert "Identity" in op_types(model)
    folded, _ = fold_checked(model, folded=1)
    assert op_types(folded) == ["Gemm"]
    with torch.no_grad():
        expected = module(x).double().numpy()
    (out,) = run_model(folded, {model.graph.input[0].name: x.numpy()})
    assert rel_error(out, expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# Files


def small_model():
    rng = np.random.default_rng(20)
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"]), bn_node("y", "z", "bn")],
        [X],
        [Z],
        conv_bn_parts(rng),
    )


def big_model():
    """A Conv+BN whose weight (40 KiB) is stored as external data."""
    rng = np.random.default_rng(21)
    params = bn_parameters(rng, 64)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32) * 0.1
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), bn_node("y", "z", "bn")],
        [value_info("x", "float32", [1, 32, 4, 4])],
        [value_info("z", "float32", [1, 64, 4, 4])],
        [tensor("w", w)] + bn_initializers("bn", params, np.float32),
    )


def test_save_and_load_round_trip_and_refuse_to_overwrite(tmp_path):
    model = small_model()
    path = tmp_path / "m.onnx"
    save_onnx(path, model)
    assert load_onnx(path).SerializeToString() == model.SerializeToString()
    assert not has_external_data(path)
    other, _ = fold_onnx(model)
    with pytest.raises(OnnxFoldError, match="already exists") as info:
        save_onnx(path, other)
    assert str(path) in str(info.value)
    assert load_onnx(path).SerializeToString() == model.SerializeToString()
    save_onnx(path, other, overwrite=True)
    assert load_onnx(path).SerializeToString() == other.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "temporary files left behind"


@pytest.mark.parametrize("external", [False, True])
def test_saved_file_mode_follows_the_umask(tmp_path, external):
    old = os.umask(0o022)
    try:
        save_onnx(tmp_path / "m.onnx", big_model(), external_data=external)
    finally:
        os.umask(old)
    written = [tmp_path / "m.onnx"] + ([tmp_path / "m.onnx.data"] if external else [])
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    old = os.umask(0o077)
    try:
        save_onnx(tmp_path / "n.onnx", small_model())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "n.onnx").stat().st_mode) == 0o600


def test_external_data_round_trip(tmp_path):
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    onnx.save_model(  # (this converts its argument to external data in place)
        big_model(),
        str(source_dir / "big.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    before = {p.name: p.read_bytes() for p in source_dir.iterdir()}
    assert has_external_data(source_dir / "big.onnx")
    loaded = load_onnx(source_dir / "big.onnx")
    folded, report = fold_onnx(loaded)
    assert len(report.folded) == 1
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    save_onnx(out, folded, external_data=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    assert has_external_data(out)
    assert (out.parent / "folded.onnx.data").stat().st_size >= 64 * 32 * 9 * 4
    assert out.stat().st_size < 4096, "the weights are not inside the model file"
    reread = load_onnx(out)
    check = verify_onnx_fold(loaded, reread)
    assert check.ok and check.max_rel_error < 1e-5
    assert {p.name: p.read_bytes() for p in source_dir.iterdir()} == before
    with pytest.raises(OnnxFoldError, match="folded.onnx: already exists"):
        save_onnx(out, folded, external_data=True)
    out.unlink()
    with pytest.raises(OnnxFoldError, match="folded.onnx.data: already exists"):
        save_onnx(out, folded, external_data=True)
    assert not out.exists(), "nothing is written when the data file exists"
    (out.parent / "folded.onnx.data").unlink()
    with pytest.raises(OnnxFoldError) as info:
        load_onnx(reread_path := _save_then_drop_data(out.parent, folded))
    assert str(reread_path) in str(info.value)


def _save_then_drop_data(directory: Path, model) -> Path:
    path = directory / "lost.onnx"
    save_onnx(path, model, external_data=True)
    (directory / "lost.onnx.data").unlink()
    return path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        (b"", "not an ONNX model"),
        (b"\x00\x01garbage\xff" * 10, "not"),
        (b"PK\x03\x04 this is a zip header", "not"),
    ],
)
def test_bad_files_are_named_in_the_error(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(OnnxFoldError, match=match) as info:
        load_onnx(path)
    assert str(path) in str(info.value)


def test_save_errors_name_the_target(tmp_path):
    missing = tmp_path / "nope" / "m.onnx"
    with pytest.raises(OnnxFoldError) as info:
        save_onnx(missing, small_model())
    assert str(missing) in str(info.value)
    with pytest.raises(OnnxFoldError, match="ModelProto"):
        save_onnx(tmp_path / "m.onnx", "not a model")
    with pytest.raises(OnnxFoldError, match="ModelProto"):
        fold_onnx("not a model")
