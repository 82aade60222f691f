"""Reading and writing ONNX model files: atomic writes, external data kept external."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cupy_bn.fold.onnx_graph import OnnxFoldError, import_onnx, subgraphs
from cupy_bn.modelfile import require_regular_file

if TYPE_CHECKING:
    import onnx

# ---------------------------------------------------------------------------------------------
# Files


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model, with its external data, from `path`.

    Raises `OnnxFoldError` naming the file when it is missing, not a regular file, unreadable,
    not an ONNX model (garbage, an empty file, another protobuf), or its external data is
    missing.
    """
    onnx = import_onnx()
    path = Path(path)
    require_regular_file(path, OnnxFoldError)
    try:
        model = onnx.load_model(os.fspath(path), load_external_data=True)
    except OSError as e:
        raise OnnxFoldError(f"{path}: cannot read it or its external data ({e})") from None
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, onnx ValidationError, ...
        raise OnnxFoldError(f"{path}: not a valid ONNX model ({e})") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise OnnxFoldError(f"{path}: not an ONNX model (no IR version or no graph)")
    return model


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of a graph and all its subgraphs."""
    onnx = import_onnx()
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
        for sub in subgraphs(node):
            yield from _all_tensors(sub)


def has_external_data(path: str | os.PathLike[str]) -> bool:
    """True when the ONNX model at `path` keeps some tensors in external data files.

    Reads only the model file. Raises `OnnxFoldError` naming the file if it is not a model.
    """
    onnx = import_onnx()
    path = Path(path)
    try:
        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - OSError, protobuf DecodeError, ...
        raise OnnxFoldError(f"{path}: not a readable ONNX model ({e})") from None
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


def _write_atomically(path: Path, data: Iterable[bytes], overwrite: bool) -> None:
    """Write `data` to `path` through `cupy_bn.modelfile.atomic_output`: a temporary file next
    to `path` with the umask's permissions, renamed (or hard-linked, without overwrite) into
    place; errors name `path`.
    """
    from cupy_bn.modelfile import ModelFileError, atomic_output

    try:
        with atomic_output(path, overwrite=overwrite) as f:
            for chunk in data:
                f.write(chunk)
    except ModelFileError as e:
        raise OnnxFoldError(str(e)) from None
    except OSError as e:
        raise OnnxFoldError(f"{path}: cannot write it ({e.strerror or e})") from None


def _file_chunks(path: Path, size: int = 1 << 22) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def save_onnx(
    path: str | os.PathLike[str],
    model: onnx.ModelProto,
    *,
    overwrite: bool = False,
    external_data: bool = False,
) -> None:
    """Write `model` to `path` atomically (temporary file next to it, then rename).

    The file gets the permissions the umask allows (`0o666 & ~umask`). An existing file is
    never replaced unless `overwrite=True`. With `external_data=True` the tensors (1 KiB and
    larger) go to one file `<filename>.data` next to `path`, which is written first, also
    atomically. `model` is not modified. Errors are `OnnxFoldError` naming the target file.
    """
    onnx = import_onnx()
    path = Path(path)
    if not isinstance(model, onnx.ModelProto):
        raise OnnxFoldError(f"{path}: expected an onnx.ModelProto, got {type(model).__name__}")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxFoldError(f"{path}: directory {directory} does not exist")
    data_path = path.with_name(path.name + ".data")
    targets = [path, data_path] if external_data else [path]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OnnxFoldError(f"{target}: already exists (refusing to overwrite it)")
    if not external_data:
        try:
            serialized = model.SerializeToString()
        except ValueError as e:
            raise OnnxFoldError(
                f"{path}: cannot serialize the model ({e}); save it with external data"
            ) from None
        _write_atomically(path, [serialized], overwrite)
        return
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory))
    except OSError as e:
        raise OnnxFoldError(f"{path}: cannot write it ({e.strerror or e})") from None
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        try:
            onnx.save_model(
                copy,
                os.fspath(staging / path.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_path.name,
            )
        except OSError as e:
            raise OnnxFoldError(f"{path}: cannot write it ({e.strerror or e})") from None
        except Exception as e:  # noqa: BLE001 - onnx/protobuf serialization errors
            raise OnnxFoldError(f"{path}: cannot serialize the model ({e})") from None
        staged_data = staging / data_path.name
        if not staged_data.exists():
            staged_data.write_bytes(b"")
        _write_atomically(data_path, _file_chunks(staged_data), overwrite)
        _write_atomically(path, _file_chunks(staging / path.name), overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
