"""ElementwiseKernel: CuPy's class, with the operation compiled into a C++ loop on the CPU.

The semantics follow ``cupy/_core/_kernel.pyx``: parameters are ``[raw] [_non_const] type
name`` with one-letter type placeholders bound by the array arguments' dtypes (a dtype
mismatch is a TypeError); non-raw arrays are broadcast together and indexed with the loop
index ``i`` (``_ind.size()`` elements, the arrays themselves as ``_raw_<name>``); raw arrays
are CArray views indexed by the operation (``x[j]``, bounds-checked here); scalars are
converted to their parameter's type; output arrays are passed after the inputs or allocated.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass

import numpy as np

from . import build
from .errors import SimulationError
from .launch import launch_lock
from .raw import translate_options

_C_TYPES = {
    np.dtype(np.float64): "double",
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "float16",
    np.dtype(np.int64): "long long",
    np.dtype(np.int32): "int",
    np.dtype(np.int16): "short",
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.bool_): "bool",
}


def _c_type(dtype: np.dtype) -> str:
    try:
        return _C_TYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} is not supported by the simulator's ElementwiseKernel "
            "(supported: bool, integers, float16/32/64)"
        ) from None


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of ``in_params``/``out_params``: ``[raw] [_non_const] type name``."""

    name: str
    dtype: np.dtype | None  # None for a type placeholder
    ctype: str  # placeholder letter, or the C type of dtype
    raw: bool
    is_const: bool


def parse_params(spec: str, is_const: bool) -> tuple[ParameterInfo, ...]:
    if not spec.strip():
        return ()
    out = []
    for item in spec.strip().split(","):
        words = item.split()
        if len(words) < 2:
            raise ValueError(f"syntax error in kernel parameter {item.strip()!r}")
        t, name = words[-2:]
        raw, const = False, is_const
        for w in words[:-2]:
            if w == "raw":
                raw = True
            elif w == "_non_const":
                const = False
            else:
                raise ValueError(f"unknown keyword {w!r} in kernel parameter {item.strip()!r}")
        if len(t) == 1:
            out.append(ParameterInfo(name, None, t, raw, const))
        else:
            dt = np.dtype(t)
            out.append(ParameterInfo(name, dt, _c_type(dt), raw, const))
    return tuple(out)


def _is_scalar(a: object) -> bool:
    return isinstance(a, (bool, int, float, complex, np.generic))


class ElementwiseKernel:
    """CPU stand-in for ``cupy.ElementwiseKernel``.

    ``kernel(*inputs)`` or ``kernel(*inputs, *outputs)`` with NumPy arrays and scalars;
    ``size=`` gives the loop size when every array is raw. ``block_size`` and ``stream`` are
    accepted and ignored. Returns the output array (a tuple for several outputs, None with
    ``no_return=True``). Note that, as in CuPy, outputs are passed positionally: there is no
    ``out=`` keyword. A call that runs longer than ``timeout`` seconds (class attribute,
    60; 0 for none) is stopped with a SimulationError.
    """

    timeout: float = 60.0

    def __init__(
        self,
        in_params: str,
        out_params: str,
        operation: str,
        name: str = "kernel",
        reduce_dims: bool = True,
        preamble: str = "",
        no_return: bool = False,
        return_tuple: bool = False,
        **kwargs,
    ):
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f'Invalid kernel name: "{name}"')
        unknown = set(kwargs) - {"options", "loop_prep", "after_loop"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        self.in_params = parse_params(in_params, True)
        self.out_params = parse_params(out_params, False)
        self.params = self.in_params + self.out_params
        if "i" in [p.name for p in self.params]:
            raise ValueError("Can not use 'i' as a parameter name")
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout
        self.operation, self.name, self.preamble = operation, name, preamble
        self.reduce_dims, self.no_return, self.return_tuple = reduce_dims, no_return, return_tuple
        self.loop_prep = kwargs.get("loop_prep", "")
        self.after_loop = kwargs.get("after_loop", "")
        self._flags = translate_options(kwargs.get("options", ()))
        self._functions: dict[tuple, object] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ types
    def _decide_types(self, in_dtypes, out_dtypes):
        """CuPy's _decide_params_type_core: bind placeholders, check fixed types."""
        bound: dict[str, np.dtype] = {}
        for params, dtypes in ((self.out_params, out_dtypes), (self.in_params, in_dtypes)):
            for p, d in zip(params, dtypes, strict=False):
                if d is None:
                    continue
                if p.dtype is not None:
                    if d != p.dtype:
                        raise TypeError(f"Type is mismatched. {p.name} {d} {p.dtype}")
                elif p.ctype in bound:
                    if bound[p.ctype] != d:
                        raise TypeError(
                            f"Type is mismatched. {p.name} {d} {bound[p.ctype]} {p.ctype}"
                        )
                else:
                    bound[p.ctype] = d

        def resolve(p):
            if p.dtype is not None:
                return p.dtype
            if p.ctype not in bound:
                raise TypeError(
                    f"the type {p.ctype} of parameter {p.name} is not determined "
                    "by any array argument"
                )
            return bound[p.ctype]

        return (
            [resolve(p) for p in self.in_params],
            [resolve(p) for p in self.out_params],
            tuple(sorted(bound.items())),
        )

    # ------------------------------------------------------------------- call
    def __call__(
        self, *args, size: int | None = None, block_size: int | None = None, stream=None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"Wrong arguments {kwargs}")
        if block_size is not None and block_size <= 0:
            raise ValueError("block_size must be greater than zero")
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(
                f"Wrong number of arguments for {self.name!r}. It must be either {self.nin} or "
                f"{self.nargs} (with outputs), but given {len(args)}."
            )
        for a in args:
            if not (isinstance(a, np.ndarray) or _is_scalar(a)):
                raise TypeError(
                    f"{self.name}: unsupported argument type {type(a).__name__} "
                    "(NumPy arrays and scalars only)"
                )
        ins, outs = list(args[: self.nin]), list(args[self.nin :])
        for o in outs:
            if not isinstance(o, np.ndarray):
                raise TypeError("Output arguments must be NumPy arrays")
        nonraw = [
            a
            for a, p in zip(args, self.params, strict=False)
            if isinstance(a, np.ndarray) and not p.raw
        ]
        if size is not None:
            if nonraw:
                raise ValueError(
                    "Specified 'size' can be used only if all of the ndarray are 'raw'."
                )
            shape: tuple[int, ...] = (int(size),)
        else:
            if not nonraw:
                raise ValueError("Loop size is undecided.")
            shape = tuple(np.broadcast_shapes(*[a.shape for a in nonraw]))
        in_dtypes = [a.dtype if isinstance(a, np.ndarray) else None for a in ins]
        in_types, out_types, type_map = self._decide_types(in_dtypes, [o.dtype for o in outs])
        if not outs:
            for p in self.out_params:
                if p.raw and size is None:
                    raise ValueError("Output array size is Undecided")
            outs = [np.empty(shape, dtype=t) for t in out_types]
        else:
            for p, o in zip(self.out_params, outs, strict=False):
                if not p.raw and o.shape != shape:
                    raise ValueError("Out shape is mismatched")
        ret = (
            None
            if self.no_return
            else (outs[0] if (self.nout == 1 and not self.return_tuple) else tuple(outs))
        )
        if 0 in shape:
            return ret
        self._run(ins, outs, in_types, out_types, type_map, shape)
        return ret

    def _run(self, ins, outs, in_types, out_types, type_map, shape) -> None:
        values = ins + outs
        types = in_types + out_types
        loop_shape = shape if shape else (1,)
        views: list[np.ndarray] = []
        for p, a, t in zip(self.params, values, types, strict=False):
            if not isinstance(a, np.ndarray):
                views.append(np.array(a, dtype=t))  # CuPy casts scalars to the parameter type
            elif p.raw:
                views.append(a)
            else:
                views.append(np.broadcast_to(a, shape).reshape(loop_shape))
        nonraw = [
            isinstance(a, np.ndarray) and not p.raw
            for p, a in zip(self.params, values, strict=True)
        ]
        pairs = list(zip(views, nonraw, strict=True))
        if self.reduce_dims and all(v.flags.c_contiguous for v, nr in pairs if nr):
            loop_shape = (int(np.prod(loop_shape)),)
            views = [v.reshape(loop_shape) if nr else v for v, nr in pairs]
        kinds = tuple(
            ("array", v.ndim) if isinstance(a, np.ndarray) else ("scalar", 0)
            for v, a in zip(views, values, strict=False)
        )
        key = (tuple(str(t) for t in types), kinds, len(loop_shape), type_map)
        fn = self._function(key, types, kinds, len(loop_shape), type_map)
        meta = [*loop_shape]
        pointers = []
        for v, (kind, _) in zip(views, kinds, strict=False):
            if kind == "array":
                meta += [*v.shape, *v.strides]
            pointers.append(v.__array_interface__["data"][0])
        meta_arr = (ctypes.c_int64 * max(1, len(meta)))(*meta)
        ptr_arr = (ctypes.c_void_p * max(1, len(pointers)))(*pointers)
        err = ctypes.create_string_buffer(4096)
        with launch_lock:
            rc = fn(ptr_arr, meta_arr, err, len(err), float(self.timeout))
        if rc != 0:
            msg = err.value.decode(errors="replace").strip()
            msg = re.sub(r"^ERROR: ", "", msg, flags=re.M)
            raise SimulationError(f"ElementwiseKernel {self.name}: {msg}")

    # ---------------------------------------------------------------- compile
    def _function(self, key, types, kinds, ndim, type_map):
        with self._lock:
            fn = self._functions.get(key)
        if fn is not None:
            return fn
        source = self._source(types, kinds, ndim, type_map)
        art = build.build(source, flags=self._flags)
        lib = ctypes.CDLL(str(art.path), mode=ctypes.RTLD_LOCAL)
        fn = lib.emu_elementwise
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint64,
            ctypes.c_double,
        ]
        fn._lib = lib  # keep the library loaded
        with self._lock:
            self._functions[key] = fn
        return fn

    def _source(self, types, kinds, ndim, type_map) -> str:
        decls, refs = [], []
        meta = ndim
        for k, (p, t, (kind, nd)) in enumerate(zip(self.params, types, kinds, strict=False)):
            ct = _c_type(t)
            if kind == "scalar":
                decls.append(f"  const {ct} {p.name} = *static_cast<const {ct}*>(_p[{k}]);")
                continue
            const = "const " if p.is_const else ""
            var = p.name if p.raw else f"_raw_{p.name}"
            decls.append(
                f"  {const}CArray<{ct}, {nd}> {var}(static_cast<{ct}*>(_p[{k}]), "
                f'_meta + {meta}, _meta + {meta + nd}, "{p.name}");'
            )
            meta += 2 * nd
            if not p.raw:
                refs.append(f"{const}{ct}& {p.name} = _raw_{p.name}[_ind.get()];")
        typedefs = "".join(f"typedef {_c_type(t)} {name};\n" for name, t in type_map)
        return (
            '#include "emu_elementwise.h"\n'
            "using emu::CArray;\nusing emu::CIndexer;\nusing float16 = emu::float16;\n"
            f"{typedefs}"
            f'#line 1 "<{self.name} preamble>"\n{self.preamble}\n'
            '#line 1 "<elementwise loop>"\n'
            "EMU_EXPORT int emu_elementwise(void** _p, const int64_t* _meta, char* _err, "
            "uint64_t _errcap, double _timeout) {\n"
            f"  CIndexer<{ndim}> _ind(_meta);\n" + "\n".join(decls) + "\n"
            "  return emu::run_elementwise([&]() {\n"
            f'#line 1 "<{self.name} loop_prep>"\n{self.loop_prep};\n'
            '#line 1 "<elementwise loop>"\n'
            "    for (ptrdiff_t i = 0; i < _ind.size(); ++i) {\n"
            "      _ind.set(i);\n"
            f"      {' '.join(refs)}\n"
            f'#line 1 "<{self.name} operation>"\n{self.operation};\n'
            '#line 1 "<elementwise loop>"\n'
            "    }\n"
            f'#line 1 "<{self.name} after_loop>"\n{self.after_loop};\n'
            '#line 1 "<elementwise loop>"\n'
            "  }, _err, _errcap, _timeout);\n}\n"
        )
