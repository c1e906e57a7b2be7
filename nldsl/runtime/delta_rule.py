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
* ``"triton"``: the generated Triton kernels (:mod:`nldsl.codegen.kernels`), the same chunkwise
  form; ``chunk_size`` must be 16, 32, 64 or 128. CUDA tensors (or ``TRITON_INTERPRET=1``).
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
    from_chunks,
    resolve_scale,
    segment_products_log,
    to_chunks,
    ut_apply,
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
        impl: ``"reference"``, ``"chunked"`` or ``"triton"``; chunk_size: chunked tile (results do
            not depend on it; the reference ignores it).
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
    fn = dispatch(op, impl, {"reference": _reference, "chunked": _chunked, "triton": _triton})
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


def _triton(q, k, v, beta, g, scale, S, dt, C):
    from nldsl.runtime._triton import runtime_kernel

    op = "delta_rule" if g is None else "gated_delta_rule"
    kernel = runtime_kernel(op, "delta", lr="tensor", decay="none" if g is None else "tensor",
                            head_k=k.shape[-1], head_v=v.shape[-1], chunk_size=C)
    return kernel(q, k, v, beta, g, scale=scale, initial_state=S, output_final_state=True)


def _chunked(q, k, v, beta, g, scale, S, dt, C):
    T = q.shape[1]
    C = min(C, T)
    B, H, K, V = S.shape
    # [B*H, N, C, D]: (batch, head) flattened so the per-chunk products are 3-D (baddbmm).
    qc, kc, vc = (to_chunks(x, C, dt).flatten(0, 1) for x in (q, k, v))
    bc = to_chunks(beta.unsqueeze(-1), C, dt).flatten(0, 1)        # [B*H, N, C, 1]
    N = qc.shape[1]
    kb = kc * bc
    kkt = kb @ kc.transpose(-1, -2)                           # beta_t k_t . k_j
    qs = qc * scale
    qkt = qs @ kc.transpose(-1, -2)
    if g is None:
        w_rhs = kb
        to_end = chunk_decay = from_start = None
        qkt = qkt.tril_()                                     # causal (incl. the diagonal)
    else:
        P = segment_products_log(to_chunks(g.unsqueeze(-1), C, dt).squeeze(-1).flatten(0, 1))
        within = P[..., 1:, 1:]                                # exp(b_t - b_j), 0 above the diagonal
        from_start = P[..., 1:, 0].unsqueeze(-1)               # exp(b_t)
        to_end = P[..., -1, 1:].unsqueeze(-1)                  # exp(b_C - b_j)
        chunk_decay = P[..., -1, 0, None, None]                # exp(b_C)
        kkt = kkt * within
        qkt = qkt * within                                     # causal through `within`
        w_rhs = kb * from_start
    # UT transform: T = (I + strict_lower(kkt))^{-1}, then U = T (beta V) and W = T (beta Gamma K)
    # in one product (ut_apply has a closed-form backward, cheaper than autograd's).
    UW = ut_apply(kkt, torch.cat([vc * bc, w_rhs], dim=-1))
    U, W = UW[..., :V], UW[..., V:]
    k_end = kc if to_end is None else kc * to_end
    # unbind (not U[:, n]): its backward is one stack, where N selects would each
    # materialise a zero tensor of the full size.
    U, W, k_end_t = U.unbind(1), W.unbind(1), k_end.transpose(-1, -2).unbind(1)
    decays = None if chunk_decay is None else chunk_decay.unbind(1)
    S = S.reshape(B * H, K, V)
    starts, news = [], []
    for n in range(N):  # inter-chunk state pass
        starts.append(S)
        u = torch.baddbmm(U[n], W[n], S, alpha=-1)              # U' = U - W S_0
        news.append(u)
        S = torch.baddbmm(S if decays is None else decays[n] * S, k_end_t[n], u)
    starts = torch.stack(starts, dim=1)
    news = torch.stack(news, dim=1)
    q_start = qs if from_start is None else qs * from_start
    o = torch.baddbmm((q_start @ starts).flatten(0, 1), qkt.flatten(0, 1), news.flatten(0, 1))
    o = o.view(B, H, N, C, V)
    return from_chunks(o, T), S.view(B, H, K, V)
