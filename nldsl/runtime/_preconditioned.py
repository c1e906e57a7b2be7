r"""In-context steps orthogonalised by Newton-Schulz: Muon as a memory's inner optimizer.

Atlas (Eq. 32-33, the NL paper's Eq. 42 and 52 with the memory's own momentum) replaces the
step of every layer of an in-context memory by the orthogonalised momentum of its gradients:

    S_t = beta_t S_{t-1} - grad L(W_anchor; k_t, v_t)          (the momentum of raw gradients)
    W_t = alpha_t W_{t-1} + eta_t NewtonSchulz(S_t)           (per layer, per sequence-head)

without momentum S_t = -grad L(W_anchor; k_t, v_t). The step size sits outside the
orthogonalisation (which removes any scale), and the gradients are taken at the chunk's anchor,
as for every deep memory. Under the Omega rule (Atlas proper) token t's gradient is the sum over
its window of the last c tokens, unweighted (Atlas' window gates gamma = 1: the memory's one
learned rate is the step size). A piece of L tokens takes all L gradients at once (written out,
batched over rows and tokens), forms every S_t from the decay products of beta, orthogonalises
the L matrices of each row in one batch and sums them into the end state (and, for a running
read, into each token's weights). Newton-Schulz is nonlinear in S_t, so unlike the plain
deep-memory write no rank-1 form avoids the per-token matrices: a piece holds ``L x d_out x
d_in`` numbers per layer and row.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from nldsl.runtime._common import output_error, segment_products

__all__ = ["orthogonalize_batch", "preconditioned_step"]


def orthogonalize_batch(x: Tensor, steps: int, coefficients: tuple[float, float, float],
                        eps: float = 1e-7) -> Tensor:
    """Muon's quintic Newton-Schulz of every matrix of ``x [..., m, n]`` in ``x``'s dtype: each
    scaled to Frobenius norm <= 1 (``norm.clamp(min=eps)``), worked in the wide orientation,
    then ``steps`` times ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. The iteration of
    :func:`nldsl.optim.newton_schulz.orthogonalize` (torch.optim.Muon's), batched."""
    a, b, c = coefficients
    lead = x.shape[:-2]
    tall = x.shape[-2] > x.shape[-1]
    X = x.transpose(-1, -2) if tall else x
    X = (X / torch.linalg.matrix_norm(X, keepdim=True).clamp(min=eps)).reshape(-1, *X.shape[-2:])
    for _ in range(steps):  # fused multiply-adds, as the optimizer's addmm: fewer passes over X
        A = torch.bmm(X, X.transpose(-1, -2))
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    X = X.reshape(*lead, *X.shape[-2:])
    return X.transpose(-1, -2) if tall else X


def _token_gradients(anchor: Sequence[Tensor], k: Tensor, target: Tensor, *, objective, act, residual, p,
                     delta) -> list[Tensor]:
    """``grad_W L(W_anchor; k_t, target_t)`` of every row and token, ``[N, L, d_out, d_in]`` per
    layer: the outer product of the layer's error and its input (written out, not torch.func,
    so that a checkpoint can recompute it)."""
    from nldsl.runtime.deep_memory import mlp_backward, mlp_forward  # (deep_memory imports this module)

    y, hs, ins = mlp_forward(anchor, k, act, residual)
    errors = mlp_backward(anchor, hs, output_error(y, target, objective, p, delta), act)
    return [e.unsqueeze(-1) * a.unsqueeze(-2) for e, a in zip(errors, ins)]


def _decayed(P: Tensor, start: Optional[Tensor], terms: Tensor) -> Tensor:
    """``X_t = P[t, 0] X_0 + sum_{j <= t} P[t, j] terms_j`` for every token t of the piece
    (``P``: :func:`segment_products` of the gate, ``[N, L+1, L+1]``; ``terms [N, L, o, i]``)."""
    out = torch.einsum("ntj,njoi->ntoi", P[:, 1:, 1:], terms)
    return out if start is None else out + P[:, 1:, 0, None, None] * start.unsqueeze(1)


def preconditioned_step(ws, ms, anchor, k, v, eta, alpha, beta, q, *, st=None, **cfg):
    """One piece of L tokens sharing an anchor (the arguments of
    :func:`nldsl.runtime.deep_memory.chunk_step`); ``precondition``: ``(steps, (a, b, c))``.
    Returns ``(o or None, ws_end, ms_end)``; ``ms`` holds the momenta S (None without momentum).

    Under autograd the piece is checkpointed: its backward recomputes it instead of keeping its
    per-token matrices (some ten tensors of ``L x d_out x d_in`` per layer, which would hold
    gigabytes over a sequence; Titans' `@muon` ablation at the benchmark's sizes kept 8.5 GB)."""
    piece = functools.partial(_piece, **cfg)
    if torch.is_grad_enabled():
        return checkpoint(piece, ws, ms, anchor, k, v, eta, alpha, beta, q, st, use_reentrant=False)
    return piece(ws, ms, anchor, k, v, eta, alpha, beta, q, st)


def _piece(ws, ms, anchor, k, v, eta, alpha, beta, q, st, *, objective, signal, act, residual, read, p=None,
           delta=None, precondition, preceding=None):
    from nldsl.runtime.deep_memory import mlp_forward, window_band  # (deep_memory imports this module)

    N, L = k.shape[:2]
    steps, coefficients = precondition
    kw, vw = k, v
    if preceding is not None:  # the Omega rule: the c - 1 tokens before the piece enter its windows
        kw, vw = (torch.cat([w, x], dim=1) for w, x in zip(preceding[:2], (k, v)))
    target = vw
    if signal == "self":  # its own target M_anchor(v), as the plain write takes it
        target = mlp_forward(anchor, vw, act, residual)[0]
    grads = _token_gradients(anchor, kw, target, objective=objective, act=act, residual=residual, p=p, delta=delta)
    if preceding is not None:  # token t's gradient: its window's, summed unweighted (Atlas' gamma = 1)
        band = window_band(L, preceding[0].shape[1] + 1, k)
        grads = [torch.einsum("ts,nsoi->ntoi", band, G) for G in grads]
    ones = torch.ones(N, L, dtype=k.dtype, device=k.device)
    Pa = segment_products(ones if alpha is None else alpha)
    Pb = None if beta is None else segment_products(beta)
    ws_end, ms_end, per_token = [], [] if ms is not None else None, []
    for i, (W, G) in enumerate(zip(ws, grads)):
        S = -G if Pb is None else _decayed(Pb, ms[i], -G)
        if ms is not None:
            ms_end.append(S[:, -1])
        U = eta[:, :, None, None] * orthogonalize_batch(S, steps, coefficients)
        ws_end.append(Pa[:, L, 0, None, None] * W + torch.einsum("nj,njoi->noi", Pa[:, L, 1:], U))
        if q is not None and read == "running":
            per_token.append(_decayed(Pa, W, U))
    o = None
    if q is not None:
        if read == "anchor":
            rw = anchor if st is None else [w + z for w, z in zip(anchor, st)]
            o = mlp_forward(rw, q, act, residual)[0]
        else:  # token t reads W_t: one row of N * L single-token reads
            if st is not None:
                per_token = [w + z.unsqueeze(1) for w, z in zip(per_token, st)]
            flat = [w.reshape(N * L, *w.shape[2:]) for w in per_token]
            res = residual.repeat_interleave(L) if isinstance(residual, Tensor) else residual
            o = mlp_forward(flat, q.reshape(N * L, 1, -1), act, res)[0].reshape(N, L, -1)
    return o, ws_end, ms_end
