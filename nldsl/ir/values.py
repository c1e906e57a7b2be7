"""Conversions between syntax expressions and IR values, and constant folding."""
from __future__ import annotations

import math

from nldsl.ir import models as M
from nldsl.syntax import ast as A

_BINOPS = {"+", "-", "*", "/", "**"}


def to_value(e: A.Expr) -> M.Value:
    if isinstance(e, A.Bool):
        return e.value
    if isinstance(e, A.Number):
        return e.value
    if isinstance(e, A.String):
        return M.Text(value=e.value)
    if isinstance(e, A.Name):
        return M.Ref(name=e.id)
    if isinstance(e, A.Call):
        return M.Call(func=e.func, args=tuple(to_value(a) for a in e.args),
                      kwargs=tuple((k.name, to_value(k.value)) for k in e.kwargs))
    if isinstance(e, A.BinOp):
        return M.Op(op=e.op, args=(to_value(e.left), to_value(e.right)))
    if isinstance(e, A.Neg):
        inner = to_value(e.operand)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner
        return M.Op(op="neg", args=(inner,))
    if isinstance(e, A.Index):
        return M.Op(op="index", args=(to_value(e.target), to_value(e.index)))
    if isinstance(e, A.Tuple):
        return M.Op(op="tuple", args=tuple(to_value(x) for x in e.items))
    if isinstance(e, A.Chain):
        return M.Op(op="->", args=tuple(to_value(x) for x in e.items))
    raise TypeError(f"not an expression: {e!r}")


def number_text(v: int | float) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    text = repr(float(v))
    return text


def to_expr(v: M.Value) -> A.Expr:
    if isinstance(v, bool):
        return A.Bool(v)
    if isinstance(v, (int, float)):
        if v < 0:
            return A.Neg(A.Number(-v, number_text(-v)))
        return A.Number(v, number_text(v))
    if isinstance(v, M.Text):
        return A.String(v.value)
    if isinstance(v, M.Ref):
        return A.Name(v.name)
    if isinstance(v, M.Call):
        return A.Call(v.func, tuple(to_expr(a) for a in v.args),
                      tuple(A.KwArg(k, to_expr(x)) for k, x in v.kwargs))
    if isinstance(v, M.Op):
        if v.op in _BINOPS:
            return A.BinOp(v.op, to_expr(v.args[0]), to_expr(v.args[1]))
        if v.op == "neg":
            return A.Neg(to_expr(v.args[0]))
        if v.op == "index":
            return A.Index(to_expr(v.args[0]), to_expr(v.args[1]))
        if v.op == "tuple":
            return A.Tuple(tuple(to_expr(a) for a in v.args))
        if v.op == "->":
            return A.Chain(tuple(to_expr(a) for a in v.args))
    raise TypeError(f"not a value: {v!r}")


class NotConstant(Exception):
    """The expression depends on something that is not a known number."""

    def __init__(self, name: str | None = None):
        super().__init__(name or "")
        self.name = name


def fold(e: A.Expr, env: dict[str, object]):
    """Evaluates an expression over numbers, tuples and the given named constants."""
    if isinstance(e, A.Number):
        return e.value
    if isinstance(e, A.Bool):
        return e.value
    if isinstance(e, A.Name):
        if e.id in env:
            return env[e.id]
        raise NotConstant(e.id)
    if isinstance(e, A.Neg):
        return -fold(e.operand, env)
    if isinstance(e, A.Tuple):
        return tuple(fold(x, env) for x in e.items)
    if isinstance(e, A.Index):
        target, idx = fold(e.target, env), fold(e.index, env)
        if isinstance(target, tuple) and isinstance(idx, int) and -len(target) <= idx < len(target):
            return target[idx]
        raise NotConstant()
    if isinstance(e, A.BinOp):
        a, b = fold(e.left, env), fold(e.right, env)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            raise NotConstant()
        try:
            if e.op == "+":
                r = a + b
            elif e.op == "-":
                r = a - b
            elif e.op == "*":
                r = a * b
            elif e.op == "/":
                r = a / b
            else:
                if abs(b) > 4096 or (isinstance(a, int) and abs(a) > 2**64):
                    raise OverflowError
                r = a ** b
        except (ZeroDivisionError, OverflowError, ValueError):
            raise NotConstant() from None
        if isinstance(r, complex) or (isinstance(r, float) and not math.isfinite(r)):
            raise NotConstant()
        if isinstance(r, int) and abs(r) > 2**63:
            raise NotConstant()
        return r
    raise NotConstant()


def walk(v: M.Value):
    """Every part of an IR value, itself first (pre-order; call keywords included)."""
    yield v
    if isinstance(v, M.Call):
        for a in v.args:
            yield from walk(a)
        for _, a in v.kwargs:
            yield from walk(a)
    elif isinstance(v, M.Op):
        for a in v.args:
            yield from walk(a)


def names_in(e: A.Expr):
    """Every ``Name`` in an expression (function names of calls excluded), with its node."""
    if isinstance(e, A.Name):
        yield e
    elif isinstance(e, A.Call):
        for a in e.args:
            yield from names_in(a)
        for k in e.kwargs:
            yield from names_in(k.value)
    elif isinstance(e, A.BinOp):
        yield from names_in(e.left)
        yield from names_in(e.right)
    elif isinstance(e, A.Neg):
        yield from names_in(e.operand)
    elif isinstance(e, A.Index):
        yield from names_in(e.target)
        yield from names_in(e.index)
    elif isinstance(e, (A.Tuple, A.Chain)):
        for x in e.items:
            yield from names_in(x)


def calls_in(e: A.Expr):
    if isinstance(e, A.Call):
        yield e
        for a in e.args:
            yield from calls_in(a)
        for k in e.kwargs:
            yield from calls_in(k.value)
    elif isinstance(e, A.BinOp):
        yield from calls_in(e.left)
        yield from calls_in(e.right)
    elif isinstance(e, A.Neg):
        yield from calls_in(e.operand)
    elif isinstance(e, A.Index):
        yield from calls_in(e.target)
        yield from calls_in(e.index)
    elif isinstance(e, (A.Tuple, A.Chain)):
        for x in e.items:
            yield from calls_in(x)
