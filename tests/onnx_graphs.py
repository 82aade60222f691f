"""Small ONNX graphs and float64 NumPy references for the ONNX batch-norm folding tests.

The references compute layers and batch norm directly from their definitions (loops over
kernel offsets, no ONNX runtime), so they are independent of both the folding code and the
runtimes it is checked with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
}


def np_dtype(name: str) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(FLOAT_TYPES[name]))


def tensor(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def value_info(name: str, dtype: str, shape: Sequence[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT_TYPES[dtype], shape)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),
    *,
    opset: int = 13,
    ir_version: int = 8,
    value_infos: list[onnx.ValueInfoProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_infos)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    model.producer_name = "cupy-bn-tests"
    return model


def bn_parameters(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    """Float64 batch-norm parameters with positive variances, far from the identity."""
    return {
        "scale": rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels),
        "B": rng.normal(0.0, 0.5, channels),
        "mean": rng.normal(0.0, 0.5, channels),
        "var": rng.uniform(0.2, 3.0, channels),
    }


def bn_initializers(prefix: str, params: dict[str, np.ndarray], dtype) -> list[onnx.TensorProto]:
    return [tensor(f"{prefix}.{key}", params[key].astype(dtype)) for key in params]


def bn_node(x: str, y: str, prefix: str, *, epsilon: float = 1e-5, **attrs) -> onnx.NodeProto:
    names = [f"{prefix}.{key}" for key in ("scale", "B", "mean", "var")]
    return helper.make_node(
        "BatchNormalization", [x, *names], [y], name=prefix, epsilon=epsilon, **attrs
    )


# ---------------------------------------------------------------------------------------------
# Float64 references


def batch_norm_ref(y: np.ndarray, params: dict[str, np.ndarray], epsilon: float) -> np.ndarray:
    shape = (1, -1) + (1,) * (y.ndim - 2)
    p = {k: np.asarray(v, dtype=np.float64).reshape(shape) for k, v in params.items()}
    return (y - p["mean"]) / np.sqrt(p["var"] + np.float64(np.float32(epsilon))) * p["scale"] + p[
        "B"
    ]


def conv2d_ref(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    *,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    group: int = 1,
) -> np.ndarray:
    """ONNX Conv on (N, C, H, W), weight (O, C/group, kh, kw), pads (top, left, bottom, right)."""
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    _, _, height, width = x.shape
    out_channels, per_group_in, kh, kw = w.shape
    oh = (height - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (width - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((x.shape[0], out_channels, oh, ow))
    per_group_out = out_channels // group
    for g in range(group):
        xs = x[:, g * per_group_in : (g + 1) * per_group_in]
        ws = w[g * per_group_out : (g + 1) * per_group_out]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilations[0], j * dilations[1]
                patch = xs[
                    :,
                    :,
                    r0 : r0 + strides[0] * (oh - 1) + 1 : strides[0],
                    c0 : c0 + strides[1] * (ow - 1) + 1 : strides[1],
                ]
                out[:, g * per_group_out : (g + 1) * per_group_out] += np.einsum(
                    "nchw,oc->nohw", patch, ws[:, :, i, j]
                )
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def conv_transpose2d_ref(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    *,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    output_padding=(0, 0),
    group: int = 1,
) -> np.ndarray:
    """ONNX ConvTranspose on (N, C, H, W), weight (C, O/group, kh, kw), explicit pads."""
    n, c_in, height, width = x.shape
    _, per_group_out, kh, kw = w.shape
    per_group_in = c_in // group
    full_h = strides[0] * (height - 1) + dilations[0] * (kh - 1) + 1 + output_padding[0]
    full_w = strides[1] * (width - 1) + dilations[1] * (kw - 1) + 1 + output_padding[1]
    full = np.zeros((n, per_group_out * group, full_h, full_w))
    for g in range(group):
        xs = x[:, g * per_group_in : (g + 1) * per_group_in]
        ws = w[g * per_group_in : (g + 1) * per_group_in]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilations[0], j * dilations[1]
                full[
                    :,
                    g * per_group_out : (g + 1) * per_group_out,
                    r0 : r0 + strides[0] * (height - 1) + 1 : strides[0],
                    c0 : c0 + strides[1] * (width - 1) + 1 : strides[1],
                ] += np.einsum("nchw,co->nohw", xs, ws[:, :, i, j])
    out = full[:, :, pads[0] : full_h - pads[2], pads[1] : full_w - pads[3]]
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out


def gemm_ref(a, b, c, *, alpha=1.0, beta=1.0, trans_a=0, trans_b=0) -> np.ndarray:
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    out = alpha * (a @ b)
    if c is not None:
        out = out + beta * c
    return out


def reference_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with `onnx.reference.ReferenceEvaluator`, batch norm in inference mode.

    The evaluator's own BatchNormalization-9 fills in `momentum` and then mixes batch
    statistics into the output, so inference batch norm is replaced here (float64, then cast).
    """
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, **_):
            epsilon = getattr(self, "epsilon", None)
            params = {"scale": scale, "B": bias, "mean": mean, "var": var}
            params = {k: np.asarray(v).astype(np.float64) for k, v in params.items()}
            y = batch_norm_ref(x.astype(np.float64), params, 1e-5 if epsilon is None else epsilon)
            return (y.astype(x.dtype),)

    return ReferenceEvaluator(model, new_ops=[BatchNormalization]).run(None, feeds)
