"""Checking an ONNX fold end to end: both graphs on the same random inputs.

`verify_onnx_fold` runs both graphs on the same seeded random inputs and compares all outputs,
with onnxruntime (CPU provider, graph optimizations off, so the runtime does not fold the
original itself) or, when onnxruntime is missing or cannot run a model (e.g. float64 or
bfloat16 Conv), with `onnx.reference.ReferenceEvaluator`; there batch norm is replaced by a
correct inference implementation, since the evaluator's own BatchNormalization-9 mixes batch
statistics into the result. Models over 2 GiB cannot be checked in memory.
The relative error is normwise per output, `max|a - b| / max(max|a|, tiny)`, maximised over the
outputs. Default tolerance: 1e-4 when all float outputs are float32/float64; 1e-2 when one is
float16 (unit roundoff 2^-11: the folded weights are rounded once, the removed batch norm
rounded twice, and errors of a few ulps grow through a network) and 3e-2 when one is bfloat16
(unit roundoff 2^-8, the same reasoning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cupy_bn.fold.onnx_graph import OnnxFoldError, import_onnx, is_float_type, type_name
from cupy_bn.jsonable import jsonable
from cupy_bn.validation import check_positive_finite, check_seed

if TYPE_CHECKING:
    import onnx

DEFAULT_TOLERANCE = 1e-4
FLOAT16_TOLERANCE = 1e-2
BFLOAT16_TOLERANCE = 3e-2


@dataclass(frozen=True)
class OnnxCheck:
    """Result of running an original and a folded model on the same inputs."""

    runtime: str
    """`onnxruntime` or `onnx.reference`."""
    inputs: dict[str, tuple[int, ...]]
    """Shapes of the generated inputs (dynamic dims filled with `dim_size`)."""
    max_abs_error: float
    """Largest `|original - folded|` over all compared tensors."""
    max_rel_error: float
    """Normwise relative error: over tensors, the largest `max|a - b| / max(max|a|, tiny)`."""
    tolerance: float
    mismatches: tuple[str, ...] = ()
    """Structural problems: an output whose shape or dtype differs, NaN the fold introduced."""
    compared: tuple[str, ...] = ()
    """The tensors compared: the graph outputs, then each folded batch norm's output."""

    @property
    def ok(self) -> bool:
        """True when the relative error is within tolerance and there are no mismatches."""
        return not self.mismatches and self.max_rel_error <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        """The fields above and `ok`, as plain JSON values (shapes and `mismatches` as lists,
        None for a non-finite error)."""
        return jsonable({**dataclasses.asdict(self), "ok": self.ok})


# ---------------------------------------------------------------------------------------------
# Checking a fold by running both models


def _feedable_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller has to supply (those with an initializer have a default)."""
    initialized = {t.name for t in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initialized]


def _random_input(info: onnx.ValueInfoProto, rng: np.random.Generator, dim_size: int) -> np.ndarray:
    onnx = import_onnx()
    if not info.type.HasField("tensor_type"):
        raise OnnxFoldError(f"input {info.name!r}: only tensor inputs can be generated")
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise OnnxFoldError(f"input {info.name!r}: its rank is unknown, cannot generate it")
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dim_size
        for d in tensor_type.shape.dim
    )
    elem_type = tensor_type.elem_type
    if elem_type == onnx.TensorProto.BOOL:
        return rng.integers(0, 2, size=shape).astype(bool)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        raise OnnxFoldError(
            f"input {info.name!r}: cannot generate values of type {type_name(elem_type)}"
        ) from None
    if is_float_type(elem_type):
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)
    raise OnnxFoldError(
        f"input {info.name!r}: cannot generate values of type {type_name(elem_type)}"
    )


def _run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return [np.asarray(out) for out in session.run(None, feeds)]


def _inference_batch_norm_op() -> type:
    """A BatchNormalization for the onnx reference evaluator with correct inference semantics.

    The evaluator's own BatchNormalization-9 fills in the `momentum` default and then mixes in
    batch statistics, so inference batch norms would be computed wrongly. This one normalizes
    with the given mean/var (in float32, float64 for float64 inputs) and defers to the onnx
    implementation only for training mode (`training_mode=1`, or `is_test=0` before opset 7).
    """
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_batch_normalization import _batchnorm_training_mode

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, **_attributes):  # type: ignore[override]
            epsilon = getattr(self, "epsilon", None)
            epsilon = 1e-5 if epsilon is None else float(epsilon)
            training = bool(getattr(self, "training_mode", 0) or 0) or (
                getattr(self, "is_test", None) == 0
            )
            if training:
                momentum = getattr(self, "momentum", None)
                momentum = 0.9 if momentum is None else float(momentum)
                y, _, _, running_mean, running_var = _batchnorm_training_mode(
                    x, scale, bias, mean, var, momentum, epsilon
                )
                return (y, running_mean, running_var)[: len(self.output)]
            work = np.float64 if x.dtype == np.float64 else np.float32
            shape = (-1,) + (1,) * (x.ndim - 2)
            s, b, m, v = (
                np.asarray(p).astype(work).reshape(shape) for p in (scale, bias, mean, var)
            )
            y = (x.astype(work) - m) / np.sqrt(v + work(epsilon)) * s + b
            return (y.astype(x.dtype),)

    return BatchNormalization


def _run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model, new_ops=[_inference_batch_norm_op()])
    return [np.asarray(out) for out in evaluator.run(None, feeds)]


def _run_both(
    original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
    """Run both models with onnxruntime if it is installed and can run them, else the
    onnx reference evaluator (e.g. for types the onnxruntime CPU kernels lack)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    else:
        try:
            return "onnxruntime", _run_onnxruntime(original, feeds), _run_onnxruntime(folded, feeds)
        except Exception:  # noqa: BLE001 - fall back to the reference evaluator below
            pass
    try:
        return "onnx.reference", _run_reference(original, feeds), _run_reference(folded, feeds)
    except Exception as e:  # noqa: BLE001
        raise OnnxFoldError(f"cannot run the models to compare them ({e})") from None


def _check_model(folded: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Run onnx.checker on the folded model; raise if it fails where the original passes.

    The strictest level the original passes is used: `full_check=True` (with strict shape
    inference), else the plain check. A model the checker rejects already before folding is
    not blamed on the fold.
    """
    onnx = import_onnx()
    for full_check in (True, False):
        try:
            onnx.checker.check_model(original, full_check=full_check)
        except Exception:  # noqa: BLE001 - checker and shape inference errors
            continue
        try:
            onnx.checker.check_model(folded, full_check=full_check)
        except Exception as e:  # noqa: BLE001
            raise OnnxFoldError(f"the folded model fails onnx.checker ({e})") from None
        return


def _with_probes(
    original: onnx.ModelProto, folded: onnx.ModelProto
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both models with each folded batch norm's output also a graph output.

    A folded layer produces the batch norm's output name, so the tensor exists in both graphs
    and each fold is compared on its own, not only through final outputs that may hide it
    (a saturated softmax, an argmax). Types come from shape inference; a tensor it cannot
    type is not probed.
    """
    onnx = import_onnx()
    produced = {out: node.op_type for node in folded.graph.node for out in node.output}
    outputs = {out.name for out in original.graph.output}
    names = [
        node.output[0]
        for node in original.graph.node
        if node.op_type == "BatchNormalization"
        and node.output
        and produced.get(node.output[0], "BatchNormalization") != "BatchNormalization"
        and node.output[0] not in outputs
    ]
    if not names:
        return original, folded
    try:
        inferred = onnx.shape_inference.infer_shapes(original)
    except Exception:  # noqa: BLE001 - models over 2 GiB, invalid models: no probes
        return original, folded
    typed = {info.name: info for info in inferred.graph.value_info}
    probes = [typed[name] for name in names if name in typed]
    probed = []
    for model in (original, folded):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.extend(probes)
        probed.append(copy)
    return probed[0], probed[1]


def _default_tolerance(outputs: Iterable[np.ndarray]) -> float:
    tolerance = DEFAULT_TOLERANCE
    for out in outputs:
        name = out.dtype.name
        if name == "bfloat16":
            tolerance = max(tolerance, BFLOAT16_TOLERANCE)
        elif name == "float16":
            tolerance = max(tolerance, FLOAT16_TOLERANCE)
    return tolerance


def _as_float64(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in "biuf" or array.dtype.name == "bfloat16":
        return array.astype(np.float64)
    return np.asarray(array, dtype=np.float64)


def verify_onnx_fold(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    *,
    seed: int = 0,
    tolerance: float | None = None,
    dim_size: int = 2,
) -> OnnxCheck:
    """Run `original` and `folded` on the same seeded random inputs and compare them: every
    graph output, and the output of every folded batch norm (`_with_probes`).

    Inputs are the graph inputs without an initializer: standard normal for float types,
    integers 0..2 for integer types, random booleans; dynamic, symbolic or unknown dims are
    `dim_size`. Runs onnxruntime (CPU, graph optimizations off) when it is installed and can
    run the models, else `onnx.reference.ReferenceEvaluator`. `tolerance` defaults to 1e-4,
    1e-2 when an output is float16, 3e-2 when one is bfloat16; it bounds the normwise
    relative error `max|a - b| / max(max|a|, tiny)` of each output.

    `seed` must be an integer >= 0 and `tolerance` a positive finite number (else
    `OnnxFoldError`, as for every problem below).

    Also runs `onnx.checker.check_model` on `folded` (with `full_check=True` unless the
    original fails that) and raises `OnnxFoldError` if it fails where the original passes,
    or if the models cannot be run or their inputs generated.
    """
    onnx = import_onnx()
    for label, model in (("original", original), ("folded", folded)):
        if not isinstance(model, onnx.ModelProto):
            raise OnnxFoldError(f"{label}: expected an onnx.ModelProto, got {type(model).__name__}")
    if tolerance is not None:
        tolerance = check_positive_finite("tolerance", tolerance, OnnxFoldError)
    seed = check_seed(seed, OnnxFoldError)
    _check_model(folded, original)
    if dim_size < 1:
        raise OnnxFoldError(f"dim_size: expected a positive integer, got {dim_size!r}")
    rng = np.random.default_rng(seed)
    feeds = {info.name: _random_input(info, rng, dim_size) for info in _feedable_inputs(original)}
    folded_inputs = {info.name for info in _feedable_inputs(folded)}
    if folded_inputs != set(feeds):
        raise OnnxFoldError(
            f"the folded model's inputs {sorted(folded_inputs)} differ from the original's "
            f"{sorted(feeds)}"
        )
    original, folded = _with_probes(original, folded)
    runtime, expected, actual = _run_both(original, folded, feeds)
    names = [out.name for out in original.graph.output]
    mismatches: list[str] = []
    if len(expected) != len(actual):
        mismatches.append(f"{len(expected)} outputs became {len(actual)}")
    max_abs = 0.0
    max_rel = 0.0
    tiny = float(np.finfo(np.float64).tiny)
    for name, a, b in zip(names, expected, actual, strict=False):
        if a.shape != b.shape or a.dtype != b.dtype:
            mismatches.append(
                f"tensor {name!r}: {a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}"
            )
            continue
        a64, b64 = _as_float64(a), _as_float64(b)
        new_nan = np.isnan(b64) & ~np.isnan(a64)
        if np.any(new_nan):
            mismatches.append(f"tensor {name!r}: NaN at {int(new_nan.sum())} new places")
        both = np.isfinite(a64) & np.isfinite(b64)
        if np.any((a64 != b64) & ~both & ~np.isnan(a64)):
            mismatches.append(f"tensor {name!r}: infinities differ")
        if not np.any(both):
            continue
        error = float(np.max(np.abs(a64[both] - b64[both])))
        scale = float(np.max(np.abs(a64[both])))
        max_abs = max(max_abs, error)
        max_rel = max(max_rel, error / max(scale, tiny))
    if tolerance is None:
        tolerance = _default_tolerance(expected)
    return OnnxCheck(
        runtime=runtime,
        inputs={name: tuple(int(d) for d in value.shape) for name, value in feeds.items()},
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        tolerance=float(tolerance),
        mismatches=tuple(mismatches),
        compared=tuple(names),
    )
