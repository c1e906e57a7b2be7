r"""Linear attention: the Hebbian (dot-product objective) matrix memory, with optional decay.

Nested Learning reading (paper Eq. 14-18 and Eq. 64): the memory ``M`` learns by gradient
descent on the dot-product objective ``L(M; k, v) = -<M k, v>`` with step size 1 and weight
decay (retention) ``a_t``:

    M_t = a_t M_{t-1} - grad L(M_{t-1}; k_t, v_t) = a_t M_{t-1} + v_t k_t^T

Here the state of one head is stored transposed, as flash-linear-attention does: ``S = M^T`` of
shape ``[K, V]``, so the update and the read are

    S_t = a_t S_{t-1} + k_t v_t^T            (outer product, [K, V])
    o_t = scale * S_t^T q_t                  (the token reads the state *after* its own write)

Retention ``a_t`` (``= exp(g_t) * decay``; 1 when neither is given):

* ``g``: data-dependent per-token gate in **log space**, ``[B, T, H]``, ``a_t = exp(g_t)``
  (fla's ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` convention; usually ``g <= 0``).
* ``decay``: a constant **multiplicative** retention, a float in ``(0, 1]`` (RetNet-style).

Both may be given; they multiply. ``decay=None, g=None`` is plain causal linear attention, equal to
``(scale * Q K^T masked causally) V`` (tested as an independent closed form).

``read="anchor"`` reads before the write instead, ``o_t = scale * S_{t-1}^T q_t`` (the per-token
anchor read of nldsl's read modes: a Hebbian memory of period 1 read at its anchor); the state is
the same. In the chunked form below the token reads row ``t - 1`` of the chunk's retentions, so the
mask loses its diagonal.

Implementations (``impl=``):

* ``"reference"``: the token-by-token recurrence above, plain torch, the readable ground truth.
* ``"triton"``: the generated Triton kernels (:mod:`nldsl.codegen.kernels`), the same chunkwise form.
* ``"chunked"``: chunkwise-parallel form. Per chunk of C tokens with chunk-local cumulative log
  retention ``b_t`` (``b_0 = 0`` at the chunk start, ``S_0`` the state entering the chunk):

      o_t = scale * ( exp(b_t) q_t S_0 + sum_{j<=t} exp(b_t - b_j) (q_t . k_j) v_j )
      S_C = exp(b_C) S_0 + sum_j exp(b_C - b_j) k_j v_j^T

  The intra-chunk parts are batched matmuls over all chunks at once; one Python loop over the
  chunks carries ``S`` from chunk to chunk. Padded tokens (``k = v = 0``, ``g = 0``) are exact
  no-ops.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from nldsl.runtime._common import (
    MemoryOutput,
    check_chunk_size,
    check_gate,
    check_qkv,
    check_read,
    check_state,
    compute_dtype,
    dispatch,
    from_chunks,
    resolve_scale,
    segment_products_log,
    to_chunks,
)

__all__ = ["linear_attention"]

_OP = "linear_attention"


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    g: Tensor | None = None,
    decay: float | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
    read: str = "running",
) -> MemoryOutput:
    """Causal linear attention ``S_t = a_t S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: optional log-space retention gate ``[B, T, H]`` (``a_t = exp(g_t)``).
        decay: optional constant multiplicative retention in ``(0, 1]``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or None (zeros). Gradients flow into it.
        output_final_state: return ``S_T`` (``[B, H, K, V]``, float32 or wider).
        impl: ``"reference"`` (token by token), ``"chunked"`` or ``"triton"`` (the generated
            kernels; chunk_size 16, 32, 64 or 128; CUDA tensors or ``TRITON_INTERPRET=1``).
        chunk_size: tokens per chunk for ``"chunked"`` (an implementation detail: results do not
            depend on it; the reference ignores it).
        read: ``"running"`` (``o_t`` reads ``S_t``, after the token's write) or ``"anchor"``
            (``S_{t-1}``, before it; ``"reference"`` and ``"chunked"`` only).

    Returns:
        ``MemoryOutput(o, final_state)`` with ``o: [B, T, H, V]`` in ``q.dtype``.
    """
    B, T, H, K, V = check_qkv(_OP, q, k, v)
    if g is not None:
        g = check_gate(_OP, "g", g, B, T, H, q)
    if decay is not None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
            raise ValueError(f"{_OP}: decay must be a float in (0, 1] (multiplicative retention), got {decay!r}")
    if initial_state is not None:
        check_state(_OP, "initial_state", initial_state, (B, H, K, V), q)
    chunk_size = check_chunk_size(_OP, chunk_size)
    scale = resolve_scale(_OP, scale, K)
    check_read(_OP, read)
    if read == "anchor" and impl == "triton":
        raise ValueError(f"{_OP}: the Triton kernels read after the write (read='running'); use impl='chunked'")
    fn = dispatch(_OP, impl, {"reference": _reference, "chunked": _chunked, "triton": _triton})
    dt = compute_dtype(q, k, v, g, initial_state)
    # One log-space gate (or None): a constant decay is folded into it.
    log_a = None
    if g is not None:
        log_a = g.to(dt)
    if decay is not None and decay != 1.0:
        log_a = (log_a if log_a is not None else q.new_zeros((B, T, H), dtype=dt)) + math.log(decay)
    S0 = q.new_zeros((B, H, K, V), dtype=dt) if initial_state is None else initial_state.to(dt)
    o, S = fn(q, k, v, log_a, scale, S0, dt, chunk_size, read == "anchor")
    return MemoryOutput(o.to(q.dtype), S if output_final_state else None)


def _reference(q, k, v, log_a, scale, S, dt, chunk_size, before):
    q, k, v = (x.to(dt) for x in (q, k, v))
    outs = []
    for t in range(q.shape[1]):
        if before:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        if log_a is not None:
            S = S * log_a[:, t].exp()[..., None, None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]            # k_t v_t^T
        if not before:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1), S


def _triton(q, k, v, log_a, scale, S, dt, C, before):
    from nldsl.runtime._triton import runtime_kernel

    kernel = runtime_kernel(_OP, "hebbian", lr="none", decay="none" if log_a is None else "tensor",
                            head_k=k.shape[-1], head_v=v.shape[-1], chunk_size=C)
    return kernel(q, k, v, None, log_a, scale=scale, initial_state=S, output_final_state=True)


def _chunked(q, k, v, log_a, scale, S, dt, C, before):
    T = q.shape[1]
    C = min(C, T)  # one short chunk beats padding a long one
    qc, kc, vc = (to_chunks(x, C, dt) for x in (q, k, v))  # [B, H, N, C, D]
    qc = qc * scale
    N = qc.shape[2]
    attn = qc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    if log_a is None:
        attn = attn.tril(-1 if before else 0)
        # Without retention the chunk-to-chunk pass is a plain prefix sum of k^T v.
        kv = kc.transpose(-1, -2) @ vc  # [B, H, N, K, V]
        prefix = torch.cumsum(kv, dim=2)
        starts = torch.cat([S.unsqueeze(2), S.unsqueeze(2) + prefix[:, :, :-1]], dim=2)
        o = qc @ starts + attn @ vc
        return from_chunks(o, T), S + prefix[:, :, -1]
    P = segment_products_log(to_chunks(log_a.unsqueeze(-1), C, dt).squeeze(-1))  # [B,H,N,C+1,C+1]
    rows = P[..., :-1, :] if before else P[..., 1:, :]  # token t reads the state after t - 1 or t tokens
    from_start = rows[..., 0]     # exp(b_t) (b_{t-1} before the write)
    within = rows[..., 1:]        # exp(b_t - b_j), lower triangle incl. the diagonal (without it before)
    to_end = P[..., -1, 1:]       # exp(b_C - b_j)
    chunk_decay = P[..., -1, 0]   # exp(b_C)
    kv = (kc * to_end.unsqueeze(-1)).transpose(-1, -2) @ vc  # this chunk's own writes at its end
    starts = []
    decays, kv = chunk_decay[..., None, None].unbind(2), kv.unbind(2)  # unbind: cheap backward
    for n in range(N):  # the only sequential part: carry S across chunks
        starts.append(S)
        S = decays[n] * S + kv[n]
    starts = torch.stack(starts, dim=2)
    o = (qc * from_start.unsqueeze(-1)) @ starts + (attn * within) @ vc
    return from_chunks(o, T), S
