"""Foreach arithmetic over one parameter group: the values compiled optimizers compute with.

A compiled optimizer's ``step`` is the spec's expressions written in Python
(``update = lr * m / (sqrt(v) + eps)``) over three kinds of values:

* Python numbers: hyperparameters and what is computed from them (``1 - betas[0]``);
* :class:`Scalars`: one Python number per parameter (``step``, ``rows``, ``cols``, a bias
  correction ``1 - beta ** step``), because parameters of one group can be at different steps;
* :class:`TensorList`: one tensor per parameter (``grad``, ``param``, a memory's state).

Arithmetic on a :class:`TensorList` runs ``torch._foreach_*`` ops over the whole group. To get
torch.optim's speed (and, where possible, its exact rounding) some forms stay *lazy* until a
consumer can fuse them: a scale ``num / den`` (numbers or Scalars) is kept aside, ``a * b``,
``a / b`` and sums are recorded, not computed. :func:`apply_update` then turns
``lr / bc * m / d`` into one ``_foreach_addcdiv_`` and a decoupled weight decay term
``c * param`` into ``_foreach_mul_(params, 1 - c)``, which are the op sequences of
torch.optim's foreach implementations.

Aliasing rule: a list marked ``owned`` holds buffers created by an op of this module that
nobody else references, so the next op may reuse them in place. Every value bound to a name
in generated code goes through :func:`bind`, which clears ``owned``; an intermediate of a
single Python expression is consumed exactly once, so reusing its buffers is safe.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence, Union

import torch
from torch import Tensor

Number = Union[int, float, bool]


# ---- per-parameter scalars -----------------------------------------------------------------


class Scalars(tuple):
    """One Python number per parameter of a group, with elementwise arithmetic.

    ``Scalars`` never mixes with tensors here: ``Scalars * TensorList`` is handled by the
    tensor list (a per-parameter scale).
    """

    __slots__ = ()

    def _zip(self, other, fn):
        if isinstance(other, Scalars):
            if len(other) != len(self):
                raise ValueError(f"per-parameter scalars of lengths {len(self)} and {len(other)}")
            return Scalars(fn(a, b) for a, b in zip(self, other))
        if is_number(other):
            return Scalars(fn(a, other) for a in self)
        return NotImplemented

    def _rzip(self, other, fn):
        if is_number(other):
            return Scalars(fn(other, a) for a in self)
        return NotImplemented

    def __add__(self, o):
        return self._zip(o, lambda a, b: a + b)

    def __radd__(self, o):
        return self._rzip(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._zip(o, lambda a, b: a - b)

    def __rsub__(self, o):
        return self._rzip(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._zip(o, lambda a, b: a * b)

    def __rmul__(self, o):
        return self._rzip(o, lambda a, b: a * b)

    def __truediv__(self, o):
        return self._zip(o, lambda a, b: a / b)

    def __rtruediv__(self, o):
        return self._rzip(o, lambda a, b: a / b)

    def __floordiv__(self, o):
        return self._zip(o, lambda a, b: a // b)

    def __mod__(self, o):
        return self._zip(o, lambda a, b: a % b)

    def __pow__(self, o):
        return self._zip(o, lambda a, b: a ** b)

    def __rpow__(self, o):
        return self._rzip(o, lambda a, b: a ** b)

    def __neg__(self):
        return Scalars(-a for a in self)

    def take(self, idx: Sequence[int]) -> "Scalars":
        return Scalars(self[i] for i in idx)

    def __repr__(self) -> str:
        return f"Scalars({list(self)!r})"


Scalar = Union[Number, Scalars]


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, Tensor)


def is_scalar(x) -> bool:
    return is_number(x) or isinstance(x, Scalars)


def _all(s: Scalar, pred) -> bool:
    return all(pred(v) for v in s) if isinstance(s, Scalars) else pred(s)


def _is_one(s: Scalar) -> bool:
    return _all(s, lambda v: v == 1)


def _is_zero(s: Scalar) -> bool:
    return _all(s, lambda v: v == 0)


def _arg(s: Scalar):
    """A scalar argument for a foreach op: a number, or a list when parameters differ."""
    if isinstance(s, Scalars):
        first = s[0] if s else 0
        if all(v == first for v in s):
            return first
        return list(s)
    return s


def _take_scalar(s: Scalar, idx) -> Scalar:
    return s.take(idx) if isinstance(s, Scalars) else s


def _sqrt_scalar(s: Scalar) -> Scalar:
    if isinstance(s, Scalars):
        return Scalars(math.sqrt(v) for v in s)
    return math.sqrt(s)


# ---- tensor lists ----------------------------------------------------------------------------


class TensorList:
    """One tensor per parameter: ``num / den * value`` with ``value`` one of

    * ``plain``: the tensors ``a``;
    * ``mul`` / ``div``: ``a * b`` / ``a / b`` (elementwise, not computed yet);
    * ``sum``: the sum of ``terms`` (tensor lists, not computed yet).

    ``dtypes`` (plain only): the tensors are held in a lower precision (Newton-Schulz works in
    bfloat16) and are cast to these dtypes before any arithmetic; only a final
    ``param -= c * x`` adds them as they are, casting inside the add, as torch.optim.Muon does.
    """

    __slots__ = ("kind", "a", "b", "terms", "num", "den", "owned", "dtypes")

    def __init__(self, tensors: Iterable[Tensor], *, owned: bool = False, dtypes=None):
        self.kind = "plain"
        self.a = list(tensors)
        self.b = None
        self.terms: tuple[TensorList, ...] = ()
        self.num: Scalar = 1
        self.den: Scalar = 1
        self.owned = owned
        self.dtypes = list(dtypes) if dtypes is not None else None

    @classmethod
    def _make(cls, kind, a=None, b=None, terms=(), num=1, den=1, owned=False, dtypes=None) -> "TensorList":
        t = cls.__new__(cls)
        t.kind, t.a, t.b, t.terms, t.num, t.den, t.owned = kind, a, b, tuple(terms), num, den, owned
        t.dtypes = dtypes
        return t

    def _copy(self, **changes) -> "TensorList":
        t = TensorList._make(self.kind, self.a, self.b, self.terms, self.num, self.den, self.owned, self.dtypes)
        for k, v in changes.items():
            setattr(t, k, v)
        return t

    def __len__(self) -> int:
        return len(self.terms[0]) if self.kind == "sum" else len(self.a)

    def __repr__(self) -> str:
        return f"TensorList({self.kind}, n={len(self)}, num={self.num!r}, den={self.den!r})"

    # -- evaluation --
    def _unscaled(self) -> tuple[list[Tensor], bool]:
        """The value without ``num / den``, and whether the returned buffers are ours."""
        if self.kind == "plain":
            if self.dtypes is not None:
                return [t.to(d) for t, d in zip(self.a, self.dtypes)], True
            return self.a, self.owned
        if self.kind == "mul":
            return list(torch._foreach_mul(self.a, self.b)), True
        if self.kind == "div":
            return list(torch._foreach_div(self.a, self.b)), True
        if len(self.terms) == 2:
            lerp = _as_lerp(*self.terms)
            if lerp is not None:
                return lerp, True
        acc = self.terms[0].values(owned=True)
        for t in self.terms[1:]:
            _axpy(acc, t, 1)
        return acc, True

    def values(self, owned: bool = False) -> list[Tensor]:
        """The tensors, computed. With ``owned=True`` the caller may modify them in place."""
        x, own = self._unscaled()
        if not _is_one(self.den):
            x = _scale_op(x, self.den, divide=True, inplace=own)
            own = True
        if not _is_one(self.num):
            x = _scale_op(x, self.num, divide=False, inplace=own)
            own = True
        if owned and not own:
            x = [t.clone() for t in x]
        return x

    def plain(self) -> "TensorList":
        """The same value as a ``plain`` list (the lazy product/quotient/sum computed)."""
        if self.kind == "plain" and self.dtypes is None:
            return self
        x, own = self._unscaled()
        return TensorList._make("plain", a=x, num=self.num, den=self.den, owned=own)

    def shared(self) -> "TensorList":
        """The same value, marked so that no later op modifies its buffers."""
        return self._copy(owned=False, terms=tuple(t.shared() for t in self.terms))

    def take(self, idx: Sequence[int]) -> "TensorList":
        """The entries of the parameters at positions ``idx``."""
        idx = list(idx)

        def pick(xs):
            return [xs[i] for i in idx]

        return TensorList._make(self.kind, a=pick(self.a) if self.a is not None else None,
                                b=pick(self.b) if self.b is not None else None,
                                terms=tuple(t.take(idx) for t in self.terms),
                                num=_take_scalar(self.num, idx), den=_take_scalar(self.den, idx),
                                owned=self.owned, dtypes=pick(self.dtypes) if self.dtypes is not None else None)

    def references(self, tensors: Sequence[Tensor]) -> bool:
        """Whether computing this value reads any of ``tensors`` (by identity)."""
        ids = {id(t) for t in tensors}
        return self._refs(ids)

    def _refs(self, ids) -> bool:
        for xs in (self.a, self.b):
            if xs is not None and any(id(t) in ids for t in xs):
                return True
        return any(t._refs(ids) for t in self.terms)

    # -- arithmetic --
    def _rescale(self, num: Scalar = 1, den: Scalar = 1) -> "TensorList":
        return self._copy(num=self.num * num if not _is_one(num) else self.num,
                          den=self.den * den if not _is_one(den) else self.den)

    def _terms(self) -> list["TensorList"]:
        if self.kind == "sum" and _is_one(self.num) and _is_one(self.den):
            return list(self.terms)
        return [self]

    def __mul__(self, o):
        if is_scalar(o):
            return self._rescale(num=o)
        if isinstance(o, TensorList):
            x, y = self.plain(), o.plain()
            return TensorList._make("mul", a=x.a, b=y.a, num=x.num * y.num if not _is_one(y.num) else x.num,
                                    den=x.den * y.den if not _is_one(y.den) else x.den, owned=True)
        return NotImplemented

    def __rmul__(self, o):
        if is_scalar(o):
            return self._rescale(num=o)
        return NotImplemented

    def __truediv__(self, o):
        if is_scalar(o):
            return self._rescale(den=o)
        if isinstance(o, TensorList):
            x, y = self.plain(), o.plain()
            num = x.num * y.den if not _is_one(y.den) else x.num
            den = x.den * y.num if not _is_one(y.num) else x.den
            return TensorList._make("div", a=x.a, b=y.a, num=num, den=den, owned=True)
        return NotImplemented

    def __rtruediv__(self, o):
        if is_scalar(o):  # c / (n/d x) = (c d / n) * (1 / x)
            x = self.plain()
            r = list(torch._foreach_reciprocal(x.a))
            return TensorList._make("plain", a=r, num=o * x.den if not _is_one(x.den) else o,
                                    den=x.num, owned=True)
        return NotImplemented

    def __add__(self, o):
        if is_scalar(o):
            if _is_zero(o):
                return self
            x = self.values(owned=True)
            torch._foreach_add_(x, _arg(o))
            return TensorList(x, owned=True)
        if isinstance(o, TensorList):
            terms = [t for t in self._terms() + o._terms() if not _is_zero(t.num)]
            if not terms:
                return self * 0
            if len(terms) == 1:
                return terms[0]
            return TensorList._make("sum", terms=terms, owned=True)
        return NotImplemented

    def __radd__(self, o):
        if is_scalar(o):
            return self.__add__(o)
        return NotImplemented

    def __sub__(self, o):
        if is_scalar(o):
            return self.__add__(-o)
        if isinstance(o, TensorList):
            return self + o._rescale(num=-1)
        return NotImplemented

    def __rsub__(self, o):
        if is_scalar(o):
            return self._rescale(num=-1).__add__(o)
        return NotImplemented

    def __neg__(self):
        return self._rescale(num=-1)

    def __pos__(self):
        return self

    def __pow__(self, e):
        if not is_number(e):
            if isinstance(e, TensorList):
                return TensorList(torch._foreach_pow(self.values(), e.values()), owned=True)
            return NotImplemented
        if e == 1:
            return self
        if e == 2:  # a lazy product, so a memory write can use addcmul (as torch does for g*g)
            x = self.plain()
            return TensorList._make("mul", a=x.a, b=x.a, num=x.num * x.num if not _is_one(x.num) else 1,
                                    den=x.den * x.den if not _is_one(x.den) else 1, owned=True)
        if e == 0.5:
            return sqrt(self)
        return TensorList(torch._foreach_pow(self.values(), e), owned=True)

    def __rpow__(self, base):
        if is_number(base):
            return TensorList(torch._foreach_pow(base, self.values()), owned=True)
        return NotImplemented


def _scale_op(x: list[Tensor], s: Scalar, *, divide: bool, inplace: bool) -> list[Tensor]:
    a = _arg(s)
    if inplace:
        (torch._foreach_div_ if divide else torch._foreach_mul_)(x, a)
        return x
    return list((torch._foreach_div if divide else torch._foreach_mul)(x, a))


def _coefficient(t: TensorList):
    """``c`` when ``t`` is ``c * x`` with one number ``c`` and plain full-precision ``x``."""
    if t.kind != "plain" or t.dtypes is not None:
        return None
    c = t.num if _is_one(t.den) else t.num / t.den
    c = _arg(c)
    return None if isinstance(c, list) else c


def _as_lerp(t1: TensorList, t2: TensorList):
    """``a x + b y`` with ``a + b == 1`` is ``lerp(y, x, a)``: one pass instead of two (and
    the op torch.optim.Muon uses for its Nesterov look-ahead)."""
    a, b = _coefficient(t1), _coefficient(t2)
    if a is None or b is None or a + b != 1:
        return None
    x, y = t1.a, t2.a
    if a < b:  # lerp(start, end, w) = start + w (end - start): weight on `end`
        return list(torch._foreach_lerp(x, y, b))
    return list(torch._foreach_lerp(y, x, a))


def _axpy(acc: list[Tensor], t: TensorList, sign: Number) -> None:
    """``acc += sign * t`` in place, with the fused foreach op that fits ``t``'s form."""
    c = t.num if _is_one(t.den) else t.num / t.den
    if sign != 1:
        c = c * sign
    if _is_zero(c):
        return
    if t.kind == "mul":
        torch._foreach_addcmul_(acc, t.a, t.b, _arg(c))
    elif t.kind == "div":
        torch._foreach_addcdiv_(acc, t.a, t.b, _arg(c))
    else:
        # low-precision tensors (Newton-Schulz output) are added as they are: add_ casts
        x = t.a if t.kind == "plain" else t._unscaled()[0]
        a = _arg(c)
        if isinstance(a, list):  # per-parameter factors: one add per tensor, as torch.optim.Muon
            for dst, src, ci in zip(acc, x, a):
                dst.add_(src, alpha=ci)
        elif a == 1:
            torch._foreach_add_(acc, x)
        else:
            torch._foreach_add_(acc, x, alpha=a)


def bind(x):
    """A value about to be given a name in generated code: computed once, then shared.

    Lazy products, quotients and sums are computed here (a name may be used many times); a
    lazy scale is kept, since consumers fuse it for free.
    """
    if isinstance(x, TensorList):
        return x.plain().shared()
    return x


def as_tensor_list(x, like: TensorList) -> TensorList:
    """``x`` as a tensor list shaped like ``like`` (scalars are broadcast)."""
    if isinstance(x, TensorList):
        return x
    ref = like.plain().a
    if isinstance(x, Scalars):
        return TensorList([torch.full_like(t, v) for t, v in zip(ref, x)], owned=True)
    return TensorList([torch.full_like(t, x) for t in ref], owned=True)


# ---- functions of optimizer expressions --------------------------------------------------------


def sqrt(x):
    if is_number(x):
        return math.sqrt(x)
    if isinstance(x, Scalars):
        return _sqrt_scalar(x)
    if isinstance(x, TensorList):
        p = x.plain()
        if _all(p.num, lambda v: v > 0) and _all(p.den, lambda v: v > 0):
            # sqrt(n/d a) = sqrt(n)/sqrt(d) sqrt(a): the scale stays lazy (torch.optim.Adam
            # divides sqrt(v) by sqrt(1 - beta2^t) the same way)
            if p.owned:
                torch._foreach_sqrt_(p.a)
                r = p.a
            else:
                r = list(torch._foreach_sqrt(p.a))
            return TensorList._make("plain", a=r, num=_sqrt_scalar(p.num) if not _is_one(p.num) else 1,
                                    den=_sqrt_scalar(p.den) if not _is_one(p.den) else 1, owned=True)
        v = x.values(owned=True)
        torch._foreach_sqrt_(v)
        return TensorList(v, owned=True)
    raise TypeError(f"sqrt of {type(x).__name__}")


def abs(x):  # noqa: A001 - the spec function's name
    if is_number(x):
        return x if x >= 0 else -x
    if isinstance(x, Scalars):
        return Scalars(v if v >= 0 else -v for v in x)
    if isinstance(x, TensorList):
        v = x.values(owned=True)
        torch._foreach_abs_(v)
        return TensorList(v, owned=True)
    raise TypeError(f"abs of {type(x).__name__}")


def sign(x):
    if is_number(x):
        return float((x > 0) - (x < 0))
    if isinstance(x, Scalars):
        return Scalars(float((v > 0) - (v < 0)) for v in x)
    if isinstance(x, TensorList):
        v = x.values(owned=True)
        torch._foreach_sign_(v)
        return TensorList(v, owned=True)
    raise TypeError(f"sign of {type(x).__name__}")


def _extremum(a, b, pick, op_name: str):
    if is_number(a) and is_number(b):
        return pick(a, b)
    if is_scalar(a) and is_scalar(b):
        n = len(a) if isinstance(a, Scalars) else len(b)
        xa = a if isinstance(a, Scalars) else Scalars([a] * n)
        xb = b if isinstance(b, Scalars) else Scalars([b] * n)
        return Scalars(pick(u, v) for u, v in zip(xa, xb))
    op = getattr(torch, op_name)
    if isinstance(a, TensorList) and isinstance(b, TensorList):
        return TensorList(op(a.values(), b.values()), owned=True)
    t, s = (a, b) if isinstance(a, TensorList) else (b, a)
    if not (isinstance(t, TensorList) and is_scalar(s)):
        raise TypeError(f"{op_name[9:]} of {type(a).__name__} and {type(b).__name__}")
    return TensorList(op(t.values(), _arg(s)), owned=True)


def maximum(a, b):
    return _extremum(a, b, max, "_foreach_maximum")


def minimum(a, b):
    return _extremum(a, b, min, "_foreach_minimum")


def clamp(x, min=None, max=None):  # noqa: A002 - the spec's argument names
    if min is not None:
        x = maximum(x, min)
    if max is not None:
        x = minimum(x, max)
    return x


def where(cond, a, b):
    """``a`` where ``cond`` is non-zero, else ``b`` (a constant condition picks a branch)."""
    if is_number(cond):
        return a if cond else b
    if isinstance(cond, Scalars):
        out = []
        like = a if isinstance(a, TensorList) else b
        if not isinstance(like, TensorList):
            return Scalars(u if c else v for c, u, v in zip(cond, _bcast(a, len(cond)), _bcast(b, len(cond))))
        ta, tb = as_tensor_list(a, like).values(), as_tensor_list(b, like).values()
        for c, u, v in zip(cond, ta, tb):
            out.append(u if c else v)
        return TensorList(out, owned=False)
    if isinstance(cond, TensorList):
        c = cond.values()
        ta = as_tensor_list(a, cond).values()
        tb = as_tensor_list(b, cond).values()
        return TensorList([torch.where(ci != 0, u, v) for ci, u, v in zip(c, ta, tb)], owned=True)
    raise TypeError(f"where with a {type(cond).__name__} condition")


def _bcast(x, n):
    return list(x) if isinstance(x, Scalars) else [x] * n


# ---- applying the update ----------------------------------------------------------------------


def apply_update(param: TensorList, update) -> None:
    """``param -= update`` in place, fusing the lazy forms of ``update``.

    A term ``c * param`` (decoupled weight decay) becomes ``param *= 1 - c`` first; terms that
    read ``param`` otherwise are computed before any parameter changes.
    """
    if not isinstance(update, TensorList):
        raise TypeError(f"the update must be a tensor per parameter, got {type(update).__name__}")
    params = param.plain().a
    outer_num, outer_den = update.num, update.den
    terms = update.terms if update.kind == "sum" else (update._copy(num=1, den=1),)
    scaled = []
    for t in terms:
        num = outer_num * t.num if not _is_one(outer_num) else t.num
        den = outer_den * t.den if not _is_one(outer_den) else t.den
        scaled.append(t._copy(num=num, den=den))
    decay, rest = [], []
    for t in scaled:
        if t.kind == "plain" and len(t.a) == len(params) and all(x is y for x, y in zip(t.a, params)):
            decay.append(t)
        elif t.references(params):
            rest.append(TensorList(t.values(), owned=True))
        else:
            rest.append(t)
    for t in decay:
        c = t.num if _is_one(t.den) else t.num / t.den
        if not _is_zero(c):
            torch._foreach_mul_(params, _arg(1 - c))
    for t in rest:
        _axpy(params, t, -1)
