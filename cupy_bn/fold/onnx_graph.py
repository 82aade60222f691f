"""Folding inference `BatchNormalization` into the layer before it, in ONNX graphs.

An inference batch norm is a per-channel affine map on axis 1,
`Z = (Y - mean) * s + B` with `s = scale / sqrt(var + epsilon)`. When `Y` is the output of a
layer that is linear in its output channel, the two compose into one layer. Everything is
computed in float64 from the stored constants and written back in the layer's dtypes
(float16, bfloat16, float32, float64; scale/B and mean/var may have other float types than the
layer, as BatchNormalization-15 allows).

Folding rules (`fold_onnx`), for the main graph of the model:

* `Conv`, weight `(C_out, C_in/group, *k)`: `W' = W * s` along axis 0, `b' = (b - mean) * s + B`.
  Any `group`, strides, pads, dilations, auto_pad: folding does not depend on them.
* `ConvTranspose`, weight `(C_in, C_out/group, *k)`: output channel `g * (C_out/group) + j` is
  column `j` of the rows of group `g`, so `s` is applied per (group, column). Strides, pads,
  output_padding, output_shape, dilations and auto_pad do not matter.
* `Gemm`, `Y = alpha * A' @ B' + beta * C` (`B' = B` or `B.T` with `transB=1`; `transA` is
  irrelevant): the columns of `B'` are scaled by `s` (axis 1 of `B`, or axis 0 with `transB=1`),
  and `C` becomes `C' = (beta * C - mean) * s + B` (a missing `C` counts as 0) with `beta` set to
  1; `alpha` is kept. This is exact algebra: `alpha * A' @ (B' * s) + C'` equals the batch norm
  of `Y`. `C'` has the broadcast shape of `C` and `(N,)`, which Gemm still broadcasts to
  `(M, N)`. Needs opset 7 or later (multidirectional broadcasting).
* `MatMul` with a constant 2-D weight `(K, N)` as its second input and an output of rank 2 (so
  the batch-norm channel axis 1 is the weight's output axis): `W' = W * s` along axis 1 and an
  `Add` node (named like the batch norm) adds `b' = B - mean * s` to the MatMul output. The
  rank comes from the graph's type information or ONNX shape inference; unknown rank keeps the
  batch norm. Needs opset 7 or later.

A layer without a bias gets one (Conv/ConvTranspose third input, Gemm `C`). A batch norm is
folded only when its input is the first output of such a layer, nothing else uses that tensor
(no second consumer, also not inside an If/Loop/Scan body, not a graph output), the layer's
weight (and bias/`C`, if any) and all four batch-norm parameters are constants, and the result
is finite in the stored dtypes. Constants are initializers (not also graph inputs from IR
version 4 on, where a graph input overrides the initializer of the same name; up to IR version 3
every initializer has to be listed as a graph input, and runtimes treat them as constants),
`Constant` nodes (`value`, `value_float(s)`, `value_int(s)`), `ConstantOfShape` nodes with a
constant shape, and `Identity` of a constant (the PyTorch exporter writes
`running_var = Identity(weight)` when the two are equal). The layer then produces the batch
norm's output name, so downstream names and graph outputs are unchanged; the batch norm is
dropped, and so are the initializers and Constant/ConstantOfShape/Identity nodes (and
`value_info` entries) that the fold left unused. A rewritten weight keeps its initializer name
when the layer was its only user; otherwise (shared, or a Constant node) it is stored as a new
initializer with a fresh name (`<old name>_bnfold`). Up to IR version 3 a new initializer is
also listed as a graph input, and a dropped one is removed from the inputs.
Opset imports, IR version, producer, names, doc strings, metadata and functions are kept.
Only the main graph is folded: nodes inside If/Loop/Scan bodies and functions are left as they
are (their references to main-graph tensors count as uses).

Batch norms that stay are reported in `OnnxFoldReport.kept` with a reason, for example: its
input has several consumers, its input comes from a node that is not a Conv/ConvTranspose/Gemm/
MatMul (or is a graph input), the layer output is a graph output, a parameter or the layer
weight is not a constant (graph input, computed tensor, initializer overridable by an input),
`training_mode=1`, `is_test=0` (opset < 7), `spatial=0` (opset < 9), a second output is used,
parameter shapes do not match the layer's channels, `var + epsilon` is not positive, a MatMul
output of rank other than 2 or of unknown rank, a non-float layer, or a folded value that
overflows the stored dtype.

The end-to-end check is `cupy_bn.fold.onnx_check.verify_onnx_fold`; reading and writing
model files, `cupy_bn.fold.onnx_files`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cupy_bn.fold.algebra import scale_output_channels
from cupy_bn.jsonable import jsonable

if TYPE_CHECKING:
    import onnx

FOLDABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Producers a batch norm can be folded into."""

_DEFAULT_DOMAINS = ("", "ai.onnx")
_BN_PARAMETERS = ("scale", "B", "mean", "var")
_CONSTANT_OPS = ("Constant", "ConstantOfShape", "Identity")
"""Nodes whose output is a constant when their inputs are (Identity: of a constant)."""


class OnnxFoldError(ValueError):
    """An ONNX model or file cannot be folded, checked, read or written as asked.

    The message names the node, tensor or file.
    """


@dataclass(frozen=True)
class FoldedNode:
    """One batch norm folded into the layer before it."""

    bn: str
    """Batch-norm node name (its output tensor name if the node has no name)."""
    layer: str
    """Producing node's name (its original output tensor name if the node has no name)."""
    op: str
    """`Conv`, `ConvTranspose`, `Gemm` or `MatMul`."""
    channels: int
    """Number of channels (length of the batch-norm parameters)."""

    def to_json(self) -> dict[str, Any]:
        """`bn`, `layer`, `op`, `channels`."""
        return jsonable(self)


@dataclass(frozen=True)
class KeptNode:
    """One batch norm left in place, and why."""

    bn: str
    """Batch-norm node name (its output tensor name if the node has no name)."""
    reason: str
    """Human-readable sentence, e.g. `its input has 2 consumers`."""

    def to_json(self) -> dict[str, Any]:
        """`bn`, `reason`."""
        return jsonable(self)


@dataclass
class OnnxFoldReport:
    """What `fold_onnx` did."""

    folded: list[FoldedNode] = field(default_factory=list)
    kept: list[KeptNode] = field(default_factory=list)
    removed_initializers: int = 0
    """Initializers dropped because the fold left them unused (batch-norm parameters, replaced
    weights, ConstantOfShape shapes)."""
    opset: int = 0
    """The model's default-domain (ai.onnx) opset version; 0 if it imports none."""

    def to_json(self) -> dict[str, Any]:
        """`opset`, `folded` and `kept` (their `to_json()`), `removed_initializers`."""
        return {
            "opset": self.opset,
            "folded": [f.to_json() for f in self.folded],
            "kept": [k.to_json() for k in self.kept],
            "removed_initializers": self.removed_initializers,
        }


def import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise OnnxFoldError(
            "folding ONNX models needs the `onnx` package (pip install onnx)"
        ) from None
    return onnx


# ---------------------------------------------------------------------------------------------
# Graph bookkeeping


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    return 0


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    onnx = import_onnx()
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    onnx = import_onnx()
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(onnx.helper.make_attribute(name, value))
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    onnx = import_onnx()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _names_used_in_subgraph(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name a (nested) subgraph reads; outer-scope references are among them."""
    for node in graph.node:
        yield from (name for name in node.input if name)
        for sub in subgraphs(node):
            yield from _names_used_in_subgraph(sub)
    yield from (out.name for out in graph.output)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for sub in subgraphs(node):
            names |= _all_names(sub)
    return names


def _display(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


class _Graph:
    """Use counts, producers and constants of a main graph, kept current while folding."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.ir_version = int(model.ir_version)
        self.uses: Counter[str] = Counter()
        for node in self.graph.node:
            self.uses.update(name for name in node.input if name)
            for sub in subgraphs(node):
                self.uses.update(set(_names_used_in_subgraph(sub)))
        self.outputs = {out.name for out in self.graph.output}
        self.inputs = {inp.name for inp in self.graph.input}
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
        self.taken = _all_names(self.graph)
        self._values: dict[str, np.ndarray | None] = {}

    # Constants -------------------------------------------------------------------------------

    def overridable(self, name: str) -> bool:
        """An initializer that a graph input of the same name can replace (IR version >= 4)."""
        return name in self.inputs and self.ir_version >= 4

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None if `name` is not a constant."""
        if name not in self._values:
            self._values[name] = self._resolve(name)
        return self._values[name]

    def _resolve(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.initializers:
            if self.overridable(name):
                return None
            return _tensor_to_array(self.initializers[name])
        if name in self.inputs:
            return None
        node = self.producer.get(name)
        if node is None or node.domain not in _DEFAULT_DOMAINS:
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type == "Identity":
            return self.constant(node.input[0]) if node.input else None
        if node.op_type == "ConstantOfShape":
            shape = self.constant(node.input[0]) if node.input else None
            if shape is None or shape.ndim != 1 or shape.dtype.kind not in "iu":
                return None
            fill = _attribute(node, "value", None)
            if fill is None:
                fill_array = np.zeros(1, dtype=np.float32)
            else:
                fill_array = _tensor_to_array(fill)
            if fill_array.size != 1 or np.any(shape < 0):
                return None
            return np.full(tuple(int(d) for d in shape), fill_array.reshape(()))
        return None

    def why_not_constant(self, name: str) -> str:
        """Why `name` is not a constant, as a phrase."""
        if not name:
            return "it is missing"
        if name in self.initializers and self.overridable(name):
            return f"{name!r} is a graph input that can override its initializer"
        if name in self.inputs:
            return f"{name!r} is a graph input"
        node = self.producer.get(name)
        if node is None:
            return f"{name!r} is produced by no node"
        return f"{name!r} is computed by {node.op_type} {_display(node)!r}"

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of a constant (None if not a constant)."""
        onnx = import_onnx()
        if name in self.initializers:
            return int(self.initializers[name].data_type)
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "ConstantOfShape":
            fill = _attribute(node, "value", None)
            return onnx.TensorProto.FLOAT if fill is None else int(fill.data_type)
        if node.op_type == "Identity":
            return self.elem_type(node.input[0]) if self.constant(name) is not None else None
        if node.op_type == "Constant":
            value = self.constant(name)
            if value is None:
                return None
            for attr in node.attribute:
                if attr.name == "value":
                    return int(attr.t.data_type)
            return int(onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
        return None

    # Editing ---------------------------------------------------------------------------------

    def fresh_name(self, base: str) -> str:
        candidate = f"{base}_bnfold"
        counter = 1
        while candidate in self.taken:
            candidate = f"{base}_bnfold_{counter}"
            counter += 1
        self.taken.add(candidate)
        return candidate

    def store(self, node: onnx.NodeProto, slot: int, old: str, value: np.ndarray) -> str:
        """Make input `slot` of `node` the constant `value`; return the tensor's name.

        An initializer that only this node uses is rewritten in place (same name); otherwise a
        new initializer with a fresh name is added and the node is rewired to it.
        """
        onnx = import_onnx()
        exclusive = (
            old in self.initializers
            and not self.overridable(old)
            and self.uses[old] == 1
            and old not in self.outputs
        )
        if exclusive:
            tensor = self.initializers[old]
            doc = tensor.doc_string
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, old))
            tensor.doc_string = doc
            self._values[old] = value
            return old
        name = self.fresh_name(old or f"{_display(node)}_bias")
        tensor = onnx.numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        self._values[name] = value
        if self.ir_version <= 3:
            self.graph.input.append(
                onnx.helper.make_tensor_value_info(name, tensor.data_type, value.shape)
            )
            self.inputs.add(name)
        if old:
            self.uses[old] -= 1
        self.uses[name] += 1
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name
        return name

    def remove_node(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name:
                self.uses[name] -= 1
        for name in node.output:
            self.producer.pop(name, None)
        self.graph.node.remove(node)

    def remove_dead(self, candidates: Iterable[str]) -> tuple[int, set[str]]:
        """Drop constants among `candidates` (and what feeds them) that nothing uses any more.

        Returns (initializers removed, names that no longer exist).
        """
        pending = [name for name in candidates if name]
        removed_initializers = 0
        gone: set[str] = set()
        while pending:
            name = pending.pop()
            if name in gone or self.uses[name] > 0 or name in self.outputs:
                continue
            node = self.producer.get(name)
            if node is not None:
                if node.op_type not in _CONSTANT_OPS or self.constant(name) is None:
                    continue
                if any(self.uses[o] > 0 or o in self.outputs for o in node.output if o):
                    continue
                gone.update(o for o in node.output if o)
                pending.extend(n for n in node.input if n)
                self.remove_node(node)
                continue
            if name in self.initializers:
                if name in self.inputs and self.ir_version >= 4:
                    continue
                tensor = self.initializers.pop(name)
                self.graph.initializer.remove(tensor)
                if name in self.inputs:
                    for inp in self.graph.input:
                        if inp.name == name:
                            self.graph.input.remove(inp)
                            break
                    self.inputs.discard(name)
                removed_initializers += 1
                gone.add(name)
        return removed_initializers, gone


def _tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    onnx = import_onnx()
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise OnnxFoldError(
            f"tensor {tensor.name!r}: its data is stored externally and was not loaded "
            "(read the model with load_onnx)"
        )
    try:
        return onnx.numpy_helper.to_array(tensor)
    except Exception as e:  # noqa: BLE001 - onnx raises several types for bad tensors
        raise OnnxFoldError(f"tensor {tensor.name!r}: cannot be read ({e})") from None


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return _tensor_to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def is_float_type(elem_type: int | None) -> bool:
    onnx = import_onnx()
    return elem_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    )


def _is_float_array(array: np.ndarray) -> bool:
    """float16/32/64, or bfloat16 (an ml_dtypes type numpy does not count as kind "f")."""
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def type_name(elem_type: int | None) -> str:
    onnx = import_onnx()
    if elem_type is None:
        return "unknown"
    return onnx.TensorProto.DataType.Name(elem_type)


def _stored(value64: np.ndarray, elem_type: int) -> np.ndarray | None:
    """`value64` in the numpy dtype of `elem_type`, or None if a finite value overflows."""
    onnx = import_onnx()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    with np.errstate(over="ignore", invalid="ignore"):
        stored = value64.astype(dtype)
    if not np.all(np.isfinite(stored.astype(np.float64))):
        return None
    return stored


# ---------------------------------------------------------------------------------------------
# Per-layer algebra (float64)


def _scale_matrix_columns(matrix: np.ndarray, scale: np.ndarray, transposed: bool) -> np.ndarray:
    """Scale the output columns of a `(K, N)` matrix, or of its `(N, K)` transpose."""
    return matrix * (scale[:, None] if transposed else scale[None, :])


@dataclass
class _Bn:
    """A batch norm's parameters, validated, in float64."""

    scale: np.ndarray
    mean: np.ndarray
    shift: np.ndarray
    """`B`, the batch norm's bias."""

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


class _Keep(Exception):
    """Internal: this batch norm stays; the message is the reason."""


def _bn_parameters(graph: _Graph, bn: onnx.NodeProto) -> _Bn:
    if len(bn.input) < 5:
        raise _Keep(f"it has {len(bn.input)} inputs, expected 5")
    values: dict[str, np.ndarray] = {}
    for label, name in zip(_BN_PARAMETERS, bn.input[1:5], strict=True):
        value = graph.constant(name)
        if value is None:
            raise _Keep(f"{label} is not a constant ({graph.why_not_constant(name)})")
        if not _is_float_array(value):
            raise _Keep(f"{label} has dtype {value.dtype}, not a floating-point type")
        values[label] = value.astype(np.float64)
    channels = values["mean"].shape
    if len(channels) != 1:
        raise _Keep(f"mean has shape {channels}, expected a vector")
    for label, value in values.items():
        if value.shape != channels:
            raise _Keep(f"{label} has shape {value.shape}, expected {channels}")
        if not np.all(np.isfinite(value)):
            raise _Keep(f"{label} has non-finite values")
    epsilon = float(_attribute(bn, "epsilon", 1e-5))
    denominator = values["var"] + epsilon
    if np.any(denominator <= 0):
        bad = np.flatnonzero(denominator <= 0)[:5].tolist()
        raise _Keep(f"var + epsilon is not positive at channels {bad}")
    return _Bn(scale=values["scale"] / np.sqrt(denominator), mean=values["mean"], shift=values["B"])


def _bn_mode_problem(graph: _Graph, bn: onnx.NodeProto, opset: int) -> str | None:
    if opset < 7 and not _attribute(bn, "is_test", 0):
        return "is_test=0 (training mode)"
    if opset < 9 and _attribute(bn, "spatial", 1) == 0:
        return "spatial=0"
    if _attribute(bn, "training_mode", 0):
        return "training_mode=1"
    if not bn.output or not bn.output[0]:
        return "it has no output"
    for index, name in enumerate(bn.output[1:], start=1):
        if name and (graph.uses[name] > 0 or name in graph.outputs):
            return f"its output {index} ({name!r}) is used, not only Y"
    return None


def _layer_for(graph: _Graph, bn: onnx.NodeProto) -> onnx.NodeProto:
    x = bn.input[0] if bn.input else ""
    layer = graph.producer.get(x)
    if layer is None:
        if x in graph.inputs:
            raise _Keep(f"its input {x!r} is a graph input, not a Conv/ConvTranspose/Gemm/MatMul")
        raise _Keep(f"its input {x!r} is not produced by a node")
    if layer.domain not in _DEFAULT_DOMAINS or layer.op_type not in FOLDABLE_OPS:
        op = (
            layer.op_type if layer.domain in _DEFAULT_DOMAINS else f"{layer.domain}:{layer.op_type}"
        )
        raise _Keep(f"input comes from {op}, not a Conv/ConvTranspose/Gemm/MatMul")
    if layer.output[0] != x:
        raise _Keep(f"its input is output {list(layer.output).index(x)} of {layer.op_type}")
    if x in graph.outputs:
        raise _Keep(f"its input {x!r} ({layer.op_type} output) is a graph output")
    if graph.uses[x] != 1:
        raise _Keep(f"its input has {graph.uses[x]} consumers")
    return layer


def _layer_constant(graph: _Graph, layer: onnx.NodeProto, slot: int, label: str) -> np.ndarray:
    name = layer.input[slot] if len(layer.input) > slot else ""
    value = graph.constant(name)
    if value is None:
        raise _Keep(f"{layer.op_type} {label} is not a constant ({graph.why_not_constant(name)})")
    elem_type = graph.elem_type(name)
    if not is_float_type(elem_type):
        raise _Keep(f"{layer.op_type} {label} has type {type_name(elem_type)}, not float")
    return value


def _optional_input(layer: onnx.NodeProto, slot: int) -> str:
    return layer.input[slot] if len(layer.input) > slot else ""


@dataclass
class _Plan:
    """New constants for one fold: (input slot, old name, float64 value, element type)."""

    updates: list[tuple[int, str, np.ndarray, int]]
    beta_one: bool = False
    matmul_bias: tuple[np.ndarray, int] | None = None


def _plan_conv(graph: _Graph, layer: onnx.NodeProto, bn: _Bn) -> _Plan:
    weight = _layer_constant(graph, layer, 1, "weight")
    w_type = graph.elem_type(layer.input[1])
    if weight.ndim < 3:
        raise _Keep(f"{layer.op_type} weight has shape {weight.shape}, expected rank >= 3")
    w64 = weight.astype(np.float64)
    if layer.op_type == "Conv":
        channels = weight.shape[0]
        if channels != bn.channels:
            raise _Keep(f"Conv has {channels} output channels, the batch norm {bn.channels}")
        folded_w = scale_output_channels(w64, bn.scale)
    else:
        group = int(_attribute(layer, "group", 1))
        if group < 1 or weight.shape[0] % group:
            raise _Keep(f"ConvTranspose weight {weight.shape} does not split into group={group}")
        channels = weight.shape[1] * group
        if channels != bn.channels:
            raise _Keep(
                f"ConvTranspose has {channels} output channels, the batch norm {bn.channels}"
            )
        folded_w = scale_output_channels(w64, bn.scale, transpose=True, groups=group)
    bias_name = _optional_input(layer, 2)
    if bias_name:
        bias = _layer_constant(graph, layer, 2, "bias")
        if bias.shape != (channels,):
            raise _Keep(f"{layer.op_type} bias has shape {bias.shape}, expected ({channels},)")
        b64, b_type = bias.astype(np.float64), graph.elem_type(bias_name)
    else:
        b64, b_type = np.zeros(channels), w_type
    folded_b = (b64 - bn.mean) * bn.scale + bn.shift
    return _Plan([(1, layer.input[1], folded_w, w_type), (2, bias_name, folded_b, b_type)])


def _plan_gemm(graph: _Graph, layer: onnx.NodeProto, bn: _Bn, opset: int) -> _Plan:
    if opset < 7:
        raise _Keep("folding into Gemm needs opset 7 or later")
    matrix = _layer_constant(graph, layer, 1, "B")
    b_type = graph.elem_type(layer.input[1])
    if matrix.ndim != 2:
        raise _Keep(f"Gemm B has shape {matrix.shape}, expected 2-D")
    transposed = bool(_attribute(layer, "transB", 0))
    channels = matrix.shape[0] if transposed else matrix.shape[1]
    if channels != bn.channels:
        raise _Keep(f"Gemm has {channels} output columns, the batch norm {bn.channels}")
    beta = float(_attribute(layer, "beta", 1.0))
    c_name = _optional_input(layer, 2)
    if c_name:
        c = _layer_constant(graph, layer, 2, "C")
        if c.ndim > 2:
            raise _Keep(f"Gemm C has shape {c.shape}, expected rank <= 2")
        try:
            np.broadcast_shapes(c.shape, (channels,))
        except ValueError:
            raise _Keep(
                f"Gemm C has shape {c.shape}, not broadcastable to {channels} columns"
            ) from None
        c64, c_type = c.astype(np.float64), graph.elem_type(c_name)
        offset = beta * c64 if beta != 0 else np.zeros_like(c64)
    else:
        offset, c_type = np.zeros(channels), b_type
    folded_b = _scale_matrix_columns(matrix.astype(np.float64), bn.scale, transposed)
    folded_c = (offset - bn.mean) * bn.scale + bn.shift
    return _Plan([(1, layer.input[1], folded_b, b_type), (2, c_name, folded_c, c_type)], True)


def _plan_matmul(
    graph: _Graph, layer: onnx.NodeProto, bn: _Bn, opset: int, ranks: dict[str, int]
) -> _Plan:
    if opset < 7:
        raise _Keep("folding into MatMul needs opset 7 or later")
    rank = ranks.get(layer.output[0])
    if rank is None:
        rank = ranks.get(layer.input[0])
    if rank is None:
        raise _Keep("MatMul output rank is unknown: channel axis 1 may not be the weight's axis")
    if rank != 2:
        raise _Keep(f"MatMul output is rank {rank}: channel axis 1 is not the weight's output axis")
    weight = _layer_constant(graph, layer, 1, "weight (second input)")
    w_type = graph.elem_type(layer.input[1])
    if weight.ndim != 2:
        raise _Keep(f"MatMul weight has shape {weight.shape}, expected 2-D")
    if weight.shape[1] != bn.channels:
        raise _Keep(f"MatMul has {weight.shape[1]} output columns, the batch norm {bn.channels}")
    folded_w = _scale_matrix_columns(weight.astype(np.float64), bn.scale, transposed=False)
    bias = bn.shift - bn.mean * bn.scale
    return _Plan([(1, layer.input[1], folded_w, w_type)], matmul_bias=(bias, w_type))


def _known_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of main-graph tensors from the model's type information and shape inference."""
    onnx = import_onnx()

    def collect(graph: onnx.GraphProto, ranks: dict[str, int]) -> None:
        for info in (*graph.input, *graph.output, *graph.value_info):
            tensor_type = info.type.tensor_type
            if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
                ranks.setdefault(info.name, len(tensor_type.shape.dim))
        for tensor in graph.initializer:
            ranks.setdefault(tensor.name, len(tensor.dims))

    ranks: dict[str, int] = {}
    collect(model.graph, ranks)
    with contextlib.suppress(Exception):
        inferred = onnx.shape_inference.infer_shapes(model)
        collect(inferred.graph, ranks)
    return ranks


def _finish_fold(
    graph: _Graph, bn: onnx.NodeProto, layer: onnx.NodeProto, plan: _Plan
) -> tuple[list[str], set[str]]:
    """Apply `plan`; return (names that may have become dead, names that no longer exist)."""
    onnx = import_onnx()
    stored: list[tuple[int, str, np.ndarray]] = []
    for slot, old, value64, elem_type in plan.updates:
        value = _stored(value64, elem_type)
        if value is None:
            raise _Keep(f"folded values overflow {type_name(elem_type)}")
        stored.append((slot, old, value))
    bias_value = None
    if plan.matmul_bias is not None:
        bias_value = _stored(*plan.matmul_bias)
        if bias_value is None:
            raise _Keep(f"folded bias overflows {type_name(plan.matmul_bias[1])}")

    candidates = [name for name in bn.input[1:] if name]
    for slot, old, value in stored:
        new = graph.store(layer, slot, old, value)
        if old and new != old:
            candidates.append(old)
    if plan.beta_one:
        _set_float_attribute(layer, "beta", 1.0)

    x, y = bn.input[0], bn.output[0]
    index = list(graph.graph.node).index(bn)
    graph.remove_node(bn)
    gone = {name for name in bn.output[1:] if name}
    if bias_value is None:
        layer.output[0] = y
        graph.producer.pop(x, None)
        graph.producer[y] = layer
        gone.add(x)
    else:
        bias_name = graph.fresh_name(f"{_display(bn)}_bias")
        tensor = onnx.numpy_helper.from_array(bias_value, bias_name)
        graph.graph.initializer.append(tensor)
        graph.initializers[bias_name] = tensor
        if graph.ir_version <= 3:
            graph.graph.input.append(
                onnx.helper.make_tensor_value_info(bias_name, tensor.data_type, bias_value.shape)
            )
            graph.inputs.add(bias_name)
        add_name = bn.name if bn.name else graph.fresh_name(f"{y}_add")
        add = onnx.helper.make_node("Add", [x, bias_name], [y], name=add_name)
        if bn.doc_string:
            add.doc_string = bn.doc_string
        graph.graph.node.insert(index, add)
        graph.uses.update([x, bias_name])
        graph.producer[y] = add
    return candidates, gone


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxFoldReport]:
    """Fold every foldable inference BatchNormalization of the main graph into its layer.

    Returns `(folded_model, report)`; `model` itself is never modified. The folding rules, the
    reasons a batch norm is kept, and dtype handling are described in the module docstring.
    Raises `OnnxFoldError` for an argument that is not a ModelProto or a tensor that cannot be
    read (e.g. external data that was not loaded).
    """
    onnx = import_onnx()
    if not isinstance(model, onnx.ModelProto):
        raise OnnxFoldError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    opset = _default_opset(folded)
    report = OnnxFoldReport(opset=opset)
    bns = [
        n
        for n in folded.graph.node
        if n.op_type == "BatchNormalization" and n.domain in _DEFAULT_DOMAINS
    ]
    if not bns:
        return folded, report

    graph = _Graph(folded)
    ranks: dict[str, int] | None = None
    candidates: list[str] = []
    gone: set[str] = set()
    for bn in bns:
        try:
            problem = _bn_mode_problem(graph, bn, opset)
            if problem:
                raise _Keep(problem)
            layer = _layer_for(graph, bn)
            params = _bn_parameters(graph, bn)
            if layer.op_type in ("Conv", "ConvTranspose"):
                plan = _plan_conv(graph, layer, params)
            elif layer.op_type == "Gemm":
                plan = _plan_gemm(graph, layer, params, opset)
            else:
                if ranks is None:
                    ranks = _known_ranks(model)
                plan = _plan_matmul(graph, layer, params, opset, ranks)
            layer_label = _display(layer)
            more_candidates, more_gone = _finish_fold(graph, bn, layer, plan)
        except _Keep as keep:
            report.kept.append(KeptNode(bn=_display(bn), reason=str(keep)))
            continue
        candidates.extend(more_candidates)
        gone |= more_gone
        report.folded.append(
            FoldedNode(
                bn=_display(bn), layer=layer_label, op=layer.op_type, channels=params.channels
            )
        )

    removed, dead = graph.remove_dead(candidates)
    report.removed_initializers = removed
    gone |= dead
    gone -= {out.name for out in folded.graph.output}
    _drop_value_info(folded.graph, gone)
    return folded, report


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [info for info in graph.value_info if info.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
