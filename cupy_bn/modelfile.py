"""Reading and writing models stored as `.npz` archives of arrays under PyTorch state-dict names.

Loading never unpickles (`allow_pickle=False`): object arrays and pickled members are rejected
with a `ModelFileError` naming the file and the member. Writing is atomic: the archive is built
in a temporary file next to the target and renamed into place, so a reader never sees half a
file and an interrupted write leaves the target untouched. The file gets the mode any new file
gets under the process umask (`0o666 & ~umask`), not the temporary file's 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"


class ModelFileError(ValueError):
    """A model file cannot be read or written as asked (the message names the file)."""


def require_regular_file(path: Path, error: type[Exception]) -> None:
    """Raise `error` naming `path` unless it is an existing regular file (links followed)."""
    if not path.exists():
        raise error(f"{path}: no such file")
    if not path.is_file():
        raise error(f"{path}: not a regular file")


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` archive into a dict, in the archive's member order.

    Raises `ModelFileError` for a missing or unreadable file, a file that is not an `.npz`
    archive (a `.npy` file, a pickle, garbage), a corrupt archive, members that are not `.npy`
    arrays, and object arrays (which would need unpickling).
    """
    path = Path(path)
    require_regular_file(path, ModelFileError)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if head == _NPY_MAGIC:
        raise ModelFileError(f"{path}: is a single .npy array, expected an .npz archive")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not an .npz archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members:
                raise ModelFileError(f"{path}: the archive holds no arrays")
            arrays: dict[str, np.ndarray] = {}
            for member in members:
                name = member.filename
                if not name.endswith(".npy"):
                    raise ModelFileError(
                        f"{path}: member {name!r} is not a .npy array (not an .npz archive?)"
                    )
                key = name[: -len(".npy")]
                with archive.open(member) as fp:
                    arrays[key] = _read_member(path, key, fp)
            return arrays
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise ModelFileError(f"{path}: corrupt .npz archive ({e})") from None


def _read_member(path: Path, key: str, fp: BinaryIO) -> np.ndarray:
    try:
        array = np.lib.format.read_array(fp, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise ModelFileError(
                f"{path}: array {key!r} holds Python objects (pickled data); refusing to load it"
            ) from None
        raise ModelFileError(f"{path}: array {key!r} is unreadable ({e})") from None
    if array.dtype.hasobject:
        raise ModelFileError(f"{path}: array {key!r} holds Python objects; refusing to load it")
    return array


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """`path` as a Path, or ModelFileError when `atomic_output(path)` could not write it.

    Checks what can be known before any work: the directory exists and is writable, `path` is
    not a directory, and (without `overwrite`) does not exist yet.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ModelFileError(f"{path}: directory {directory} does not exist")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise ModelFileError(f"{path}: already exists (refusing to overwrite it)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ModelFileError(f"{path}: cannot write in {directory} ({os.strerror(errno.EACCES)})")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for writing; on success it becomes `path`.

    With `overwrite=False` an existing `path` is never replaced, even if it appears while the
    temporary file is being written (the final step is an atomic hard link where the file
    system has them). On any error the temporary file is removed and `path` is untouched.
    """
    path = check_output_path(path, overwrite=overwrite)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot write in {directory} ({e.strerror or e})") from None
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            _commit(tmp, path, overwrite)
        except OSError as e:
            raise ModelFileError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask_mode() -> int:
    """The mode `open()` gives a new file: `0o666` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ModelFileError(f"{path}: already exists (refusing to overwrite it)") from None
    except OSError:
        # No hard links on this file system: fall back to check-then-rename.
        if path.exists():
            raise ModelFileError(f"{path}: already exists (refusing to overwrite it)") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def save_npz(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], *, overwrite: bool = False
) -> None:
    """Write `arrays` as an uncompressed `.npz` archive (what `numpy.savez` writes), atomically.

    Keys are stored in the mapping's order. Any key is allowed, including names that
    `numpy.savez` cannot take as keyword arguments (`file`, `allow_pickle`). Object arrays
    are refused.
    """
    for key, value in arrays.items():
        if not isinstance(key, str) or not key:
            raise ModelFileError(f"{path}: array names must be non-empty strings, got {key!r}")
        if np.asarray(value).dtype.hasobject:
            raise ModelFileError(f"{path}: array {key!r} holds Python objects; refusing to save")
    with atomic_output(path, overwrite=overwrite) as f:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for key, value in arrays.items():
                with z.open(key + ".npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
