"""Per-channel arithmetic of :mod:`portable_bn._agnostic`, traced into CUDA C for one kernel.

Why: CuPy runs each operation of the shared per-channel arithmetic (statistics, the running
update, the output's coefficients: some fifty operations on C-element vectors) as a kernel
launch of its own, about 7 us each. :func:`trace` runs such a function once with a namespace
(:class:`Namespace`) whose arrays are symbols; every operation appends a C statement, and the
result is the body of one ``cupy.ElementwiseKernel`` over the channels. The rules stay in
the Python function; the generated code restates none of them by hand, and
``tests/test_cuda_trace.py`` compiles it on the CPU (g++) and compares it with the same
function run by NumPy, bit for bit.

The namespace follows NumPy's and the array API's semantics for what the per-channel functions
use: float32/float64/bool values, promotion of mixed float dtypes to float64, Python scalars
(and the traced scalar options) taking the array's dtype, NaN-propagating ``maximum`` and
``minimum``. A value-dependent Python ``if`` on a symbol raises TypeError. Each C operation
rounds as NumPy's does where both follow IEEE 754 (``+ - * /``, ``sqrt``, conversions; the
kernels are compiled without fused multiply-adds); ``log2``, ``exp2`` and ``floor`` serve only
:func:`~portable_bn._agnostic.power_of_two_scale`, where they are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DType:
    """A dtype of the traced namespace."""

    name: str
    ctype: str

    def __str__(self) -> str:
        return self.name


FLOAT32 = DType("float32", "float")
FLOAT64 = DType("float64", "double")
BOOL = DType("bool", "bool")
_BY_NAME = {d.name: d for d in (FLOAT32, FLOAT64, BOOL)}


def dtype_of(dtype: Any) -> DType:
    """The traced dtype of a NumPy/CuPy dtype (or a name)."""
    if isinstance(dtype, DType):
        return dtype
    return _BY_NAME[np.dtype(dtype).name]


def _literal(value: float, dtype: DType) -> str:
    """An exact C literal of ``value`` in ``dtype``."""
    if dtype is BOOL:
        return "true" if value else "false"
    if math.isinf(value):
        bits = "__int_as_float(0x7f800000)" if dtype is FLOAT32 else "__longlong_as_double(0x7ff0000000000000LL)"
        return bits if value > 0 else f"(-{bits})"
    if math.isnan(value):
        return "__int_as_float(0x7fc00000)" if dtype is FLOAT32 else "__longlong_as_double(0x7ff8000000000000LL)"
    return f"(({dtype.ctype}){float(value).hex()})"


@dataclass
class Program:
    """The statements of one traced function: inputs, temporaries, outputs."""

    inputs: list[tuple[str, DType, bool]] = field(default_factory=list)
    """(name, dtype, scalar): vectors (or 0-d arrays) and traced scalar options, in order."""
    statements: list[str] = field(default_factory=list)
    outputs: list[tuple[str, DType]] = field(default_factory=list)
    count: int = 0

    def temporary(self, expression: str, dtype: DType) -> Value:
        name = f"t{self.count}"
        self.count += 1
        self.statements.append(f"const {dtype.ctype} {name} = {expression};")
        return Value(self, name, dtype)

    def input(self, dtype: DType, *, scalar: bool) -> Value:
        name = f"s{len(self.inputs)}" if scalar else f"v{len(self.inputs)}"
        self.inputs.append((name, dtype, scalar))
        return Value(self, name, dtype, weak=scalar)

    def output(self, value: Value) -> str:
        name = f"o{len(self.outputs)}"
        self.outputs.append((name, value.dtype))
        self.statements.append(f"{name} = {value.name};")
        return name

    @property
    def body(self) -> str:
        return "\n".join(self.statements)


class Value:
    """A per-channel value of a traced program (``weak``: a Python scalar's, which takes the
    dtype of the array it meets)."""

    __array_priority__ = 1000

    def __init__(
        self, program: Program, name: str, dtype: DType, *, weak: bool = False, literal: float | None = None
    ) -> None:
        self.program, self.name, self.dtype, self.weak, self.literal = program, name, dtype, weak, literal

    @property
    def ndim(self) -> int:
        """0 for a scalar (a Python scalar's, or one computed from scalars only), else 1."""
        return 0 if self.weak else 1

    def __bool__(self) -> bool:
        raise TypeError("a per-channel function branches on a traced value: use xp.where")

    # arithmetic and comparisons
    def _binary(self, other: Any, op: str, *, reverse: bool = False, result: DType | None = None) -> Value:
        a, b = (_operand(self.program, other), self) if reverse else (self, _operand(self.program, other))
        dtype = _promote(a, b)
        expression = f"({_cast(a, dtype)} {op} {_cast(b, dtype)})"
        out = self.program.temporary(expression, result or dtype)
        out.weak = a.weak and b.weak and result is None
        return out

    def __add__(self, other: Any) -> Value:
        return self._binary(other, "+")

    def __radd__(self, other: Any) -> Value:
        return self._binary(other, "+", reverse=True)

    def __sub__(self, other: Any) -> Value:
        return self._binary(other, "-")

    def __rsub__(self, other: Any) -> Value:
        return self._binary(other, "-", reverse=True)

    def __mul__(self, other: Any) -> Value:
        return self._binary(other, "*")

    def __rmul__(self, other: Any) -> Value:
        return self._binary(other, "*", reverse=True)

    def __truediv__(self, other: Any) -> Value:
        return self._binary(other, "/")

    def __rtruediv__(self, other: Any) -> Value:
        return self._binary(other, "/", reverse=True)

    def __rpow__(self, base: Any) -> Value:
        if base != 2.0:
            raise TypeError("only 2.0 ** value is traced")
        return _call(self.program, "exp2", self)

    def __neg__(self) -> Value:
        out = self.program.temporary(f"(-{self.name})", self.dtype)
        out.weak = self.weak
        return out

    def __lt__(self, other: Any) -> Value:
        return self._binary(other, "<", result=BOOL)

    def __le__(self, other: Any) -> Value:
        return self._binary(other, "<=", result=BOOL)

    def __gt__(self, other: Any) -> Value:
        return self._binary(other, ">", result=BOOL)

    def __ge__(self, other: Any) -> Value:
        return self._binary(other, ">=", result=BOOL)

    def __eq__(self, other: Any) -> Value:  # type: ignore[override]
        return self._binary(other, "==", result=BOOL)

    def __ne__(self, other: Any) -> Value:  # type: ignore[override]
        return self._binary(other, "!=", result=BOOL)

    def __and__(self, other: Any) -> Value:
        return self._binary(other, "&&", result=BOOL)

    def __or__(self, other: Any) -> Value:
        return self._binary(other, "||", result=BOOL)

    def __invert__(self) -> Value:
        if self.dtype is not BOOL:
            raise TypeError("~ is traced for booleans only")
        return self.program.temporary(f"(!{self.name})", BOOL)

    __hash__ = None  # type: ignore[assignment]


def _operand(program: Program, value: Any) -> Value:
    if isinstance(value, Value):
        return value
    if isinstance(value, bool | np.bool_):
        return Value(program, _literal(bool(value), BOOL), BOOL, weak=True)
    if isinstance(value, int | float | np.floating | np.integer):  # written, exactly, where it is used
        return Value(program, _literal(float(value), FLOAT64), FLOAT64, weak=True, literal=float(value))
    raise TypeError(f"cannot trace an operand of type {type(value).__name__}")


def _promote(a: Value, b: Value) -> DType:
    if a.dtype is BOOL and b.dtype is BOOL:
        return BOOL
    if a.weak and not b.weak:
        return b.dtype
    if b.weak and not a.weak:
        return a.dtype
    return FLOAT64 if FLOAT64 in (a.dtype, b.dtype) else FLOAT32


def _cast(value: Value, dtype: DType) -> str:
    if value.literal is not None:  # a Python scalar: an exact literal of the dtype
        return _literal(value.literal, dtype)
    if value.dtype is dtype:
        return value.name
    return f"(({dtype.ctype}){value.name})"


_FUNCTIONS = {"sqrt", "log2", "exp2", "floor", "fabs"}


def _call(program: Program, function: str, value: Value) -> Value:
    dtype = FLOAT32 if value.dtype is FLOAT32 else FLOAT64
    suffix = "f" if dtype is FLOAT32 else ""
    out = program.temporary(f"{function}{suffix}({_cast(value, dtype)})", dtype)
    out.weak = value.weak
    return out


def _extremum(program: Program, a: Any, b: Any, op: str) -> Value:
    """NaN-propagating maximum (``op`` ``>``) or minimum (``<``), as NumPy's."""
    x, y = _operand(program, a), _operand(program, b)
    dtype = _promote(x, y)
    xs, ys = _cast(x, dtype), _cast(y, dtype)
    return program.temporary(f"(({xs} != {xs} || {xs} {op} {ys}) ? {xs} : {ys})", dtype)


class Namespace:
    """The array namespace a per-channel function is traced with (see the module docstring)."""

    __name__ = "portable_bn.cuda_trace"
    float32, float64, bool = FLOAT32, FLOAT64, BOOL

    def __init__(self, program: Program) -> None:
        self.program = program

    def finfo(self, dtype: Any) -> Any:
        return np.finfo(dtype_of(dtype).name)

    def astype(self, value: Value, dtype: Any) -> Value:
        target = dtype_of(dtype)
        if value.dtype is target and not value.weak:
            return value
        return self.program.temporary(_cast(value, target), target)  # C's conversion rounds to nearest

    def where(self, condition: Value, a: Any, b: Any) -> Value:
        x, y = _operand(self.program, a), _operand(self.program, b)
        dtype = _promote(x, y)
        return self.program.temporary(f"({condition.name} ? {_cast(x, dtype)} : {_cast(y, dtype)})", dtype)

    def sqrt(self, value: Value) -> Value:
        return _call(self.program, "sqrt", value)

    def log2(self, value: Value) -> Value:
        return _call(self.program, "log2", value)

    def floor(self, value: Value) -> Value:
        return _call(self.program, "floor", value)

    def abs(self, value: Value) -> Value:
        return _call(self.program, "fabs", value)

    def isfinite(self, value: Value) -> Value:
        return self.program.temporary(f"isfinite({value.name})", BOOL)

    def maximum(self, a: Any, b: Any) -> Value:
        return _extremum(self.program, a, b, ">")

    def minimum(self, a: Any, b: Any) -> Value:
        return _extremum(self.program, a, b, "<")

    def full_like(self, value: Value, fill: float) -> Value:
        return self.program.temporary(_literal(fill, value.dtype), value.dtype)

    def zeros_like(self, value: Value) -> Value:
        return self.full_like(value, 0.0)

    def ones_like(self, value: Value) -> Value:
        return self.full_like(value, 1.0)


@dataclass(frozen=True)
class Traced:
    """A traced function: the C body, its inputs and outputs, and how to rebuild its result."""

    program: Program
    rebuild: Callable[[list[Any]], Any]


def trace(fn: Callable[..., Any], vectors: list[DType | str | None], options: dict[str, Any]) -> Traced:
    """Trace ``fn(xp, *vectors, **options)``.

    ``vectors``: per position, the dtype of an array input, None for None, or ``"scalar"`` for a
    Python scalar traced as an input. Float and int ``options`` become scalar inputs (after the
    vectors, in the order given); other options (flags, dtypes, None) are fixed in the code.
    The result is a value, None, or a (named) tuple of them."""
    program = Program()
    xp = Namespace(program)
    arguments: list[Value | None] = []
    for spec in vectors:
        if spec is None:
            arguments.append(None)
        elif spec == "scalar":
            arguments.append(program.input(FLOAT64, scalar=True))
        else:
            arguments.append(program.input(dtype_of(spec), scalar=False))
    fixed: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, float | int) and not isinstance(value, bool):
            fixed[name] = program.input(FLOAT64, scalar=True)
        elif isinstance(value, np.dtype | DType):
            fixed[name] = dtype_of(value)
        else:
            fixed[name] = value
    result = fn(xp, *arguments, **fixed)
    return Traced(program, _rebuilder(program, result))


def _rebuilder(program: Program, result: Any) -> Callable[[list[Any]], Any]:
    """Register ``result``'s values as outputs; return the function that puts arrays back."""
    if result is None:
        return lambda arrays: None
    if isinstance(result, Value):
        index = len(program.outputs)
        program.output(result)
        return lambda arrays: arrays[index]
    if isinstance(result, tuple):
        parts = [_rebuilder(program, part) for part in result]
        make = type(result)
        if hasattr(make, "_fields"):
            return lambda arrays: make(*(part(arrays) for part in parts))
        return lambda arrays: tuple(part(arrays) for part in parts)
    raise TypeError(f"a traced per-channel function returned {type(result).__name__}")
