"""Optimizer memories: one write = one gradient step on the memory's objective.

A memory ``m`` of a compiled optimizer compresses a stream ``x`` (the gradient by default).
Each write is one step of gradient descent on its objective ``L(m; x)`` with step size
``lr`` and retention ``alpha`` (Nested Learning, Eq. 33-37 and App. B)::

    m <- alpha * m - lr * dL/dm(m; x)

=========  ===============================  =====================================
objective  L(m; x)                          write
=========  ===============================  =====================================
dot        -<m, x>                          m <- alpha m + lr x      (Hebbian / momentum)
l2         1/2 ||m - x||^2                  m <- (alpha - lr) m + lr x   (an EMA when alpha = 1)
l1         ||m - x||_1                      m <- alpha m - lr sign(m - x)
lp(p)      1/p ||m - x||_p^p                m <- alpha m - lr |m - x|^(p-1) sign(m - x)
huber(d)   sum huber_d(m - x)               m <- alpha m - lr clamp(m - x, -d, d)
=========  ===============================  =====================================

With a *key* ``k`` the input ``x`` is the value the memory maps ``k`` to, and the objectives
compare the memory's prediction at ``k`` with ``x``:

* an ``elementwise`` memory predicts ``m * k``: the gradient gains a factor ``k``. With
  ``l2``, key ``g`` and value 1 this is the elementwise delta momentum
  ``m <- m (alpha - lr g^2) + lr g`` (Eq. 48-49 with the association of App. B, Eq. 101);
* a ``linear`` memory (each parameter as a ``(shape[0], -1)`` matrix) predicts ``m k^T``
  against the value ``x I`` (``x`` a number; Eq. 48-49's ``P = x I``):
  ``l2`` gives the delta rule ``m <- alpha m - lr (m k^T k - x k)``, ``dot``
  ``m <- alpha m + lr x k``; ``rule dgd`` adds the erase along the key of delta gradient
  descent, ``m <- m (alpha I - lr k^T k) - lr dL/dm`` (Eq. 57, as for model memories);
* an ``mlp`` memory is :class:`nldsl.optim.deep.CoordinateMLP`.

The write of the common cases uses the fused foreach op torch.optim uses for the same
arithmetic (``lerp`` for an EMA, ``mul`` + ``addcmul`` for ``beta v + (1 - beta) g^2``), so a
compiled Adam rounds like torch's. Everything here works on a group's parameters at once:
``states`` is the list of their optimizer-state dicts.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nldsl.optim.tensorlist import Scalars, TensorList, _axpy, _is_one, as_tensor_list, is_number
from nldsl.runtime._common import OBJECTIVES, objective_gradient


def chunk_key(name: str) -> str:
    """State key of the partial chunk sum of a slow memory (a level with period > 1)."""
    return f"{name}.chunk_sum"


def cache_key(index: int) -> str:
    """State key of the ``index``-th amortised slow value (computed once per chunk)."""
    return f"slow.{index}"


def tensors(states: Sequence[dict], key: str) -> list[Tensor]:
    return [s[key] for s in states]


def read(states: Sequence[dict], name: str, *, bias_decay: float | None = None,
         writes: Scalars | None = None) -> TensorList:
    """The state of memory ``name`` for each parameter.

    ``bias_decay=d`` reads ``m / (1 - d ** n)`` with ``n`` the number of writes so far (how
    torch.optim.Adam corrects the bias of a zero-initialised EMA); before the first write the
    state is read as it is.
    """
    out = TensorList(tensors(states, name))
    if bias_decay is None:
        return out
    if writes is None:
        raise ValueError(f"bias correction of memory {name!r} needs the number of writes")
    den = Scalars((1 - bias_decay ** n) if n > 0 else 1 for n in writes)
    if any(v == 0 for v in den):
        raise ValueError(f"bias correction of memory {name!r} divides by 1 - {bias_decay!r} ** n = 0; "
                         "its effective decay must be below 1")
    return out / den


def _as_list(x, like: TensorList) -> TensorList:
    return as_tensor_list(x, like)


def write(states: Sequence[dict], name: str, x, *, objective: str = "l2", lr: float = 1.0,
          retention: float = 1.0, decay: float | None = None, rule: str = "gd", key=None,
          structure: str = "elementwise", p: float | None = None, delta: float | None = None,
          first: bool = False, writes: Scalars | None = None) -> None:
    """One write of memory ``name`` with input ``x`` for every parameter of ``states``.

    ``decay`` is the factor on the old state for ``dot`` (= retention) and ``l2``
    (= retention - lr); the compiler passes it written from the spec's own expressions
    (``betas[1]`` rather than ``1 - (1 - betas[1])``) so the rounding matches torch.
    ``key`` makes ``x`` the value the memory maps the key to; ``structure`` (``elementwise``
    or ``linear``) says how a keyed memory predicts (see the module docstring).
    ``first=True`` (``init first``) makes the first write store ``x`` itself, as
    torch.optim.SGD starts its momentum buffer; ``writes`` counts writes including this one.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}")
    if structure not in ("elementwise", "linear"):
        raise ValueError(f"unknown structure {structure!r} (MLP memories are nldsl.optim.deep.CoordinateMLP)")
    if rule not in ("gd", "dgd"):
        raise ValueError(f"unknown rule {rule!r}")
    if rule == "dgd" and (key is None or structure != "linear"):
        raise ValueError("rule dgd erases along the key of a linear memory: it needs key= and structure='linear'")
    if not states:
        return
    if key is not None and structure == "linear":
        if first:
            raise ValueError("a keyed linear memory has no `init first`")
        if not is_number(x):
            raise ValueError(f"a linear memory keyed by a matrix maps it to a multiple of the identity, "
                             f"so its value must be a number, got {type(x).__name__}")
        m = TensorList(tensors(states, name))
        _write_delta_matrix(m.a, _as_list(key, m), x, objective=objective, lr=lr, retention=retention,
                            erase=rule == "dgd")
        return
    m = TensorList(tensors(states, name))
    x = _as_list(x, m)
    if first:
        if writes is None:
            raise ValueError("`init first` needs the number of writes")
        new = [i for i, n in enumerate(writes) if n == 1]
        if new:
            vals = x.take(new).values()
            for i, v in zip(new, vals):
                states[i][name].copy_(v)
            rest = [i for i, n in enumerate(writes) if n != 1]
            if not rest:
                return
            states = [states[i] for i in rest]
            m = m.take(rest)
            x = x.take(rest)
            key = key.take(rest) if isinstance(key, TensorList) else key
    if key is not None:
        _write_keyed(m.a, x, _as_list(key, m), objective=objective, lr=lr, retention=retention, p=p,
                     delta=delta)
        return
    if objective in ("dot", "l2"):
        if decay is None:
            decay = retention if objective == "dot" else retention - lr
        _write_linear(m.a, x, objective=objective, lr=lr, retention=retention, decay=decay)
        return
    _write_generic(m.a, x, objective=objective, lr=lr, retention=retention, p=p, delta=delta)


def _write_linear(m: list[Tensor], x: TensorList, *, objective: str, lr, retention, decay) -> None:
    # l2 with retention 1 and an input that is a plain tensor: an EMA, m + lr (x - m): lerp
    if objective == "l2" and retention == 1 and x.kind in ("plain", "sum"):
        torch._foreach_lerp_(m, x.values(), lr)
        return
    if not _is_one(decay):
        torch._foreach_mul_(m, decay)
    _axpy(m, x, lr)


def _write_generic(m: list[Tensor], x: TensorList, *, objective, lr, retention, p, delta) -> None:
    for mi, xi in zip(m, x.values()):
        g = objective_gradient(objective, mi - xi, p=p, delta=delta)
        if retention != 1:
            mi.mul_(retention)
        mi.sub_(g, alpha=lr)


def _write_keyed(m: list[Tensor], x: TensorList, k: TensorList, *, objective, lr, retention, p,
                 delta) -> None:
    for mi, xi, ki in zip(m, x.values(), k.values()):
        if objective == "dot":
            g = -(ki * xi)
        else:
            g = objective_gradient(objective, mi * ki - xi, p=p, delta=delta) * ki
        if retention != 1:
            mi.mul_(retention)
        mi.sub_(g, alpha=lr)


def _write_delta_matrix(m: list[Tensor], k: TensorList, value, *, objective, lr, retention,
                        erase: bool) -> None:
    """One step on ``L(m) = obj(m k^T, value I)`` for each parameter's ``(shape[0], -1)``
    matrix (Eq. 48-49), plus the erase ``-lr m k^T k`` of delta gradient descent if ``erase``."""
    if objective not in ("l2", "dot"):
        raise ValueError(f"a linear memory keyed by a matrix needs the l2 or dot objective, not {objective!r}")
    for mi, ki in zip(m, k.values()):
        if mi.ndim < 2:
            raise ValueError(f"a keyed linear memory needs a matrix, got a parameter of shape {tuple(mi.shape)}")
        m2 = mi.reshape(mi.shape[0], -1)
        k2 = ki.reshape(ki.shape[0], -1)
        rows, cols = m2.shape
        # m k^T k: associate the cheaper way round (r x r or c x c intermediate)
        mkk = (m2 @ k2.T) @ k2 if rows <= cols else m2 @ (k2.T @ k2)
        times = (1 if objective == "l2" else 0) + (1 if erase else 0)  # l2's gradient holds m k^T k too
        if retention != 1:
            m2.mul_(retention)
        if times:
            m2.sub_(mkk, alpha=lr * times)
        if value != 0:
            m2.add_(k2, alpha=lr * value)  # -lr dL/dm's value part: + lr value k (l2 and dot alike)
        if m2.data_ptr() != mi.data_ptr():  # reshape copied (non-contiguous state)
            mi.copy_(m2.reshape(mi.shape))


# ---- slow levels: chunk sums and boundaries ----------------------------------------------------


def accumulate(states: Sequence[dict], name: str, x) -> None:
    """Adds this step's input to the partial chunk sum of a slow memory (kept in the state,
    so a ``state_dict`` taken mid-chunk continues exactly)."""
    acc = tensors(states, chunk_key(name))
    x = _as_list(x, TensorList(acc))
    _axpy(acc, x, 1)


def boundaries(clock: Scalars, period: int) -> list[int]:
    """Positions of the parameters whose step count ends a chunk of ``period`` steps."""
    return [i for i, t in enumerate(clock) if t % period == 0]


def write_chunk(states: Sequence[dict], name: str, **kwargs) -> None:
    """The boundary write of a slow memory: one write with the chunk's summed input, then the
    sum restarts from zero."""
    if not states:
        return
    sums = TensorList(tensors(states, chunk_key(name)))
    write(states, name, sums, **kwargs)
    torch._foreach_zero_(sums.a)


def subset(states: Sequence[dict], idx: Sequence[int]) -> list[dict]:
    return [states[i] for i in idx]


def store(states: Sequence[dict], key: str, value: TensorList) -> None:
    """Stores one tensor per parameter under ``key`` (amortised slow values)."""
    for s, t in zip(states, value.values()):
        s[key] = t if t._base is None else t.clone()


def missing(states: Sequence[dict], key: str) -> list[int]:
    return [i for i, s in enumerate(states) if key not in s]


def zeros(p: Tensor) -> Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def full(p: Tensor, value) -> Tensor:
    if not is_number(value):
        raise TypeError(f"a constant initial state must be a number, got {value!r}")
    return torch.full_like(p, value, memory_format=torch.preserve_format)
