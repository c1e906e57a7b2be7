r"""The running read of a piece of a two-layer memory, as one autograd function.

With ``read running`` token t of a piece reads the memory with the piece's writes up to t
(:func:`nldsl.runtime.deep_memory.chunk_step`). The state at t is written out in the piece's
coefficients (:class:`~nldsl.runtime._mlp_write.ReadCoefficients`: ``A``, ``m`` the entering
weights' and momentum's share of W_t, ``c``, ``Da`` token j's write and erase in W_t), so per row
the read of the queries ``q`` is

    P_1 = A (q W_1^T) + (c * q K^T) U_1 + (Da * q K^T) hs + m (q M_1^T)
    P_2 = A (S W_2^T) + (c * S S_k^T) U_2 + m (S M_2^T),        S = phi(P_1)
    o   = P_2 + r q

(``W``, ``M``: the weights and momenta entering the piece; ``U``, ``hs``, ``S_k``: the piece's
write terms from :func:`~nldsl.runtime._mlp_write.mlp_write`; ``hs`` only for DGD, ``M`` only
with momentum; ``A``, ``m`` scale rows ``t``, ``c``, ``Da`` are ``[t, j]`` matrices). Autograd
through the composed ops records about 30 nodes per piece; this function records one, with the
backward written out on the same formulas. First order only, like the write. On a CPU, after a
write by the C kernel, it runs as C too (``_running_read.c``: a row's read and its backward in
one pass each, the rows split over torch's threads; see :mod:`nldsl.runtime._native`).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nldsl.runtime import _native as native
from nldsl.runtime._activations import _NORM_EPS2, split_hidden
from nldsl.runtime._common import contiguous
from nldsl.runtime._mlp_write import ReadCoefficients, _Act, _residual, _rowdot, _scaled, _T

__all__ = ["running_read"]


def _layer(z: Tensor, W: Tensor, M: Optional[Tensor], a: Tensor, terms, A: Tensor, m: Optional[Tensor]):
    """``A (z W^T) + sum (coef * z a^T) left + m (z M^T)`` and what its backward needs."""
    zW = torch.bmm(z, _T(W))
    za = torch.bmm(z, _T(a))
    scaled = [coef * za for coef, _ in terms]
    P = zW * A.unsqueeze(-1)
    for s, (_, left) in zip(scaled, terms):
        P.baddbmm_(s, left)
    zM = None
    if M is not None:
        zM = torch.bmm(z, _T(M))
        P.addcmul_(zM, m.unsqueeze(-1))
    return P, zW, za, scaled, zM


def _layer_backward(g: Tensor, z: Tensor, W: Tensor, M: Optional[Tensor], a: Tensor, terms, A: Tensor,
                    m: Optional[Tensor], zW: Tensor, za: Tensor, scaled, zM: Optional[Tensor]):
    """The reverse of :func:`_layer` for ``g = dL/dP``: ``(dz, dW, dM, da, [(dcoef, dleft)], dA, dm)``."""
    gA = g * A.unsqueeze(-1)
    dz = torch.bmm(gA, W)
    dW = torch.bmm(_T(gA), z)
    dA = _rowdot(g, zW)
    dza = None
    dterms = []
    for s, (coef, left) in zip(scaled, terms):
        ds = torch.bmm(g, _T(left))
        dterms.append((ds * za, torch.bmm(_T(s), g)))
        dza = ds * coef if dza is None else dza.addcmul_(ds, coef)
    dz.baddbmm_(dza, a)
    da = torch.bmm(_T(dza), z)
    dM = dm = None
    if M is not None:
        gm = g * m.unsqueeze(-1)
        dz.baddbmm_(gm, M)
        dM = torch.bmm(_T(gm), z)
        dm = _rowdot(g, zM)
    return dz, dW, dM, da, dterms, dA, dm


def _first_terms(c: Tensor, U1: Tensor, Da: Tensor, hs: Optional[Tensor]):
    """The first layer's write terms: every token's step, and DGD's erase (``hs``) when there is one."""
    return [(c, U1)] + ([(Da, hs)] if hs is not None else [])


class _RunningRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, act, residual, q, W1, W2, M1, M2, k, Sk, U1, U2, hs, A, c, Da, m):
        P1, zW1, zk, s1, zM1 = _layer(q, W1, M1, k, _first_terms(c, U1, Da, hs), A, m)
        f = _Act(P1, act)
        P2, zW2, zs, s2, zM2 = _layer(f.S, W2, M2, Sk, [(c, U2)], A, m)
        ctx.act, ctx.residual = act, residual
        ctx.save_for_backward(q, W1, W2, M1, M2, k, Sk, U1, U2, hs, A, c, Da, m, zW1, zk, zM1, zW2, zs, zM2,
                              f.H, f.S, f.inv_r, f.g1, *s1, *s2)
        return _residual(P2, q, residual)

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        (q, W1, W2, M1, M2, k, Sk, U1, U2, hs, A, c, Da, m, zW1, zk, zM1, zW2, zs, zM2,
         H, S, inv_r, g1, *scaled) = ctx.saved_tensors
        terms1 = _first_terms(c, U1, Da, hs)
        s1, s2 = scaled[:len(terms1)], scaled[len(terms1):]
        dS, dW2, dM2, dSk, ((dc, dU2),), dA, dm = _layer_backward(do, S, W2, M2, Sk, [(c, U2)], A, m,
                                                                   zW2, zs, s2, zM2)
        dP1, _ = _Act(H, ctx.act, S, inv_r, g1).vjp(dS)
        dq, dW1, dM1, dk, d1, dA1, dm1 = _layer_backward(dP1, q, W1, M1, k, terms1, A, m, zW1, zk, s1, zM1)
        dc = dc + d1[0][0]
        dU1 = d1[0][1]
        dDa, dhs = d1[1] if hs is not None else (None, None)
        dA = dA + dA1
        dm = None if dm is None else dm + dm1
        rq = _scaled(do, ctx.residual)
        dq = dq if rq is None else dq.add_(rq)
        return (None, None, dq, dW1, dW2, dM1, dM2, dk, dSk, dU1, dU2, dhs, dA, dc, dDa, dm)


class _NativeRunningRead(torch.autograd.Function):
    """:class:`_RunningRead` in ``_running_read.c`` (float32 and float64 CPU tensors), on the
    write's segment products ``Pa``, ``C`` (None without momentum) and ``m``, whose gradients it
    returns in their places (``dPa`` gets ``A``'s, ``Da``'s and, without momentum, ``c``'s)."""

    @staticmethod
    def forward(ctx, lib, act, residual, q, W1, W2, M1, M2, k, Sk, U1, U2, hs, Pa, C, m):
        ins = contiguous(q, W1, W2, M1, M2, k, Sk, U1, U2, hs, Pa, C, m)
        q = ins[0]
        N, L, D = q.shape
        h, O = W1.shape[-2], W2.shape[-2]
        base, l2 = split_hidden(act)
        mask = residual.to(q.dtype).contiguous() if isinstance(residual, Tensor) else None
        dims = (N, L, D, h, O, M1 is not None, hs is not None, l2, 2 if mask is not None else int(bool(residual)),
                native.ACTIVATIONS.index(base))
        ctx.cfg_c = native.longs(dims)
        o, work = q.new_empty(N, L, O), q.new_empty(N, lib.work_size(ctx.cfg_c))
        ins += (mask,)
        native.check("_running_read", lib.forward(ctx.cfg_c, native.pointers(ins), native.pointers((o, work)),
                                                  ctypes.c_double(_NORM_EPS2)))
        ctx.lib = lib
        ctx.save_for_backward(*ins, work)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        saved = ctx.saved_tensors
        do = do.contiguous()
        grads = tuple(native.empty(t) for t in saved[:13])  # dq dW1 dW2 dM1 dM2 dk dSk dU1 dU2 dhs dPa dC dm
        native.check("_running_read", ctx.lib.backward(ctx.cfg_c, native.pointers(saved), native.pointer(do),
                                                       native.pointers(grads)))
        return (None, None, None, *grads)


@functools.cache
def _library(dtype: torch.dtype):
    return native.library("_running_read", dtype)


def running_read(q: Tensor, ws, ms, k: Tensor, Sk: Tensor, U1: Tensor, U2: Tensor, hs: Optional[Tensor],
                 rc: ReadCoefficients, *, act: str, residual) -> Tensor:
    """The running read ``o [N, L, O]`` of the queries ``q [N, L, D]`` of a piece of a two-layer
    memory (see the module docstring): ``ws``, ``ms``: the weights and momenta (or None) entering
    the piece; ``k``, ``S_k``, ``U1``, ``U2``, ``hs`` (None for rule "gd"): the write terms of
    :func:`~nldsl.runtime._mlp_write.mlp_write`; ``rc``: the piece's read coefficients."""
    M1, M2 = ms if ms is not None else (None, None)
    tensors = (q, *ws, M1, M2, k, Sk, U1, U2, hs, rc.Pa, rc.C, rc.m)
    lib = _library(q.dtype) if rc.Pa is not None and native.runs(*tensors) else None
    if lib is not None:
        return _NativeRunningRead.apply(lib, act, residual, *tensors)
    return _RunningRead.apply(act, residual, q, ws[0], ws[1], M1, M2, k, Sk, U1, U2, hs, rc.A, rc.c, rc.Da, rc.m)
