r"""The delta rule and the gated delta rule: the L2-objective matrix memory (DeltaNet, Gated DeltaNet).

Nested Learning reading (paper Eq. 65): the memory ``M`` takes one gradient step of size
``beta_t`` on the L2 objective ``L(M; k, v) = 1/2 ||M k_t - v_t||^2`` (fla's convention, no
factor 2), optionally after a retention ``a_t`` (the gated rule):

    M_t = a_t M_{t-1} - beta_t (a_t M_{t-1} k_t - v_t) k_t^T

With the state of one head stored transposed, ``S = M^T`` of shape ``[K, V]``
(flash-linear-attention's layout):

    delta rule:        S_t = S_{t-1} - beta_t k_t (k_t^T S_{t-1} - v_t^T)
                           = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    gated delta rule:  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    read:              o_t = scale * S_t^T q_t        (after the token's own write)

``g`` is the log-space retention (``a_t = exp(g_t)``, ``g <= 0`` usually) and ``beta`` the
per-token step size, both ``[B, T, H]``: exactly fla's ``delta_rule`` / ``gated_delta_rule``
(the erase acts on the *decayed* state).

Implementations (``impl=``):

* ``"reference"``: the token-by-token recurrence, plain torch.
* ``"chunked"``: the WY/UT chunkwise form (Yang et al. 2024; fla ``delta_rule/README.md``).
  Inside a chunk of C tokens starting from ``S_0``, with chunk-local cumulative log retention
  ``b_t`` and ``Gamma_t = exp(b_t)``, write ``S_t = Gamma_t S_0 + sum_{j<=t} exp(b_t - b_j) k_j u_j^T``.
  The "new values" ``u_j = beta_j (v_j - (a_j S_{j-1})^T k_j)`` satisfy a unit lower-triangular
  system

      (I + strict_lower(diag(beta) (K K^T * D))) U' = diag(beta) (V - diag(Gamma) K S_0),
      D[t, j] = exp(b_t - b_j)

  so ``U' = U - W S_0`` with ``U = T V``, ``W = T diag(Gamma) K``,
  ``T = (I + strict_lower(...))^{-1} diag(beta)`` (the UT transform: one batched triangular
  solve against the identity for all chunks at once, with a closed-form backward). Then

      o = scale * ( diag(Gamma) Q S_0 + ((Q K^T) * D * causal) U' )
      S_C = Gamma_C S_0 + (K * exp(b_C - b))^T U'

  All intra-chunk products are batched matmuls over every chunk; one Python loop over the
  chunks carries ``S`` (two small matmuls per chunk). Padded tokens (``k = v = 0, beta = 0,
  g = 0``) are exact no-ops. The fla naming of these pieces: ``W``/``U`` are ``w``/``u`` of
  ``recompute_w_u_fwd``, the loop is ``chunk_delta_h``, the read is ``chunk_fwd_o``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nldsl.runtime._common import (
    MemoryOutput,
    check_chunk_size,
    check_gate,
    check_qkv,
    check_state,
    compute_dtype,
    dispatch,
    chunk_major,
    from_chunk_major,
    resolve_scale,
    segment_products_log,

)

__all__ = ["delta_rule", "gated_delta_rule"]


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | float,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
) -> MemoryOutput:
    """DeltaNet's rule ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. (fla's layers L2-normalise ``k``; this op
            does not, so that it is a pure function of its inputs.)
        beta: step size ``[B, T, H]`` (or a number).
        scale, initial_state (``[B, H, K, V]``), output_final_state: as fla.
        impl: ``"reference"`` or ``"chunked"``; chunk_size: chunked tile (results do not depend
            on it; the reference ignores it).
    """
    return _run("delta_rule", q, k, v, beta, None, scale, initial_state, output_final_state, impl, chunk_size)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | float,
    g: Tensor | float,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
) -> MemoryOutput:
    """Gated DeltaNet's rule ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

    ``g`` is the log-space retention ``[B, T, H]`` (fla convention); ``beta`` the step size.
    Other arguments as :func:`delta_rule`.
    """
    return _run("gated_delta_rule", q, k, v, beta, g, scale, initial_state, output_final_state, impl, chunk_size)


def _run(op, q, k, v, beta, g, scale, initial_state, output_final_state, impl, chunk_size):
    B, T, H, K, V = check_qkv(op, q, k, v)
    beta = check_gate(op, "beta", beta, B, T, H, q)
    if op == "gated_delta_rule":
        g = check_gate(op, "g", g, B, T, H, q)
    if initial_state is not None:
        check_state(op, "initial_state", initial_state, (B, H, K, V), q)
    chunk_size = check_chunk_size(op, chunk_size)
    scale = resolve_scale(op, scale, K)
    fn = dispatch(op, impl, {"reference": _reference, "chunked": _chunked})
    dt = compute_dtype(q, k, v, beta, g, initial_state)
    S0 = q.new_zeros((B, H, K, V), dtype=dt) if initial_state is None else initial_state.to(dt)
    o, S = fn(q, k, v, beta.to(dt), None if g is None else g.to(dt), scale, S0, dt, chunk_size)
    return MemoryOutput(o.to(q.dtype), S if output_final_state else None)


def _reference(q, k, v, beta, g, scale, S, dt, chunk_size):
    q, k, v = (x.to(dt) for x in (q, k, v))
    outs = []
    for t in range(q.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t]
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]                       # retention first
        pred = torch.einsum("bhk,bhkv->bhv", kt, S)                        # k_t^T S
        S = S + (bt[..., None] * kt)[..., :, None] * (vt - pred)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1), S


def _chunked(q, k, v, beta, g, scale, S, dt, C):
    T = q.shape[1]
    C = min(C, T)
    B, H, K, V = S.shape
    # chunk-major layout [N, B*H, C, D]: chunk n's slice is contiguous for the state pass
    qc, kc, vc = (chunk_major(x, C, dt) for x in (q, k, v))
    bc = chunk_major(beta.unsqueeze(-1), C, dt)                        # [N, BH, C, 1]
    if g is None:
        gates = (None, None, None, None)
    else:
        P = segment_products_log(chunk_major(g.unsqueeze(-1), C, dt).squeeze(-1))
        gates = (P[..., 1:, 0].unsqueeze(-1),    # Gamma_t = exp(b_t)           [N, BH, C, 1]
                 P[..., 1:, 1:],                 # D[t, j] = exp(b_t - b_j)     [N, BH, C, C]
                 P[..., -1, 1:].unsqueeze(-1),   # exp(b_C - b_j)               [N, BH, C, 1]
                 P[..., -1:, :1])                # Gamma_C                      [N, BH, 1, 1]
    o, S = _ChunkedDelta.apply(qc * scale, kc, vc, bc, *gates, S.reshape(B * H, K, V))
    return from_chunk_major(o, B, H, T), S.view(B, H, K, V)


class _ChunkedDelta(torch.autograd.Function):
    """The WY/UT chunked (gated) delta rule over all chunks, with a hand-written backward.

    Inputs are chunk-major ``[N, BH, C, D]`` (``q`` already scaled); the gate factors
    ``Gamma, D, to_end, Gamma_C`` come precomputed (autograd takes their gradients back to
    ``g``), or are all None for the plain delta rule. Why by hand: the backward then needs one
    reverse loop with two small products per chunk, and every other product is batched over all
    chunks, with no autograd graph per chunk and no per-step stacking.

    Forward (per chunk, see the module docstring):
        X = [U | W] = T [beta v | beta Gamma k],   T = (I + strict_lower((beta k k^T) * D))^{-1}
        u' = U - W S_0,    o = (Gamma q) S_0 + ((q k^T) * D) u',
        S_C = Gamma_C S_0 + (to_end k)^T u'
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, gam, D, to_end, gam_c, S0):
        N, BH, C, K = q.shape
        V = v.shape[-1]
        kt = k.transpose(-1, -2)
        kb = k * beta
        A_raw = kb @ kt
        A = A_raw if D is None else A_raw * D
        eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(A.shape)
        Tm = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        X = Tm @ torch.cat([v * beta, kb if gam is None else kb * gam], dim=-1)
        U, W = X[..., :V], X[..., V:]
        Aq_raw = q @ kt
        Aq = Aq_raw.tril() if D is None else Aq_raw * D
        qg = q if gam is None else q * gam
        ke_t = (k if to_end is None else k * to_end).transpose(-1, -2)
        starts = q.new_empty(N, BH, K, V)
        news = q.new_empty(N, BH, C, V)
        S = S0
        for n in range(N):  # inter-chunk state pass
            starts[n] = S
            torch.baddbmm(U[n], W[n], S, alpha=-1, out=news[n])      # u' = U - W S_0
            S = torch.baddbmm(S if gam_c is None else gam_c[n] * S, ke_t[n], news[n])
        o = torch.baddbmm((qg @ starts).flatten(0, 1), Aq.flatten(0, 1), news.flatten(0, 1))
        ctx.save_for_backward(q, k, v, beta, gam, D, to_end, gam_c, A_raw, Aq_raw, Tm, X, starts, news)
        return o.view(N, BH, C, V), S

    @staticmethod
    def backward(ctx, do, dS_end):
        q, k, v, beta, gam, D, to_end, gam_c, A_raw, Aq_raw, Tm, X, starts, news = ctx.saved_tensors
        N, BH, C, K = q.shape
        V = v.shape[-1]
        W = X[..., V:]
        Aq = Aq_raw.tril() if D is None else Aq_raw * D
        qg = q if gam is None else q * gam
        ke = k if to_end is None else k * to_end
        # batched parts of the output's gradient
        dAq = do @ news.transpose(-1, -2)                            # d(Aq)
        du_o = Aq.transpose(-1, -2) @ do                             # du' from the read
        dS_o = qg.transpose(-1, -2) @ do                             # dS_0 from the read
        dqg = do @ starts.transpose(-1, -2)
        # reverse state pass: du'_n and the gradient reaching each chunk's end state
        dnews = torch.empty_like(news)
        dends = torch.empty_like(starts)
        dS = dS_end if dS_end is not None else starts.new_zeros(starts.shape[1:])
        for n in range(N - 1, -1, -1):
            dends[n] = dS
            torch.baddbmm(du_o[n], ke[n], dS, out=dnews[n])
            dS_prev = dS if gam_c is None else gam_c[n] * dS
            dS = torch.baddbmm(dS_prev + dS_o[n], W[n].transpose(-1, -2), dnews[n], alpha=-1)
        dS0 = dS
        # batched: state-pass products, then the UT transform, then the elementwise inputs
        dke = news @ dends.transpose(-1, -2)
        dgam_c = None if gam_c is None else (starts * dends).sum((-1, -2), keepdim=True)
        dX = torch.cat([dnews, -(dnews @ starts.transpose(-1, -2))], dim=-1)   # [dU | dW]
        dR = Tm.transpose(-1, -2) @ dX
        dA = -(dR @ X.transpose(-1, -2)).tril(-1)
        dRv, dRw = dR[..., :V], dR[..., V:]
        dAk = dA if D is None else dA * D                            # d(beta k k^T)
        dAqk = dAq.tril() if D is None else dAq * D                  # d(q k^T)
        kb = k * beta
        dkb = dAk @ k + (dRw if gam is None else dRw * gam)
        dk = dAk.transpose(-1, -2) @ kb + dAqk.transpose(-1, -2) @ q + dkb * beta
        dk = dk + (dke if to_end is None else dke * to_end)
        dq = dAqk @ k + (dqg if gam is None else dqg * gam)
        dv = dRv * beta
        dbeta = (v * dRv).sum(-1, keepdim=True) + (k * dkb).sum(-1, keepdim=True)
        dgam = dD = dto_end = None
        if gam is not None:
            dgam = (kb * dRw).sum(-1, keepdim=True) + (q * dqg).sum(-1, keepdim=True)
            dD = dA * A_raw + dAq * Aq_raw
            dto_end = (k * dke).sum(-1, keepdim=True)
        return dq, dk, dv, dbeta, dgam, dD, dto_end, dgam_c, dS0
