r"""The anchor read of a stack of two-layer generating memories, as one autograd function.

Self-modifying Titans reads k, v, q, eta and alpha of every token of a piece from memories
stacked along the batch axis (``G`` memories times ``N`` sequence-heads, see
:mod:`nldsl.runtime.self_modifying`). Per row, on the piece's inputs ``x [G*N, L, D]``:

    Y = phi(x W_1^T) W_2^T + r x                     (the memory, read at its anchor)
    k, v, q = Y / max(||Y||, 1e-12)  or  Y           (L2-normalised where asked: F.normalize)
    eta = eta_max * sigmoid(Y[..., 0] + z_eta + b_eta),  alpha = sigmoid(Y[..., 0] + z_alpha + b_alpha)

(the rows of memory ``j`` are ``j*N .. (j+1)*N``; ``z`` the static logits added to a generated
rate, if any; M_eta / M_alpha's output matrix is zero-padded to D rows). Autograd through the
composed ops records some 35 nodes per piece (products, the norms, slices, selects, sigmoids);
this function records one, with the backward written out, on the same formulas.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nldsl.runtime._mlp_write import _Act, _T, _residual

__all__ = ["group_read"]

_SCALARS = ("eta", "alpha")
_UNIT_EPS = 1e-12  # F.normalize's


class _GroupRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, W1, W2, x, residual, eta_max, eta_bias, alpha_bias, *logits):
        act, names, units, N = cfg
        H = torch.bmm(x, _T(W1))
        fa = _Act(H, act)
        Y = _residual(torch.bmm(fa.S, _T(W2)), x, residual)
        outs, kept = [], []
        for j, (name, unit, z) in enumerate(zip(names, units, logits)):
            rows = Y[j * N:(j + 1) * N]
            if name in _SCALARS:
                pre = rows[..., 0] + (eta_bias if name == "eta" else alpha_bias)
                s = torch.sigmoid(pre if z is None else pre + z)
                outs.append(eta_max * s if name == "eta" else s)
                kept.append(s)
            elif unit:
                norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
                outs.append(rows / norm.clamp_min(_UNIT_EPS))
                kept.append(norm)
            else:
                outs.append(rows)
                kept.append(None)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skipped, not zeros
        ctx.residual = residual if not isinstance(residual, Tensor) else None
        ctx.save_for_backward(W1, W2, x, residual if isinstance(residual, Tensor) else None,
                              eta_max if isinstance(eta_max, Tensor) else None,
                              eta_bias if isinstance(eta_bias, Tensor) else None,
                              alpha_bias if isinstance(alpha_bias, Tensor) else None,
                              fa.H, fa.S, fa.inv_r, fa.g1, *outs, *kept)
        ctx.eta_max = None if isinstance(eta_max, Tensor) else eta_max
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        act, names, units, N = ctx.cfg
        G = len(names)
        W1, W2, x, mask, eta_max_t, eta_bias, alpha_bias, H, S, inv_r, g1, *rest = ctx.saved_tensors
        outs, kept = rest[:G], rest[G:]
        eta_max = ctx.eta_max if eta_max_t is None else eta_max_t
        need = ctx.needs_input_grad
        dY = torch.zeros(x.shape[0], x.shape[1], W2.shape[1], dtype=x.dtype, device=x.device)
        dlogits: list = []
        d_eta_max = d_eta_bias = d_alpha_bias = None
        for j, (name, unit, g, out, k) in enumerate(zip(names, units, grads, outs, kept)):
            if name in _SCALARS:
                dz = None
                if g is not None:
                    if name == "eta":
                        if eta_max_t is not None and need[5]:
                            d_eta_max = (g * k).sum_to_size(eta_max_t.shape)
                        dz = (g * eta_max) * k * (1.0 - k)
                    else:
                        dz = g * k * (1.0 - k)
                    dY[j * N:(j + 1) * N, :, 0] = dz
                    bias = eta_bias if name == "eta" else alpha_bias
                    if bias is not None:
                        db = dz.sum_to_size(bias.shape)
                        if name == "eta":
                            d_eta_bias = db
                        else:
                            d_alpha_bias = db
                dlogits.append(dz)
                continue
            dlogits.append(None)
            if g is None:
                continue
            if unit:   # y = x / r, r = max(||x||, eps): dx = (g - y (y . g) [||x|| >= eps]) / r
                proj = out * ((out * g).sum(-1, keepdim=True) * (k >= _UNIT_EPS))
                dY[j * N:(j + 1) * N] = (g - proj) / k.clamp_min(_UNIT_EPS)
            else:
                dY[j * N:(j + 1) * N] = g
        # Y = phi(x W1^T) W2^T + r x
        fa = _Act(H, act, S, inv_r, g1)
        dH, _ = fa.vjp(torch.bmm(dY, W2))
        dW1 = torch.bmm(_T(dH), x) if need[1] else None
        dW2 = torch.bmm(_T(dY), S) if need[2] else None
        dx = _residual(torch.bmm(dH, W1), dY, ctx.residual if mask is None else mask) if need[3] else None
        return (None, dW1, dW2, dx, None, d_eta_max, d_eta_bias, d_alpha_bias,
                *(d if n else None for d, n in zip(dlogits, need[8:])))


def group_read(weights: Sequence[Tensor], x: Tensor, *, act: str, residual, names: Sequence[str],
               units: Sequence[bool], logits: Sequence[Optional[Tensor]], eta_max, eta_bias,
               alpha_bias) -> list[Tensor]:
    """The outputs of the memories ``names`` stacked in ``weights`` (``(W_1 [G*N, h, D], W_2
    [G*N, D, h])``, at their anchor) on ``x [G*N, L, D]`` (see the module docstring):
    ``[N, L, D]`` for k, v, q (L2-normalised where ``units`` says), ``[N, L]`` for eta, alpha
    (squashed, with ``logits`` added before; None entries for the others). ``residual``: a bool
    or a per-row 0/1 mask."""
    N = x.shape[0] // len(names)
    cfg = (act, tuple(names), tuple(bool(u) for u in units), N)
    return list(_GroupRead.apply(cfg, weights[0], weights[1], x, residual, eta_max, eta_bias, alpha_bias,
                                 *logits))
