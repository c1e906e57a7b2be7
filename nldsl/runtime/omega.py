r"""The Omega rule: a linear memory that takes its gradient over a sliding window of tokens.

Nested Learning Eq. 68 as corrected in paper-equations.md (section 10, Atlas Eq. 9-11: the
gradient is taken at ``M_{t-1}``, which the printed Eq. 68 drops), for a linear memory and the
L2 objective ``1/2 ||M k - v||^2``:

    M_t = alpha_t M_{t-1} - sum_{i=t-c+1}^{t} gamma_i grad L(M_{t-1}; k_i, v_i)
        = M_{t-1} (alpha_t I - sum_i gamma_i k_i k_i^T) + sum_i gamma_i v_i k_i^T

With the state stored transposed as flash-linear-attention does, ``S = M^T`` (``[K, V]``):

    S_t = (alpha_t I - sum_{i in W_t} gamma_i k_i k_i^T) S_{t-1} + sum_{i in W_t} gamma_i k_i v_i^T
    o_t = scale * S_t^T q_t                  (read after the write)

``read="anchor"`` reads before the write instead, ``o_t = scale * S_{t-1}^T q_t`` (nldsl's anchor
read at period 1, as in :func:`nldsl.runtime.linear_attention`); the state is the same.

``W_t`` is the window of the last ``c = window`` tokens, ``t`` included. Conventions chosen:

* ``gamma`` is a per-token weight ``[B, T, H]`` (it acts as the learning rate of token i in every
  window that holds i); Atlas' more general ``gamma_{t,i}`` (a weight per (step, token) pair) is
  not supported. ``alpha`` is the retention (keep) factor, ``[B, T, H]``.
* At the start of a stream the window holds fewer tokens (the missing ones weigh 0).
* ``window = 1`` is the delta rule with the erase on the undecayed state,
  ``S_t = alpha_t S_{t-1} - gamma_t k_t (k_t^T S_{t-1} - v_t^T)``; a window spanning the whole
  context with ``alpha = 1`` is gradient descent on the global least-squares objective.

Objective ``"dot"`` (``-<M k, v>``, the Hebbian one): its gradient ``-v k^T`` does not depend on
the state, so the window only repeats each token's write, ``c`` times at most:

    S_t = alpha_t S_{t-1} + sum_{i in W_t} gamma_i k_i v_i^T

State: ``final_state`` is an :class:`OmegaState`: the memory plus the last ``window - 1`` keys,
values and gammas (the window's cache), so a continued stream is exact.

Implementations (``impl=``):

* ``"reference"``: token by token, plain torch.
* ``"chunked"``: exact chunkwise form. Each step's window is unfolded into ``c`` "virtual
  tokens" whose gradients are all taken at ``S_{t-1}``; per chunk the ``C * c`` virtual tokens
  solve one unit lower-triangular system (see :mod:`nldsl.runtime._erase`). ``chunk_size`` is a
  compute tile only (results do not depend on it), counted in virtual tokens: a tile holds
  ``max(chunk_size // window, 1)`` steps, so each system is at most ``chunk_size`` square.
  On the dot objective the rule is linear in the writes: the window is ``c`` chunked linear
  attentions, the j-th writing token ``t - j`` at step ``t``, whose outputs and states add up.
"""
from __future__ import annotations

from typing import NamedTuple

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
    to_chunks,
)
from nldsl.runtime._erase import erase_chunks
from nldsl.runtime.linear_attention import linear_attention

__all__ = ["omega_rule", "OmegaState"]

_OP = "omega_rule"


class OmegaState(NamedTuple):
    """memory ``S`` ``[B, H, K, V]``; keys ``[B, c-1, H, K]``, values ``[B, c-1, H, V]``, gammas
    ``[B, c-1, H]``: the previous ``window - 1`` tokens (oldest first; zero weight where the
    stream had not yet produced them)."""

    memory: Tensor
    keys: Tensor
    values: Tensor
    gammas: Tensor


def omega_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gamma: Tensor | float,
    alpha: Tensor | float,
    *,
    window: int,
    scale: float | None = None,
    initial_state: Tensor | OmegaState | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
    objective: str = "l2",
    read: str = "running",
) -> MemoryOutput:
    """Omega rule, ``S_t = alpha_t S_{t-1} - sum_{i=t-c+1}^t gamma_i k_i (k_i^T S_{t-1} - v_i^T)``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        gamma: per-token step size ``[B, T, H]`` (or a number). alpha: retention ``[B, T, H]``.
        window: ``c >= 1``, tokens per gradient window.
        scale: query scale, default ``K ** -0.5``.
        initial_state: None, ``S_0`` ``[B, H, K, V]`` (empty window), or an :class:`OmegaState`.
        output_final_state: return an :class:`OmegaState`.
        impl: ``"reference"`` or ``"chunked"``; chunk_size: the chunked path's tile.
        objective: ``"l2"`` (above) or ``"dot"`` (``S_t = alpha_t S_{t-1} + sum_i gamma_i k_i v_i^T``).
        read: ``"running"`` (``o_t`` reads ``S_t``) or ``"anchor"`` (``S_{t-1}``, before the write).
    """
    B, T, H, K, V = check_qkv(_OP, q, k, v)
    gamma = check_gate(_OP, "gamma", gamma, B, T, H, q)
    alpha = check_gate(_OP, "alpha", alpha, B, T, H, q)
    c = check_chunk_size(_OP, window, "window")
    chunk_size = check_chunk_size(_OP, chunk_size)
    scale = resolve_scale(_OP, scale, K)
    if objective not in ("l2", "dot"):
        raise ValueError(f"{_OP}: objective must be 'l2' or 'dot', got {objective!r}")
    check_read(_OP, read)
    fn = dispatch(_OP, impl, {"reference": _reference, "chunked": _chunked})
    if isinstance(initial_state, OmegaState):
        check_state(_OP, "initial_state.memory", initial_state.memory, (B, H, K, V), q)
        check_state(_OP, "initial_state.keys", initial_state.keys, (B, c - 1, H, K), q)
        check_state(_OP, "initial_state.values", initial_state.values, (B, c - 1, H, V), q)
        check_state(_OP, "initial_state.gammas", initial_state.gammas, (B, c - 1, H), q)
        tensors = tuple(initial_state)
    elif initial_state is None or isinstance(initial_state, Tensor):
        if initial_state is not None:
            check_state(_OP, "initial_state", initial_state, (B, H, K, V), q)
        tensors = (initial_state,)
    else:
        raise TypeError(f"{_OP}: initial_state must be None, a [B, H, K, V] tensor or an OmegaState")
    dt = compute_dtype(q, k, v, gamma, alpha, *tensors)
    if isinstance(initial_state, OmegaState):
        state = OmegaState(*(x.to(dt) for x in tensors))
    else:
        S0 = q.new_zeros((B, H, K, V), dtype=dt) if initial_state is None else initial_state.to(dt)
        state = OmegaState(S0, q.new_zeros((B, c - 1, H, K), dtype=dt),
                           q.new_zeros((B, c - 1, H, V), dtype=dt), q.new_zeros((B, c - 1, H), dtype=dt))
    # The window's tokens: the cached c-1 before this call, then this call's (ext coordinates).
    k_ext = torch.cat([state.keys, k.to(dt)], dim=1)
    v_ext = torch.cat([state.values, v.to(dt)], dim=1)
    g_ext = torch.cat([state.gammas, gamma.to(dt)], dim=1)
    o, S = fn(q.to(dt), k_ext, v_ext, g_ext, alpha.to(dt), scale, state.memory, dt, c, chunk_size,
              l2=objective == "l2", before=read == "anchor")
    final = OmegaState(S, k_ext[:, T:], v_ext[:, T:], g_ext[:, T:])  # the last c-1 tokens
    return MemoryOutput(o.to(q.dtype), final if output_final_state else None)


def _reference(q, k_ext, v_ext, g_ext, alpha, scale, S, dt, c, chunk_size, l2, before):
    outs = []
    for t in range(q.shape[1]):
        if before:  # the read before the token's write
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
        kw, vw, gw = k_ext[:, t:t + c], v_ext[:, t:t + c], g_ext[:, t:t + c]  # window of step t
        # the objective's gradient at the output: k_i^T S - v_i^T (l2) or -v_i^T (dot)
        err = torch.einsum("bwhk,bhkv->bwhv", kw, S) - vw if l2 else -vw
        grad = torch.einsum("bwh,bwhk,bwhv->bhkv", gw, kw, err)                # sum_i gamma_i k_i err_i
        S = alpha[:, t, :, None, None] * S - grad
        if not before:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1), S


def _windows(x_ext: Tensor, c: int) -> Tensor:
    """``[B, T+c-1, H, *D]`` -> ``[B, T, H, c, *D]``: step t's window, oldest token first."""
    w = x_ext.unfold(1, c, 1)                        # [B, T, H, *D, c]
    return w.movedim(-1, 3) if x_ext.dim() > 3 else w


def _chunked(q, k_ext, v_ext, g_ext, alpha, scale, S, dt, c, C, l2, before):
    if not l2:
        return _chunked_dot(q, k_ext, v_ext, g_ext, alpha, scale, S, dt, c, C, before)
    T = q.shape[1]
    # chunk_size counts virtual tokens: C // c steps per tile keeps each triangular system at
    # most chunk_size x chunk_size whatever the window.
    C = min(max(C // c, 1), T)
    # Padded steps: alpha = 1 and zero-weight windows, so they leave the state unchanged.
    qc = to_chunks(q, C, dt)
    kv = to_chunks(_windows(k_ext, c), C, dt)        # [B, H, N, C, c, K]
    vv = to_chunks(_windows(v_ext, c), C, dt)
    gv = to_chunks(_windows(g_ext, c), C, dt)        # [B, H, N, C, c]
    ac = 1 - to_chunks((1 - alpha).unsqueeze(-1), C, dt).squeeze(-1)
    o, S, _ = erase_chunks(qc, kv, vv, gv, ac, S, scale, read="before" if before else "running")
    return from_chunks(o, T), S


def _chunked_dot(q, k_ext, v_ext, g_ext, alpha, scale, S, dt, c, C, before):
    # S_t = alpha_t S_{t-1} + sum_j gamma_{t-j} k_{t-j} v_{t-j}^T: the sum over j of c linear
    # attentions with the same retention, the j-th writing token t - j (ext index c-1+t-j)
    T = q.shape[1]
    log_alpha = alpha.clamp_min(torch.finfo(dt).tiny).log()  # retention 0 -> the smallest normal float
    o = S_end = 0
    for j in range(c):
        sl = slice(c - 1 - j, c - 1 - j + T)
        out = linear_attention(q, k_ext[:, sl], v_ext[:, sl] * g_ext[:, sl, :, None], g=log_alpha, scale=scale,
                               initial_state=S if j == 0 else None, output_final_state=True, impl="chunked",
                               chunk_size=C, read="anchor" if before else "running")
        o, S_end = o + out.o, S_end + out.final_state
    return o, S_end
