"""Newton-Schulz orthogonalisation (Muon's quintic iteration), and how parameters become matrices.

The paper reads Newton-Schulz as an inner optimisation of the orthogonality objective
``||O^T O - I||^2`` (Nested Learning, Eq. 43-44) and Muon as a momentum memory with a
Newton-Schulz output map (Eq. 42, 52). :func:`newton_schulz` computes exactly what
``torch.optim.Muon``'s ``_zeropower_via_newtonschulz`` computes (same ops, same order, in
bfloat16 by default), so a compiled Muon matches torch's to the last bit of the iteration.

Parameters of rank > 2 are orthogonalised as the matrix ``(shape[0], -1)`` (a convolution's
output channels by everything else), as most Muon users do; rank < 2 has no matrix to
orthogonalise and is refused (:func:`matrix_shape`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nldsl.optim.tensorlist import Scalars, TensorList

DEFAULT_COEFFICIENTS = (3.4445, -4.775, 2.0315)
DEFAULT_STEPS = 5
DEFAULT_EPS = 1e-7


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of a parameter seen as a matrix: rank > 2 is flattened to
    ``(shape[0], -1)``; a vector of n is ``(n, 1)`` and a scalar ``(1, 1)``."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    return rows, cols


def orthogonalize(g: Tensor, *, steps: int = DEFAULT_STEPS,
                  coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                  eps: float = DEFAULT_EPS, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Quintic Newton-Schulz of one matrix ``g`` (rank 2), returned in ``dtype``.

    Mirrors ``torch.optim._muon._zeropower_via_newtonschulz``: work in the wide orientation,
    scale to Frobenius norm <= 1 (``norm.clamp(min=eps)``), then ``steps`` times
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``.
    """
    if g.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got a tensor of shape {tuple(g.shape)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 100:
        raise ValueError(f"Newton-Schulz steps must be an integer in [0, 100), got {steps!r}")
    if len(coefficients) != 3:
        raise ValueError(f"Newton-Schulz takes three coefficients (a, b, c), got {coefficients!r}")
    a, b, c = coefficients
    x = g.to(dtype=dtype, copy=True)
    wide = g.size(0) > g.size(1)
    if wide:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, update, x, beta=a)
    if wide:
        x = x.T
    return x


def newton_schulz(x, *, steps: int = DEFAULT_STEPS,
                  coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                  eps: float = DEFAULT_EPS) -> TensorList:
    """Newton-Schulz of each parameter's tensor (as its ``(shape[0], -1)`` matrix), in the
    tensor's shape; held in bfloat16 and cast to the tensor's dtype on first use."""
    if not isinstance(x, TensorList):
        raise TypeError(f"newton_schulz needs a tensor per parameter, got {type(x).__name__}")
    coefficients = tuple(coefficients)
    out, dtypes = [], []
    for t in x.values():
        if t.ndim < 2:
            raise ValueError(f"Newton-Schulz needs a matrix, got a parameter of shape {tuple(t.shape)}")
        m = t.reshape(t.shape[0], -1) if t.ndim > 2 else t
        o = orthogonalize(m, steps=steps, coefficients=coefficients, eps=eps)
        out.append(o.reshape(t.shape))
        dtypes.append(t.dtype)
    return TensorList(out, owned=True, dtypes=dtypes)


def rows_cols(params: list[Tensor]) -> tuple[Scalars, Scalars]:
    """The ``rows`` and ``cols`` builtins: each parameter's matrix shape."""
    shapes = [matrix_shape(p.shape) for p in params]
    return Scalars(r for r, _ in shapes), Scalars(c for _, c in shapes)
