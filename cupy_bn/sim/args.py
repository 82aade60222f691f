"""Kernel arguments, packed byte for byte as CuPy packs them.

CuPy hands the driver a pointer to each argument's bytes and the kernel reads as many bytes
as its parameter type has:

* an array becomes a pointer to its data (``arr.data.ptr``): no copy, no check of its dtype,
  shape or strides, so a non-contiguous view is passed as the address of its first element;
* ``None`` becomes a null pointer;
* a NumPy scalar keeps its dtype; a Python ``bool`` is packed as ``bool`` (1 byte), ``int``
  as ``int64`` (``uint64`` from 2**63 on), ``float`` as ``float64``, ``complex`` as
  ``complex128`` (``cupy/_core/_scalar.pyx``).

So a Python ``float`` passed to a ``float`` parameter arrives as the low 4 bytes of a double
(garbage) and a ``numpy.int32`` passed to a ``long long`` parameter reads 4 bytes past the
value. The simulator packs exactly these bytes (padding with 0xCD where the kernel reads past
the value) and warns with :class:`ArgumentTypeWarning` whenever the C type differs.

Arrays are grouped into memory regions (arrays whose bytes overlap share one region, so
aliasing works as on the GPU); the runtime copies each region next to a guard page.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import numpy as np

from .errors import SimulationError

_NUMERIC = {
    "f4": np.dtype(np.float32),
    "f8": np.dtype(np.float64),
    "i1": np.dtype(np.int8),
    "i2": np.dtype(np.int16),
    "i4": np.dtype(np.int32),
    "i8": np.dtype(np.int64),
    "u1": np.dtype(np.uint8),
    "u2": np.dtype(np.uint16),
    "u4": np.dtype(np.uint32),
    "u8": np.dtype(np.uint64),
    "?": np.dtype(np.bool_),
}
_HALF_NAMES = ("__half", "half")
_BF16_NAMES = ("__nv_bfloat16", "nv_bfloat16")
_PAD_BYTE = 0xCD  # what the kernel reads past the end of a too-short argument


@dataclass(frozen=True)
class Param:
    """A kernel parameter as the compiler sees it.

    ``code`` is ``f4``/``i8``/``u2``/``?`` for arithmetic types, ``V<n>`` for other types of
    n bytes, with one ``P`` per pointer level (``Pf4`` is ``float*``, ``Pv`` is ``void*``);
    ``spelling`` is the C++ type (``const float*``).
    """

    index: int
    code: str
    spelling: str

    @property
    def is_pointer(self) -> bool:
        return self.code.startswith("P")

    @property
    def size(self) -> int:
        if self.is_pointer:
            return 8
        if self.code == "?":
            return 1
        return int(self.code[1:])

    @property
    def pointee(self) -> str:
        """Spelling of the pointed-to type, without const/volatile."""
        s = self.spelling.rstrip()
        if s.endswith("*"):
            s = s[:-1]
        words = [w for w in s.replace("*", " * ").split() if w not in ("const", "volatile")]
        return " ".join(words)

    def describe(self) -> str:
        return f"parameter {self.index} (`{self.spelling}`)"


def parse_signature(sig: str) -> tuple[Param, ...]:
    """Parse ``emu::signature``'s output: ``code|spelling;`` per parameter."""
    params = []
    for i, item in enumerate(x for x in sig.split(";") if x):
        code, _, spelling = item.partition("|")
        params.append(Param(i, code, spelling.strip()))
    return tuple(params)


def cupy_scalar_dtype(value: object) -> np.dtype:
    """The dtype CuPy packs a non-array kernel argument as."""
    if isinstance(value, np.generic):
        return value.dtype
    if type(value) is bool:
        return np.dtype(np.bool_)
    if isinstance(value, int):
        if value >= 2**64 or value < -(2**63):
            raise SimulationError(f"the integer {value} does not fit in 64 bits")
        return np.dtype(np.uint64 if value >= 2**63 else np.int64)
    if isinstance(value, float):
        return np.dtype(np.float64)
    if isinstance(value, complex):
        return np.dtype(np.complex128)
    raise SimulationError(
        f"cannot pass a {type(value).__name__} to a kernel: pass a NumPy array, None, "
        "a NumPy scalar or a Python bool/int/float"
    )


#: A device copy keeps its host array's address modulo this many bytes: the alignment a
#: 128-bit access needs. CuPy's allocations are 256-byte aligned and a view starts where it
#: starts, so a float32 view at element 1 is 4 bytes past a 16-byte boundary, on the GPU as in
#: the simulator.
COPY_PHASE = 16


def _scalar_mismatch(p: Param, dtype: np.dtype, raw: bytes) -> str | None:
    """Warning text when the packed bytes are not what the parameter type expects."""
    expected = _NUMERIC.get(p.code)
    if expected is None:  # struct, __half, __nv_bfloat16, vector types
        name = p.spelling.replace("const ", "").strip()
        if name in _HALF_NAMES and dtype == np.float16:
            return None
        if name in _BF16_NAMES and (dtype.name == "bfloat16" or dtype in (np.uint16, np.int16)):
            return None
        if dtype.kind == "V" and dtype.itemsize == p.size:
            return None
        return (
            f"{p.describe()} takes {p.size} bytes, CuPy passes {dtype} ({dtype.itemsize} "
            "bytes): the kernel reads unrelated bytes"
        )
    if dtype == expected:
        return None
    seen = np.frombuffer(raw[: expected.itemsize], dtype=expected)[0].item()
    how = f"it sees {seen!r}"
    fits = dtype.kind in "iub" and expected.kind in "iu" and dtype.itemsize >= expected.itemsize
    hint = f"pass numpy.{expected.name}(...)" if expected.kind != "b" else "pass a Python bool"
    if fits:
        how += " (right only while the value fits)"
    if expected.itemsize <= dtype.itemsize:
        reads = f"the kernel reads the first {expected.itemsize} of its {dtype.itemsize} bytes"
    else:
        reads = (
            f"the kernel reads {expected.itemsize} bytes, only {dtype.itemsize} of them "
            "the argument's"
        )
    return (
        f"{p.describe()} is {expected.name} but CuPy passes this argument as {dtype}: "
        f"{reads}, {how}; {hint}"
    )


def _pointer_mismatch(p: Param, arr: np.ndarray) -> str | None:
    code = p.code[1:]
    dt = arr.dtype
    if code == "v" or code.startswith("P") or code in ("i1", "u1"):
        return None  # void*, char* and pointer arrays see raw bytes
    expected = _NUMERIC.get(code)
    if expected is not None:
        if dt == expected:
            return None
        return (
            f"{p.describe()} points to {expected.name} but the array is {dt}: the kernel "
            "reinterprets its bytes"
        )
    size = int(code[1:])
    name = p.pointee
    if name in _HALF_NAMES:
        ok = dt == np.float16
    elif name in _BF16_NAMES:
        ok = dt.name == "bfloat16" or dt in (np.uint16, np.int16)
    else:  # structs and vector types: same item size, or elements that tile the struct
        ok = dt.itemsize == size or (dt.kind != "V" and dt.itemsize and size % dt.itemsize == 0)
    if ok:
        return None
    return (
        f"{p.describe()} points to {size}-byte elements but the array is {dt} "
        f"({dt.itemsize} bytes): the kernel reinterprets its bytes"
    )


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    if a.flags.c_contiguous or a.flags.f_contiguous or a.size == 0:
        lo = a.__array_interface__["data"][0]
        return lo, lo + a.nbytes
    lo = hi = a.__array_interface__["data"][0]
    for n, s in zip(a.shape, a.strides, strict=False):
        if s >= 0:
            hi += s * (n - 1)
        else:
            lo += s * (n - 1)
    return lo, hi + a.itemsize


@dataclass
class RegionSpec:
    lo: int
    hi: int
    writeable: bool
    align: int
    args: list[int] = field(default_factory=list)


@dataclass
class Packed:
    """The bytes and memory regions of one launch's arguments."""

    storage: ctypes.Array
    slots: list[int]  # byte offset of each argument in storage
    arg_region: list[int]  # region of each pointer argument (-1: none)
    arg_offset: list[int]  # byte offset of the pointer inside its region
    regions: list[RegionSpec]
    warnings: list[str]
    arrays: dict[int, np.ndarray]  # array arguments by index (their memory is in regions)
    keepalive: bytearray  # the bytes behind storage


@functools.lru_cache(maxsize=1024)
def _layout(params: tuple[Param, ...]) -> tuple[list[int], list[int], int]:
    """Byte offset and width of every argument's slot (16-byte aligned), and the total."""
    slots, widths, total = [], [], 0
    for p in params:
        width = max(16, (p.size + 15) // 16 * 16)
        slots.append(total)
        widths.append(width)
        total += width
    return slots, widths, total


def pack_arguments(params: tuple[Param, ...], args: tuple | list, kernel: str) -> Packed:
    """Pack ``args`` for a kernel with ``params``; raise on what CuPy could not pass."""
    if not isinstance(args, (tuple, list)):
        raise SimulationError(
            f"{kernel}: the kernel arguments must be a tuple (got {type(args).__name__})"
        )
    if len(args) != len(params):
        sig = ", ".join(p.spelling for p in params)
        raise SimulationError(
            f"{kernel} takes {len(params)} arguments ({sig}) but {len(args)} were given"
        )
    slots, widths, total = _layout(params)
    raw = bytearray(total)
    warnings: list[str] = []
    arg_region = [-1] * len(params)
    arg_offset = [0] * len(params)
    arrays: list[tuple[int, int, int, np.ndarray]] = []  # (lo, hi, arg index, array)
    for p, a, slot, width in zip(params, args, slots, widths, strict=True):
        if isinstance(a, np.ndarray):
            if not p.is_pointer:
                raise SimulationError(
                    f"{kernel}: {p.describe()} is not a pointer but an array was passed"
                )
            if a.dtype.hasobject:
                raise SimulationError(f"{kernel}: {p.describe()}: object arrays cannot be passed")
            msg = _pointer_mismatch(p, a)
            if msg:
                warnings.append(f"{kernel}: {msg}")
            lo, hi = _byte_bounds(a)
            arrays.append((lo, hi, p.index, a))
        elif a is None:
            if not p.is_pointer:
                raise SimulationError(
                    f"{kernel}: {p.describe()} is not a pointer but None was passed"
                )
        else:
            if p.is_pointer:
                raise SimulationError(
                    f"{kernel}: {p.describe()} is a pointer but a {type(a).__name__} was passed "
                    "(pass a NumPy array, or None for a null pointer)"
                )
            dtype = cupy_scalar_dtype(a)
            value = np.asarray(a, dtype=dtype).tobytes()[:width]
            raw[slot : slot + width] = value + bytes([_PAD_BYTE]) * (width - len(value))
            msg = _scalar_mismatch(p, dtype, bytes(raw[slot : slot + width]))
            if msg:
                warnings.append(f"{kernel}: {msg}")
    regions = _group_regions(arrays)
    for r_index, r in enumerate(regions):
        for i in r.args:
            arg_region[i] = r_index
            arg_offset[i] = _data_ptr(args[i]) - r.lo
    storage = (ctypes.c_char * max(1, total)).from_buffer(raw) if total else (ctypes.c_char * 1)()
    return Packed(
        storage,
        slots,
        arg_region,
        arg_offset,
        regions,
        warnings,
        {i: a for _, _, i, a in arrays},
        raw,
    )


def _data_ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _group_regions(arrays: list[tuple[int, int, int, np.ndarray]]) -> list[RegionSpec]:
    """Merge arrays whose byte ranges overlap into shared regions (aliasing preserved)."""
    regions: list[RegionSpec] = []
    for lo, hi, index, a in sorted(arrays, key=lambda t: (t[0], t[1])):
        align = COPY_PHASE
        last = regions[-1] if regions else None
        if last is not None and lo < last.hi and hi > lo:
            last.hi = max(last.hi, hi)
            last.writeable |= a.flags.writeable
            last.align = max(last.align, align)
            last.args.append(index)
        else:
            regions.append(RegionSpec(lo, hi, a.flags.writeable, align, [index]))
    return regions
