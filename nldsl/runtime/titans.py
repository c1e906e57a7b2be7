r"""Titans' linear long-term memory: momentum ("past surprise") and a forget gate.

Titans (Behrouz et al. 2025, Eq. 13-14), in Titans' own symbols, for a linear memory ``M`` and
the L2 loss ``l(M; k, v) = 1/2 ||M k - v||^2`` (gradient ``(M k - v) k^T``):

    S_t = eta_t S_{t-1} - theta_t grad l(M_{a(t)}; k_t, v_t)     (momentum: past + momentary surprise)
    M_t = (1 - alpha_t) M_{t-1} + S_t                          (forget gate alpha_t in [0, 1])
    o_t = scale * M_t(q_t)                                     (read after the write, Titans Eq. 15)

Symbol map. Titans: ``theta`` = inner learning rate, ``eta`` = momentum decay, ``alpha`` =
forget gate (0 keeps, 1 wipes). Nested Learning / Miras / Atlas write the same rule with
``alpha^NL = 1 - alpha^Titans`` (retention) and ``eta^NL = theta^Titans`` (learning rate).
The loss here carries the 1/2 (as Titans' appendix C); Titans Eq. 12 writes ``||.||^2``, whose
gradient is twice as large: pass ``2 * theta`` for that convention. With ``eta = 0``,
``alpha = 0`` and ``chunk_size = 1`` the rule is exactly the delta rule with ``beta = theta``.

Layout: as flash-linear-attention, the memory of one head is stored transposed, ``[K, V]``
(``M(k) = M^T k``), so the gradient is ``k (k^T M - v^T)`` and the read ``o_t = scale M_t^T q_t``.

Chunking is part of the semantics (Titans Eq. 16-18, TTT's mini-batch): the gradient of token
t is taken at the **anchor** ``a(t)``: the state at the start of t's chunk, where chunks are
``chunk_size`` consecutive tokens counted from the start of the stream. ``chunk_size = 1`` is
the exact per-token rule (``a(t) = t - 1``). The momentum and the memory still evolve token by
token inside a chunk, and token t reads ``M_t`` (the "running" read); ``read="anchor"`` reads
the anchor state instead (``o_t = scale M_{a(t)}^T q_t``, the read of NL Eq. 90).

State. An exact continuation needs more than ``M``: the momentum, the anchor and the position
inside the current chunk. ``final_state`` is a :class:`TitansState`; pass it back as
``initial_state`` to continue the stream (also when a call ends inside a chunk). A plain
``[B, H, K, V]`` tensor as ``initial_state`` means ``M_0`` with zero momentum at a chunk start.

Objective. The gradient is ``k e^T`` with ``e = dl/dM(k)`` at the anchor, so any objective of
the read's residual works alike: ``objective="dot"`` is linear attention's ``l(M; k, v) =
-<M(k), v>`` (paper Eq. 17, 64), ``e = -v``, no state in it (with ``eta = 0`` that is
:func:`~nldsl.runtime.linear_attention.linear_attention` on values times theta, retention
``1 - alpha``, for a running read, or an anchor read at chunk 1; this op adds momentum and the
anchor read of longer chunks);
``"l1"``, ``"lp"`` (``1/p ||r||_p^p``, ``p``) and ``"huber"`` (threshold ``delta``) are the robust
objectives of the Miras family (section 5), ``e = sign(r)``, ``|r|^(p-1) sign(r)``,
``clamp(r, -delta, delta)`` for ``r = M_a(k) - v``. Every formula below holds with its ``e_j``.

Implementations (``impl=``), both taking the same ``chunk_size`` (they compute the same thing):

* ``"reference"``: token by token, gradients at the anchor, plain torch.
* ``"chunked"``: per chunk the gradients are known once the anchor is, and the two linear
  recurrences unroll into segment products of the gates (no logarithms, so ``eta = 0`` or
  ``alpha = 1`` are exact). With ``Pb[t, j] = prod_{l=j+1}^t (1 - alpha_l)``,
  ``Pe[t, j] = prod_{l=j+1}^t eta_l`` (index 0 = chunk start) and ``e_j = M_a^T k_j - v_j``:

      S_t = Pe[t,0] S_0 - sum_j Pe[t,j] theta_j k_j e_j^T
      M_t = Pb[t,0] M_0 + (Pb Pe)[t,0]' S_0 - sum_j (Pb Pe)[t,j] theta_j k_j e_j^T

  where ``(Pb Pe)[t,0]' = sum_{i=1}^t Pb[t,i] Pe[i,0]``. The intra-chunk parts are batched
  matmuls over all chunks; one Python loop carries ``(M, S)`` across chunks. (So with
  ``chunk_size = 1`` this path is a per-token loop too: the exact per-token Titans rule is a
  second-order recurrence with no cheaper chunked form here.)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from nldsl.runtime._common import (
    MemoryOutput,
    check_chunk_size,
    check_gate,
    check_objective,
    check_qkv,
    check_read,
    check_state,
    compute_dtype,
    dispatch,
    from_chunks,
    output_error,
    resolve_scale,
    segment_products,
    to_chunks,
)

__all__ = ["titans_linear", "TitansState"]

_OP = "titans_linear"


class TitansState(NamedTuple):
    """Everything an exact continuation of a Titans-linear stream needs.

    memory: ``M`` ``[B, H, K, V]``; momentum: ``S`` ``[B, H, K, V]``; anchor: the state the
    current chunk's gradients are taken at ``[B, H, K, V]``; offset: how many tokens of the
    current chunk have been consumed (0 = the next token starts a chunk).
    """

    memory: Tensor
    momentum: Tensor
    anchor: Tensor
    offset: int


def titans_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor | float,
    eta: Tensor | float,
    alpha: Tensor | float,
    *,
    scale: float | None = None,
    initial_state: Tensor | TitansState | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
    read: str = "running",
    objective: str = "l2",
    p: float | None = None,
    delta: float | None = None,
) -> MemoryOutput:
    """Titans linear memory with momentum and forget gate (Titans Eq. 13-14, symbols as Titans).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        theta: learning rate ``[B, T, H]`` (or a number).
        eta: momentum decay ``[B, T, H]`` (or a number); 0 = no momentum.
        alpha: forget gate ``[B, T, H]`` (or a number); 0 keeps, 1 wipes.
        scale: query scale, default ``K ** -0.5``.
        initial_state: None, ``M_0`` ``[B, H, K, V]``, or a :class:`TitansState`.
        output_final_state: return a :class:`TitansState`.
        impl: ``"reference"`` or ``"chunked"``.
        chunk_size: the update period (gradients at the chunk-start state); **part of the
            semantics**, 1 = exact per-token rule.
        read: ``"running"`` (``o_t`` reads ``M_t``) or ``"anchor"`` (reads ``M_{a(t)}``).
        objective: ``"l2"`` (``1/2 ||M(k) - v||^2``), ``"dot"`` (``-<M(k), v>``, Hebbian), ``"l1"``,
            ``"lp"`` (exponent ``p`` >= 1) or ``"huber"`` (threshold ``delta`` > 0, default 1).
    """
    B, T, H, K, V = check_qkv(_OP, q, k, v)
    theta = check_gate(_OP, "theta", theta, B, T, H, q)
    eta = check_gate(_OP, "eta", eta, B, T, H, q)
    alpha = check_gate(_OP, "alpha", alpha, B, T, H, q)
    C = check_chunk_size(_OP, chunk_size)
    check_read(_OP, read)
    check_objective(_OP, objective, p, delta)
    scale = resolve_scale(_OP, scale, K)
    fn = dispatch(_OP, impl, {"reference": _reference, "chunked": _chunked})
    shape = (B, H, K, V)
    if isinstance(initial_state, TitansState):
        for name in ("memory", "momentum", "anchor"):
            check_state(_OP, f"initial_state.{name}", getattr(initial_state, name), shape, q)
        off = initial_state.offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < C:
            raise ValueError(
                f"{_OP}: initial_state.offset must be an int in [0, chunk_size={C}), got {off!r} "
                "(was the state produced with another chunk_size?)"
            )
        tensors = (initial_state.memory, initial_state.momentum, initial_state.anchor)
    elif initial_state is None or isinstance(initial_state, Tensor):
        if initial_state is not None:
            check_state(_OP, "initial_state", initial_state, shape, q)
        tensors, off = (initial_state,), 0
    else:
        raise TypeError(f"{_OP}: initial_state must be None, a [B, H, K, V] tensor or a TitansState")
    dt = compute_dtype(q, k, v, theta, eta, alpha, *tensors)
    if isinstance(initial_state, TitansState):
        M0, Z0, A0 = (x.to(dt) for x in tensors)
    else:
        M0 = q.new_zeros(shape, dtype=dt) if initial_state is None else initial_state.to(dt)
        Z0, A0 = torch.zeros_like(M0), M0
    gates = tuple(x.to(dt) for x in (theta, eta, alpha))
    error = functools.partial(_error, objective=objective, p=p, delta=delta)
    o, state = fn(q, k, v, gates, scale, TitansState(M0, Z0, A0, off), dt, C, read == "anchor", error)
    return MemoryOutput(o.to(q.dtype), state if output_final_state else None)


def _error(k: Tensor, A: Tensor, v: Tensor, *, objective: str, p, delta) -> Tensor:
    """The objective's gradient with respect to the read ``M_a(k)`` at the anchor (not computed for
    dot, whose gradient has none). ``k`` ``[..., L, K]``, ``A`` ``[..., K, V]``, ``v`` ``[..., L, V]``."""
    return output_error(None if objective == "dot" else k @ A, v, objective, p, delta)


def _reference(q, k, v, gates, scale, state, dt, C, read_anchor, error):
    q, k, v = (x.to(dt) for x in (q, k, v))
    theta, eta, alpha = gates
    M, Z, A, off = state
    outs = []
    for t in range(q.shape[1]):
        if off == 0:
            A = M                                             # a new chunk: re-anchor
        kt = k[:, t]
        err = error(kt.unsqueeze(-2), A, v[:, t].unsqueeze(-2)).squeeze(-2)  # l2: M_a(k_t) - v_t
        grad = kt[..., :, None] * err[..., None, :]           # k_t (k_t^T M_a - v_t^T)
        Z = eta[:, t, :, None, None] * Z - theta[:, t, :, None, None] * grad
        M = (1 - alpha[:, t])[..., None, None] * M + Z
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, A if read_anchor else M))
        off = (off + 1) % C
    return torch.stack(outs, dim=1), TitansState(M, Z, A if off else M, off)


def _chunked(q, k, v, gates, scale, state, dt, C, read_anchor, error):
    """Split the call along the stream's chunk grid into [head | whole chunks | tail]: the head
    finishes a chunk begun in an earlier call (gradients at the stored anchor), the tail starts
    one this call does not finish. Each piece is one batched pass."""
    T = q.shape[1]
    M, Z, A, off = state
    head = min((C - off) % C, T)
    body = (T - head) // C * C
    tail = T - head - body
    outs, tail_start = [], None
    for start, length, size in ((0, head, head), (head, body, C), (head + body, tail, tail)):
        if length == 0:
            continue
        sl = slice(start, start + length)
        anchor = A if start == 0 and off > 0 else None  # only the head continues a chunk
        o, M, Z, last_start = _chunks(
            q[:, sl], k[:, sl], v[:, sl], [x[:, sl] for x in gates], scale, M, Z, anchor, dt, size, read_anchor, error
        )
        outs.append(o)
        tail_start = last_start
    off_new = (off + T) % C
    if off_new == 0:
        A = M                  # the next token starts a chunk
    elif tail:
        A = tail_start         # inside the chunk the tail started
    # else: still inside the chunk we were continuing; keep its anchor
    return torch.cat(outs, dim=1), TitansState(M, Z, A, off_new)


def _chunks(q, k, v, gates, scale, M, Z, anchor, dt, C, read_anchor, error):
    """Run ``L = N * C`` tokens that start at a chunk boundary of the grid (or, when ``anchor``
    is given, continue a chunk whose gradients are taken at ``anchor``; then ``N = 1``)."""
    T = q.shape[1]
    qc, kc, vc = (to_chunks(x, C, dt) for x in (q, k, v))      # [B, H, N, C, D]
    theta, eta, alpha = (to_chunks(x.unsqueeze(-1), C, dt).squeeze(-1) for x in gates)
    N = qc.shape[2]
    Pb = segment_products(1 - alpha)                          # [B, H, N, C+1, C+1]
    Pe = segment_products(eta)
    Pbe = Pb[..., 1:, 1:] @ Pe[..., 1:, :]                    # [t, j] = sum_i Pb[t,i] Pe[i,j]
    mem_from_mem = Pb[..., 1:, 0]                             # [B, H, N, C]
    mem_from_mom = Pbe[..., 0]
    mem_grad = Pbe[..., 1:] * theta.unsqueeze(-2)             # (Pb Pe)[t, j] theta_j
    mom_from_mom = Pe[..., -1, 0]
    mom_grad = Pe[..., -1, 1:] * theta                        # Pe[C, j] theta_j
    # chunk-end rows, used in the state pass
    k_mem = (kc * mem_grad[..., -1, :].unsqueeze(-1)).transpose(-1, -2).unbind(2)
    k_mom = (kc * mom_grad.unsqueeze(-1)).transpose(-1, -2).unbind(2)
    end_mm, end_mz, end_zz = mem_from_mem[..., -1].unbind(2), mem_from_mom[..., -1].unbind(2), mom_from_mom.unbind(2)
    kcs, vcs = kc.unbind(2), vc.unbind(2)
    Ms, Zs, As = [], [], []
    for n in range(N):  # inter-chunk state pass
        A = anchor if anchor is not None else M
        Ms.append(M), Zs.append(Z), As.append(A)
        err = error(kcs[n], A, vcs[n])                        # l2: e_j^T = k_j^T M_a - v_j^T, [C, V]
        M, Z = (end_mm[n][..., None, None] * M + end_mz[n][..., None, None] * Z - k_mem[n] @ err,
                end_zz[n][..., None, None] * Z - k_mom[n] @ err)
    last_start = Ms[-1]
    Ms, Zs, As = (torch.stack(x, dim=2) for x in (Ms, Zs, As))
    err = error(kc, As, vc)                                   # [B, H, N, C, V]
    qs = qc * scale
    if read_anchor:
        o = qs @ As
    else:
        o = (qs * mem_from_mem.unsqueeze(-1)) @ Ms + (qs * mem_from_mom.unsqueeze(-1)) @ Zs \
            - ((qs @ kc.transpose(-1, -2)) * mem_grad) @ err
    return from_chunks(o, T), M, Z, last_start
