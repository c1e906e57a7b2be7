r"""The writes of one piece to a two-layer MLP memory, as one autograd function.

The write half of :func:`nldsl.runtime.deep_memory.chunk_step` for the memories every shipped
spec uses, ``M(z) = r z + W_2 phi(W_1 z)`` (``W_1 [h, D]``, ``W_2 [O, h]``, phi an activation,
optionally L2-normalised; ``r`` 0/1 per row). Per row of the batch, for a piece of L tokens:

    Z = [k; v] (signal "self") or k;   H = Z W_a1^T;   S = phi(H);   Y = S W_a2^T + r Z
    eps = y - target (l2) or -target (dot)   (y: Y's k rows; target: Y's v rows, or v)
    e_2 = eps,   e_1 = J_phi(H_k)^T (eps W_a2)          (the errors of the two layers)
    U_i = -eta e_i                                     (u_{i,j} = U_{i,j} a_{i,j}^T: a_1 = k, a_2 = S_k)
    DGD:  hs = (I + strict_lower(eta (Pp * K K^T)))^{-1} (-eta (p0 X_0 k + (Cp * K K^T) U_1 + mp M_1 k))
    W_1' = A W_1 + mL M_1 + (cl U_1 + dl hs)^T k       W_2' = A W_2 + mL M_2 + (cl U_2)^T S_k
    M_1' = bL M_1 + (bl U_1)^T k                       M_2' = bL M_2 + (bl U_2)^T S_k

with the gate coefficients (``A, mL, bL`` per row; ``cl, dl, bl, p0, mp`` per token; ``Pp, Cp``
per pair of tokens) from :func:`piece_coefficients`. Both functions write their backward out
(for the write: the reverse of each line above, including the second-order term of ``e_1``,
whose inner gradient depends on ``H_k``): the forward runs untracked, and the backward works on
a handful of tensors per layer where autograd through the composed ops records a node per op
(weight-sized broadcasts, selects, slices and cats among them). The composed form stays in
``deep_memory`` for other depths and the Triton path; the tests hold the two equal.

Returns the new weights (and momenta), plus what a running read of the piece needs: ``U_1``,
``U_2``, ``hs`` (DGD) and ``S_k``. First order only (``once_differentiable``): training needs
no double backward through a write.

On a CPU the write, its gate coefficients and its hidden layer run as C (``_mlp_write.c``,
:class:`_NativeMlpWrite`: the same lines, one batch row at a time, so that a row's operands stay
in cache through all of them), built on first use by :mod:`nldsl.runtime._native`; the torch ops
(:class:`_Gates`, :class:`_MlpWrite`) run on a GPU, without a C compiler, and with
``NLDSL_NATIVE=0``.
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from nldsl.runtime import _native as native
from nldsl.runtime._activations import _NORM_EPS2, activation, activation_grad, activation_grad2, split_hidden
from nldsl.runtime._common import contiguous, segment_products

__all__ = ["Coefficients", "ReadCoefficients", "end_state", "mlp_write", "per_row", "piece_coefficients"]


class Coefficients(NamedTuple):
    """Gate coefficients of a piece (see the module docstring); None where the configuration
    has no such term (no momentum: ``mL, bL, bl, mp``; rule "gd": ``dl, p0, Pp, Cp, mp``)."""

    A: Tensor                      # [N]     prod of alpha over the piece
    cl: Tensor                     # [N, L]  weight of token j's write in the end state
    mL: Optional[Tensor] = None    # [N]     weight of the entering momentum in the end state
    bL: Optional[Tensor] = None    # [N]     prod of beta over the piece
    bl: Optional[Tensor] = None    # [N, L]  weight of token j's step in the end momentum
    dl: Optional[Tensor] = None    # [N, L]  weight of token j's erase in the end state
    p0: Optional[Tensor] = None    # [N, L]  weight of X_0 in X_{t-1}
    Pp: Optional[Tensor] = None    # [N, L, L] retention from j to t-1
    Cp: Optional[Tensor] = None    # [N, L, L] weight of u_j in X_{t-1}
    mp: Optional[Tensor] = None    # [N, L]  weight of M_0 in X_{t-1}


class ReadCoefficients(NamedTuple):
    """What a running read of the piece takes: ``A[t] = P_a[t, 0]``, ``Da[t, j] = P_a[t, j]``,
    ``c[t, j]`` (token j's step in W_t; Da without momentum), ``m[t]`` (the entering momentum's
    weight in W_t; None without momentum); ``Pa``, ``C``: the segment products ``[N, L+1, L+1]``
    the C kernel made, of which the others are views (None otherwise; ``C`` without momentum),
    which the running read's C kernel reads in place."""

    A: Tensor
    Da: Tensor
    c: Tensor
    m: Optional[Tensor]
    Pa: Optional[Tensor] = None
    C: Optional[Tensor] = None


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1)


def _T(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _segment_products_backward(P: Tensor, dP: Tensor) -> Tensor:
    """The gate gradient of :func:`~nldsl.runtime._common.segment_products` from ``dP``:
    ``da_l = sum_{j < l <= t} dP[t, j] P[l-1, j] P[t, l]`` (no division, exact at zero gates);
    entries of ``dP`` on or above the diagonal drop out."""
    return (P[:, :-1] * torch.bmm(_T(P), dP)[:, 1:]).sum(-1)


class _Gates(torch.autograd.Function):
    """The gate coefficients of a piece from alpha and beta (None = no momentum), with the
    backward written out: Coefficients, then (running reads) ReadCoefficients."""

    @staticmethod
    def forward(ctx, L, dgd, read, alpha, beta):
        Pa = segment_products(alpha)
        mom = beta is not None
        Pb = Q = m = None
        if mom:
            Pb = segment_products(beta)
            Q = torch.bmm(Pa, Pb)
            m = torch.bmm(Pa[:, 1:, 1:], Pb[:, 1:, :1]).squeeze(-1)       # Da @ Bv: [N, L]
        C = Q if mom else Pa                       # c = C[1:, 1:], c_prev = C[:-1, 1:]
        # views of Pa, Pb, Q and m: the outputs are read, never written
        coef = Coefficients(
            A=Pa[:, L, 0], cl=C[:, L, 1:], mL=m[:, L - 1] if mom else None, bL=Pb[:, L, 0] if mom else None,
            bl=Pb[:, L, 1:] if mom else None, dl=Pa[:, L, 1:] if dgd else None,
            p0=Pa[:, :-1, 0] if dgd else None, Pp=Pa[:, :-1, 1:] if dgd else None,
            Cp=C[:, :-1, 1:] if dgd else None, mp=F.pad(m[:, :-1], (1, 0)) if dgd and mom else None)
        rc = ReadCoefficients(Pa[:, 1:, 0], Pa[:, 1:, 1:], C[:, 1:, 1:], m) if read else None
        ctx.L, ctx.dgd, ctx.read, ctx.mom = L, dgd, read, mom
        ctx.save_for_backward(Pa, Pb)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to add
        outs = [t for t in coef if t is not None] + ([t for t in rc if t is not None] if read else [])
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        Pa, Pb = ctx.saved_tensors
        L, dgd, read, mom = ctx.L, ctx.dgd, ctx.read, ctx.mom
        grads = list(grads)
        take = lambda on=True: grads.pop(0) if on else None  # noqa: E731
        gA, gcl, gmL, gbL, gbl = take(), take(), take(mom), take(mom), take(mom)
        gdl, gp0, gPp, gCp, gmp = take(dgd), take(dgd), take(dgd), take(dgd), take(dgd and mom)
        rA, rDa, rc, rm = (take(), take(), take(), take(mom)) if read else (None,) * 4
        N = Pa.shape[0]
        dPa = Pa.new_zeros(N, L + 1, L + 1)
        dC = Pa.new_zeros(N, L + 1, L + 1) if mom else dPa   # c's matrix: Q, or Pa itself
        dPb = Pa.new_zeros(N, L + 1, L + 1) if mom else None

        def add(dst, g):
            if g is not None:
                dst += g
        add(dPa[:, L, 0], gA)
        add(dC[:, L, 1:], gcl)
        if dgd:
            add(dPa[:, L, 1:], gdl)
            add(dPa[:, :-1, 0], gp0)
            add(dPa[:, :-1, 1:], gPp)
            add(dC[:, :-1, 1:], gCp)
        if read:
            add(dPa[:, 1:, 0], rA)
            add(dPa[:, 1:, 1:], rDa)
            add(dC[:, 1:, 1:], rc)
        if mom:
            add(dPb[:, L, 0], gbL)
            add(dPb[:, L, 1:], gbl)
            dm = Pa.new_zeros(N, L)
            add(dm, rm)
            add(dm[:, L - 1], gmL)
            if gmp is not None:
                dm[:, :-1] += gmp[:, 1:]
            # m = Da @ Bv; Q = Pa @ Pb
            dPa[:, 1:, 1:].addcmul_(dm.unsqueeze(-1), Pb[:, 1:, 0].unsqueeze(-2))
            dPb[:, 1:, 0] += torch.bmm(_T(Pa[:, 1:, 1:]), dm.unsqueeze(-1)).squeeze(-1)
            dPa += torch.bmm(dC, _T(Pb))
            dPb += torch.bmm(_T(Pa), dC)
        d_alpha = _segment_products_backward(Pa, dPa) if ctx.needs_input_grad[3] else None
        d_beta = _segment_products_backward(Pb, dPb) if mom and ctx.needs_input_grad[4] else None
        return None, None, None, d_alpha, d_beta


def piece_coefficients(alpha: Optional[Tensor], beta: Optional[Tensor], L: int, like: Tensor, *,
                       dgd: bool, read: bool) -> tuple[Coefficients, Optional[ReadCoefficients]]:
    """The gate coefficients of a piece of L tokens (``alpha``, ``beta``: ``[N, L]`` or None) for
    :func:`mlp_write`, and for a running read when ``read``."""
    if alpha is None:  # no retention: a gate of 1 (a constant: no gradient is computed for it)
        alpha = torch.ones(like.shape[0], L, dtype=like.dtype, device=like.device)
    outs = list(_Gates.apply(L, dgd, read, alpha, beta))
    mom = beta is not None
    take = lambda on=True: outs.pop(0) if on else None  # noqa: E731
    coef = Coefficients(A=take(), cl=take(), mL=take(mom), bL=take(mom), bl=take(mom), dl=take(dgd),
                        p0=take(dgd), Pp=take(dgd), Cp=take(dgd), mp=take(dgd and mom))
    rc = ReadCoefficients(take(), take(), take(), take(mom)) if read else None
    return coef, rc


def _act_grad(H: Tensor, name: str) -> Tensor:
    """act'(H): torch's fused gelu / silu backward of a ones gradient (one op each instead of
    the ten / four of the written-out derivative; the same formula)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(torch.ones_like(H), H)
    if name == "silu":
        return torch.ops.aten.silu_backward(torch.ones_like(H), H)
    return activation_grad(H, name)


def _project(d: Tensor, n: Tensor, inv_r: Tensor) -> Tensor:
    """``(d - n (n . d)) / r``: the normalisation's Jacobian (symmetric) applied to d."""
    return (d - n * (n * d).sum(-1, keepdim=True)) * inv_r


class _Act:
    """The hidden map phi at the rows ``H``: its value ``S`` and its Jacobian-vector products.
    ``g1`` is the activation's derivative at H; with the L2 norm ``S = n = u / r`` (``u = act(H)``)
    and ``inv_r = 1 / r``."""

    def __init__(self, H: Tensor, act: str, S: Optional[Tensor] = None, inv_r: Optional[Tensor] = None,
                 g1: Optional[Tensor] = None):
        self.act = act
        self.base, self.l2 = split_hidden(act)
        self.H = H
        if S is None:
            u = activation(H, self.base)
            if self.l2:
                inv_r = torch.rsqrt((u * u).sum(-1, keepdim=True) + _NORM_EPS2)
                u = u * inv_r
            S, g1 = u, _act_grad(H, self.base)
        self.S, self.inv_r, self.g1 = S, inv_r, g1

    def head(self, L: int) -> "_Act":
        """The same map at the first L rows."""
        return _Act(self.H[:, :L], self.act, self.S[:, :L], None if self.inv_r is None else self.inv_r[:, :L],
                    self.g1[:, :L])

    def vjp(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """``(J^T d, the projected d)``; J^T d = g' * proj(d) (proj = identity without the norm)."""
        pd = _project(d, self.S, self.inv_r) if self.l2 else d
        return self.g1 * pd, pd

    def jvp(self, b: Tensor) -> Tensor:
        """``J b`` = proj(g' * b)."""
        w = self.g1 * b
        return _project(w, self.S, self.inv_r) if self.l2 else w

    def second(self, a: Tensor, pa: Tensor, b: Tensor) -> Tensor:
        """``d/dH <b, J(H)^T a>`` with ``pa`` = proj(a) (the second-order term of an inner
        gradient ``J^T a``). With the norm, ``f = <a, proj(w)>``, ``w = g' * b``:
        ``g'' b pa + g' (df/du + df/dr n)``, ``df/du = -((n.w) a + (n.a) w) / r^2``,
        ``df/dr = (3 (n.a)(n.w) - a.w) / r^2``."""
        g2 = activation_grad2(self.H, self.base)
        if not self.l2:
            return g2 * a * b
        n, inv_r = self.S, self.inv_r
        w = self.g1 * b
        na, nw = (n * a).sum(-1, keepdim=True), (n * w).sum(-1, keepdim=True)
        aw = (a * w).sum(-1, keepdim=True)
        inv_r2 = inv_r * inv_r
        du = (3.0 * na * nw - aw) * n - nw * a - na * w
        return g2 * b * pa + self.g1 * du * inv_r2


def _residual(Y: Tensor, Z: Tensor, residual) -> Tensor:
    """``Y + r Z`` in place (``residual``: a bool or a per-row ``[N]`` 0/1 mask)."""
    if isinstance(residual, Tensor):
        return Y.addcmul_(Z, residual.view(-1, 1, 1))
    return Y.add_(Z) if residual else Y


def _scaled(x: Tensor, residual):
    if isinstance(residual, Tensor):
        return x * residual.view(-1, 1, 1)
    return x if residual else None


def end_state(W: Tensor, A: Tensor, M: Optional[Tensor], m: Optional[Tensor], left: Tensor, a: Tensor) -> Tensor:
    """``A W + m M + left^T a``: a layer's state at the end of a piece (``A``, ``m`` per-row
    scalars, ``M`` optional; ``left`` ``[N, L, do]``, ``a`` ``[N, L, di]``), untracked. The
    product comes first, fresh and contiguous, and the decays accumulate into it: a batched
    product added into a strided tensor (``W * A`` keeps W's layout) runs a loop over the batch."""
    out = torch.bmm(_T(left), a).addcmul_(W, A)
    return out if M is None else out.addcmul_(M, m)


def _acc(X: Optional[Tensor], G: Tensor, s: Tensor) -> Tensor:
    """``X + G * s`` (into X, when there is one)."""
    return G * s if X is None else X.addcmul_(G, s)


class _MlpWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, W1, W2, M1, M2, Wa1, Wa2, k, v, eta, *coef):
        objective, self_signal, dgd, act, residual = cfg
        c = Coefficients(*coef)
        same = Wa1 is None                       # the piece starts at its anchor
        if same:
            Wa1, Wa2 = W1, W2
        L = k.shape[1]
        Z = torch.cat([k, v], dim=1) if self_signal else k
        H = torch.bmm(Z, _T(Wa1))
        fa = _Act(H, act)
        Y = _residual(torch.bmm(fa.S, _T(Wa2)), Z, residual)
        target = Y[:, L:] if self_signal else v
        eps = Y[:, :L] - target if objective == "l2" else -target
        Hk = H[:, :L]
        fk = fa.head(L)
        d1 = torch.bmm(eps, Wa2)
        e1, pd1 = fk.vjp(d1)
        ne = -_col(eta)
        U1, U2 = ne * e1, ne * eps
        Sk = fk.S
        left1 = _col(c.cl) * U1
        hs = KK = Xk = R = Tinv = kM1 = None
        if dgd:
            KK = torch.bmm(k, _T(k))
            Xk = Hk if same else torch.bmm(k, _T(W1))
            R = _col(c.p0) * Xk + torch.bmm(c.Cp * KK, U1)
            if M1 is not None:
                kM1 = torch.bmm(k, _T(M1))
                R.addcmul_(_col(c.mp), kM1)
            G = _col(eta) * c.Pp * KK
            eye = torch.eye(L, dtype=k.dtype, device=k.device).expand(G.shape)
            Tinv = torch.linalg.solve_triangular(G, eye, upper=False, unitriangular=True)
            hs = torch.bmm(Tinv, ne * R)
            left1.addcmul_(_col(c.dl), hs)
        left2 = _col(c.cl) * U2
        A = c.A.view(-1, 1, 1)
        mL = None if M1 is None else c.mL.view(-1, 1, 1)
        W1n, W2n = end_state(W1, A, M1, mL, left1, k), end_state(W2, A, M2, mL, left2, Sk)
        M1n = M2n = None
        if M1 is not None:
            bL, bl = c.bL.view(-1, 1, 1), _col(c.bl)
            M1n, M2n = end_state(M1, bL, None, None, bl * U1, k), end_state(M2, bL, None, None, bl * U2, Sk)

        # every tensor through save_for_backward: one kept on ctx that is (or views) an output,
        # like S_k, would make a reference cycle through this node and leak the whole graph
        ctx.cfg, ctx.same, ctx.L = cfg, same, L
        ctx.set_materialize_grads(False)  # outputs a piece leaves unused (U, hs, S_k without a running read)
        ctx.save_for_backward(W1, W2, M1, M2, None if same else Wa1, None if same else Wa2, k, Z,
                              eps, d1, pd1, e1, U1, U2, KK, Xk, R, Tinv, hs, kM1, left1, left2, eta,
                              fa.H, fa.S, fa.inv_r, fa.g1, *coef)
        out = [W1n, W2n] + ([M1n, M2n] if M1 is not None else []) + [U1, U2] + ([hs] if dgd else []) + [Sk]
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        objective, self_signal, dgd, _, residual = ctx.cfg
        (W1, W2, M1, M2, Wa1, Wa2, k, Z, eps, d1, pd1, e1, U1, U2, KK, Xk, R, Tinv, hs, kM1,
         left1, left2, eta, H, S, inv_r, g1, *coef) = ctx.saved_tensors
        c = Coefficients(*coef)
        L, same = ctx.L, ctx.same
        fa = _Act(H, ctx.cfg[3], S, inv_r, g1)
        fk = fa.head(L)
        if same:
            Wa1, Wa2 = W1, W2
        mom = M1 is not None
        grads = list(grads)
        G1, G2 = grads.pop(0), grads.pop(0)
        F1, F2 = (grads.pop(0), grads.pop(0)) if mom else (None, None)
        gU1, gU2 = grads.pop(0), grads.pop(0)
        ghs = grads.pop(0) if dgd else None
        gSk = grads.pop(0)
        Sk = fk.S
        z = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        G1, G2, F1, F2 = z(G1, W1), z(G2, W2), (z(F1, M1) if mom else None), (z(F2, M2) if mom else None)

        def dot(g, x):  # per-row <g, x> -> [N]
            return (g * x).sum((-2, -1))

        dA = dot(G1, W1) + dot(G2, W2)
        # the end state's writes: W_1' += left1^T k, W_2' += left2^T S_k (and the momenta's)
        P1, P2 = torch.bmm(k, _T(G1)), torch.bmm(Sk, _T(G2))   # [N, L, h], [N, L, O]
        dk = torch.bmm(left1, G1)
        dSk = torch.bmm(left2, G2) if gSk is None else torch.baddbmm(gSk, left2, G2)
        cl = _col(c.cl)
        dU1 = cl * P1 if gU1 is None else torch.addcmul(gU1, cl, P1)
        dU2 = cl * P2 if gU2 is None else torch.addcmul(gU2, cl, P2)
        dcl = _rowdot(U1, P1) + _rowdot(U2, P2)
        dmL = dbL = dbl = ddl = dp0 = dPp = dCp = dmp = dXk = mdR = None
        if mom:
            dmL = dot(G1, M1) + dot(G2, M2)
            dbL = dot(F1, M1) + dot(F2, M2)
            Q1, Q2 = torch.bmm(k, _T(F1)), torch.bmm(Sk, _T(F2))
            bl = _col(c.bl)
            dk.baddbmm_(bl * U1, F1)
            dSk.baddbmm_(bl * U2, F2)
            dU1.addcmul_(bl, Q1)
            dU2.addcmul_(bl, Q2)
            dbl = _rowdot(U1, Q1) + _rowdot(U2, Q2)
        ne = -_col(eta)
        deta = None
        if dgd:
            dhs = _col(c.dl) * P1 if ghs is None else torch.addcmul(ghs, _col(c.dl), P1)
            ddl = _rowdot(hs, P1)
            # hs = Tinv (-eta R): the UT transform's backward (see _common._UTApply)
            dRhs = torch.bmm(_T(Tinv), dhs)
            dG = -torch.bmm(dRhs, _T(hs)).tril(-1)
            dR = ne * dRhs
            deta = -_rowdot(R, dRhs)
            # G = eta (Pp * KK)
            dGK = dG * KK
            deta = deta + _rowdot(dGK, c.Pp)
            dPp = _col(eta) * dGK
            dKK = _col(eta) * dG * c.Pp
            # R = p0 Xk + (Cp * KK) U1 + mp kM1
            dp0 = _rowdot(dR, Xk)
            dXk = _col(c.p0) * dR
            dCK = torch.bmm(dR, _T(U1))
            dCp = dCK * KK
            dKK.addcmul_(dCK, c.Cp)
            dU1.baddbmm_(_T(c.Cp * KK), dR)
            if mom:
                dmp = _rowdot(dR, kM1)
                mdR = _col(c.mp) * dR
                dk.baddbmm_(mdR, M1)
            dk.baddbmm_(dXk, W1)
            dk.baddbmm_(dKK + _T(dKK), k)
        # U_i = -eta e_i
        d_eta = -_rowdot(dU1, e1) - _rowdot(dU2, eps)
        deta = d_eta if deta is None else deta + d_eta
        de1, deps = ne * dU1, ne * dU2
        # e1 = J(H_k)^T d1, d1 = eps W_a2
        dd1 = fk.jvp(de1)
        dHk = fk.second(d1, pd1, de1)
        deps.baddbmm_(dd1, _T(Wa2))
        # eps = y - target / -target; Y = S W_a2^T + r Z
        if self_signal:
            dY = torch.cat([deps if objective == "l2" else torch.zeros_like(deps), -deps], dim=1)
            dv = None
        else:
            dY = deps if objective == "l2" else torch.zeros_like(deps)
            dv = -deps
        dS = torch.bmm(dY, Wa2)
        dS[:, :L] += dSk
        dZ = _scaled(dY, residual)
        dH, _ = fa.vjp(dS)
        dH[:, :L] += dHk
        dZ = torch.bmm(dH, Wa1) if dZ is None else torch.baddbmm(dZ, dH, Wa1)
        dk += dZ[:, :L]
        if self_signal:
            dv = dZ[:, L:]

        # the weights' gradients: the products first (fresh, contiguous: a batched product added
        # into a strided tensor falls back to a loop over the batch), the decays in place after
        dWa1 = torch.bmm(_T(dH), Z)
        dWa2 = torch.bmm(_T(eps), dd1).baddbmm_(_T(dY), fa.S)
        dW1, dW2, dM1, dM2 = (dWa1, dWa2, None, None) if same else (None, None, None, None)
        if same:
            dWa1 = dWa2 = None
        if dgd:
            dW1 = torch.bmm(_T(dXk), k) if dW1 is None else dW1.baddbmm_(_T(dXk), k)
            if mom:
                dM1 = torch.bmm(_T(mdR), k)
        A = c.A.view(-1, 1, 1)
        dW1, dW2 = _acc(dW1, G1, A), _acc(dW2, G2, A)
        if mom:
            mL, bL = c.mL.view(-1, 1, 1), c.bL.view(-1, 1, 1)
            dM1 = _acc(_acc(dM1, G1, mL), F1, bL)
            dM2 = _acc(_acc(dM2, G2, mL), F2, bL)
        dcoef = Coefficients(A=dA, cl=dcl, mL=dmL, bL=dbL, bl=dbl, dl=ddl, p0=dp0, Pp=dPp, Cp=dCp, mp=dmp)
        dcoef = [None if x is None else d for x, d in zip(coef, dcoef)]
        return (None, dW1, dW2, dM1, dM2, dWa1, dWa2, dk, dv, deta, *dcoef)


class WriteKernel(NamedTuple):
    """A configured call of ``_mlp_write.c``: the library, its dims as ctypes, and the flags the
    buffers follow."""

    lib: ctypes.CDLL
    cfg_c: ctypes.Array
    dgd: bool
    mom: bool
    read: bool
    self_signal: bool
    l2: bool


def write_kernel(lib, cfg, W1, W2, M1, same: bool, k, v, mask) -> WriteKernel:
    """The :class:`WriteKernel` of a piece (``cfg``: see :class:`_NativeMlpWrite`)."""
    objective, self_signal, dgd, act, residual, read = cfg
    N, (Nk, L, D) = W1.shape[0], k.shape
    Lz, h, O = 2 * L if self_signal else L, W1.shape[-2], W2.shape[-2]
    base, l2 = split_hidden(act)
    dims = (N, L, Lz, D, h, O, v.shape[-1], self_signal, objective == "l2", dgd, M1 is not None, same,
            l2, 2 if mask is not None else int(bool(residual)), read, native.ACTIVATIONS.index(base), Nk)
    return WriteKernel(lib, native.longs(dims), dgd, M1 is not None, read, self_signal,
                       l2)


def write_outputs(kernel: WriteKernel, N: int, L: int, h: int, O: int, D: int, empty):
    """The forward's 15 outputs ``(W1n, W2n, M1n, M2n, U1, U2, hs, work, H, S, g1, inv_r, Pa, C,
    m)`` for N rows of L tokens (None where not made), each ``empty(*shape)``."""
    Lz = 2 * L if kernel.self_signal else L
    W1n, W2n = empty(N, h, D), empty(N, O, h)
    M1n, M2n = (empty(N, h, D), empty(N, O, h)) if kernel.mom else (None, None)
    U1, U2 = empty(N, L, h), empty(N, L, O)
    hs = empty(N, L, h) if kernel.dgd else None
    work = empty(N, kernel.lib.work_size(kernel.cfg_c))
    H, S, g1 = (empty(N, Lz, h) for _ in range(3))
    inv_r = empty(N, Lz) if kernel.l2 else None
    Pa = empty(N, L + 1, L + 1) if kernel.read else None
    C, m = (empty(N, L + 1, L + 1), empty(N, L)) if kernel.read and kernel.mom else (None, None)
    return W1n, W2n, M1n, M2n, U1, U2, hs, work, H, S, g1, inv_r, Pa, C, m


def write_forward(kernel: WriteKernel, ins):
    """The piece's writes on contiguous ``ins`` = (W1, W2, M1, M2, Wa1, Wa2, k, v, eta, mask,
    alpha, beta): ``(W1n, W2n, M1n, M2n, U1, U2, hs, Sk, Pa, C, m)`` (None where not made) and
    what the backward reads after ``ins`` ``(H, S, g1, inv_r, U1, U2, hs, work)``."""
    W1, W2, k = ins[0], ins[1], ins[6]
    L = k.shape[1]
    outs = write_outputs(kernel, W1.shape[0], L, W1.shape[-2], W2.shape[-2], W1.shape[-1], k.new_empty)
    W1n, W2n, M1n, M2n, U1, U2, hs, work, H, S, g1, inv_r, Pa, C, m = outs
    native.check("_mlp_write", kernel.lib.forward(kernel.cfg_c, native.pointers(ins), native.pointers(outs),
                                                  ctypes.c_double(_NORM_EPS2)))
    return (W1n, W2n, M1n, M2n, U1, U2, hs, S[:, :L], Pa, C, m), (H, S, g1, inv_r, U1, U2, hs, work)


def write_backward(kernel: WriteKernel, saved, grads, want_alpha: bool, want_beta: bool):
    """``(dW1, dW2, dM1, dM2, dWa1, dWa2, dk, dv, deta, dalpha, dbeta)`` (None where not made)
    from what the forward kept (``ins`` then its tensors) and the gradients (contiguous, None:
    zero) of ``(W1n, W2n, M1n, M2n, U1, U2, hs, Sk, Pa, C, m)``."""
    W1, W2, M1, M2, Wa1, Wa2, k, v, eta, mask, alpha, beta = saved[:12]
    dW1, dW2, dM1, dM2 = native.empty(W1), native.empty(W2), native.empty(M1), native.empty(M2)
    dWa1, dWa2 = native.empty(Wa1), native.empty(Wa2)
    dk, dv, deta = native.empty(k), native.empty(v), native.empty(eta)
    dalpha, dbeta = native.empty(alpha) if want_alpha else None, native.empty(beta) if want_beta else None
    out = (dW1, dW2, dM1, dM2, dWa1, dWa2, dk, dv, deta, dalpha, dbeta)
    native.check("_mlp_write", kernel.lib.backward(kernel.cfg_c, native.pointers(saved), native.pointers(grads),
                                                   native.pointers(out)))
    return out


class _NativeMlpWrite(torch.autograd.Function):
    """:class:`_MlpWrite` and the gate coefficients (:class:`_Gates`) in ``_mlp_write.c`` (float32
    and float64 CPU tensors): takes the gates alpha, beta where :class:`_MlpWrite` takes their
    coefficients, and returns for a running read the segment products it reads (``Pa`` and, with
    momentum, ``C`` and ``m``; see :func:`_read_coefficients`)."""

    @staticmethod
    def forward(ctx, lib, cfg, W1, W2, M1, M2, Wa1, Wa2, k, v, eta, alpha, beta):
        residual = cfg[4]
        W1, W2, M1, M2, Wa1, Wa2, k, v, eta, alpha, beta = contiguous(W1, W2, M1, M2, Wa1, Wa2, k, v, eta, alpha, beta)
        mask = residual.to(k.dtype).contiguous() if isinstance(residual, Tensor) else None
        ctx.kernel = write_kernel(lib, cfg, W1, W2, M1, Wa1 is None, k, v, mask)
        ins = (W1, W2, M1, M2, Wa1, Wa2, k, v, eta, mask, alpha, beta)
        outs, keep = write_forward(ctx.kernel, ins)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*ins, *keep)
        return tuple(t for t in outs if t is not None)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        kernel = ctx.kernel
        grads = list(grads)
        take = lambda on=True: grads.pop(0) if on else None  # noqa: E731
        mom, dgd, read = kernel.mom, kernel.dgd, kernel.read
        ordered = contiguous(take(), take(), take(mom), take(mom), take(), take(), take(dgd), take(),
                             take(read), take(read and mom), take(read and mom))
        need = ctx.needs_input_grad
        out = write_backward(kernel, ctx.saved_tensors, ordered, need[11], need[12])
        return (None, None, *out)


def _read_coefficients(Pa: Tensor, C: Optional[Tensor], m: Optional[Tensor]) -> ReadCoefficients:
    """A running read's coefficients as views of the gates' segment products (as :class:`_Gates`
    makes them; ``C`` is ``Pa`` without momentum)."""
    views = Pa if C is None else C
    return ReadCoefficients(Pa[:, 1:, 0], Pa[:, 1:, 1:], views[:, 1:, 1:], m, Pa, C)


@functools.cache
def _library(dtype: torch.dtype):
    lib = native.library("_mlp_write", dtype)
    if lib is not None:
        lib.work_size.restype = ctypes.c_int64
    return lib


def per_row(t: Optional[Tensor], N: int) -> Optional[Tensor]:
    """``t`` with a row for each of N memory rows: the rows of a ``t`` shared by G groups of rows
    (N / G of them; memory row r reads row r mod N / G, as stacked memories read their common
    inputs) repeated G times."""
    return t if t is None or t.shape[0] == N else t.repeat(N // t.shape[0], *([1] * (t.dim() - 1)))


def mlp_write(ws, ms, anchor, k, v, eta, alpha, beta, *, objective, signal, rule, act, residual, read=False):
    """One piece of writes (see the module docstring). ``ws``, ``anchor``: ``(W_1, W_2)``; ``ms``:
    ``(M_1, M_2)`` or None; ``alpha``, ``beta``: the piece's gates ``[N, L]`` (alpha None: no
    retention; beta None without momentum). ``k``, ``v``, ``eta``, ``alpha``, ``beta`` may have
    N / G rows, shared by G groups of the memory rows (:func:`per_row`); the C kernel reads them
    so, without the copies. ``read``: the piece is also read running. Returns ``(ws_end, ms_end or
    None, U1, U2, hs or None, S_k, the read's coefficients or None)``."""
    if ws[0].shape[0] % k.shape[0]:
        raise ValueError(f"mlp_write: {k.shape[0]} rows of inputs cannot be shared by {ws[0].shape[0]} memory rows")
    dgd = rule == "dgd"
    same = ws[0] is anchor[0] and ws[1] is anchor[1]
    M1, M2 = ms if ms is not None else (None, None)
    Wa1, Wa2 = (None, None) if same else anchor
    cfg = (objective, signal == "self", dgd, act, residual)
    lib = _library(k.dtype) if native.runs(k, *ws, v, eta, alpha, beta) else None
    mom = ms is not None
    if lib is not None:
        out = list(_NativeMlpWrite.apply(lib, cfg + (read,), ws[0], ws[1], M1, M2, Wa1, Wa2, k, v, eta, alpha, beta))
        rc = _read_coefficients(*out[-3:] if mom else (out[-1], None, None)) if read else None
        out = out[:len(out) - (3 if mom else 1)] if read else out
    else:
        N = ws[0].shape[0]
        k, v, eta, alpha, beta = (per_row(t, N) for t in (k, v, eta, alpha, beta))
        coef, rc = piece_coefficients(alpha, beta, k.shape[1], k, dgd=dgd, read=read)
        out = list(_MlpWrite.apply(cfg, ws[0], ws[1], M1, M2, Wa1, Wa2, k, v, eta, *coef))
    ws_end = out[:2]
    ms_end = out[2:4] if mom else None
    rest = out[4:] if mom else out[2:]
    U1, U2 = rest[0], rest[1]
    hs = rest[2] if dgd else None
    return ws_end, ms_end, U1, U2, hs, rest[-1], rc
