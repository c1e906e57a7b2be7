r"""Delta Gradient Descent (DGD) with retention for a matrix memory, as Hope uses it.

The Nested Learning paper derives DGD (Eq. 56-57) as the proximal step on an L2 regression
that "incorporates the previous state of weights", giving a data-dependent erase along the
current key, and Hope's memories use it with weight decay (Eq. 88) and, chunk-wise, with the
gradient taken at the last state of the previous chunk (Eq. 90, 93). For a linear memory
``M`` (``[V, K]``, ``M(k) = M k``) and the L2 objective ``1/2 ||M k - v||^2``, Eq. 93 reads

    M_t = M_{t-1} (alpha_t I - eta_t k_t k_t^T) - eta_t (M_{a(t)} k_t - v_t) k_t^T

which is the convention implemented here. Stored transposed as flash-linear-attention does,
``S = M^T`` (``[K, V]``):

    S_t = (alpha_t I - eta_t k_t k_t^T) S_{t-1} - eta_t k_t (k_t^T S_{a(t)} - v_t^T)
    o_t = scale * S_t^T q_t                     (read="running", the fla convention)
    o_t = scale * S_{a(t)}^T q_t                (read="anchor", NL Eq. 86/90's read)

Conventions chosen for the paper's ambiguities (paper-equations.md section 12, items 4, 5,
10, 16):

* ``alpha_t`` is the retention (keep) factor, ``eta_t`` the step size, both ``[B, T, H]``;
  ``eta`` enters the erase as printed in Eq. 88/93 (not the ``eta' = eta/(1+eta)`` of Eq. 57).
* The anchor ``a(t)`` is the state at the start of t's chunk (the *previous* chunk's end, as the
  paper's prose says; its printed index ``C * ceil(t/C)`` would point into the future). Chunks
  are ``chunk_size`` consecutive tokens from the start of the stream; the erase factor always
  acts on the running state ``S_{t-1}``.
* With ``chunk_size = 1`` (``a(t) = t-1``) the rule is the exact per-token
  ``S_t = (alpha_t I - 2 eta_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T``: the L2 gradient carries its
  own erase, so the total erase along a unit key is ``alpha - 2 eta`` (stable for
  ``eta <= alpha / 2``), a point the paper does not discuss.
* The exact proximal step of Eq. 56 (closed form ``S_t = S_{t-1} - eta' k (k^T S_{t-1} - v^T)``
  with ``eta' = eta / (1 + eta ||k||^2)``) is the delta rule: use
  :func:`nldsl.runtime.delta_rule` with ``beta = eta'`` for it.

Objective ``"dot"`` (``-<M k, v>``, the Hebbian one): its gradient ``-v k^T`` needs no anchor, so
``S_t = (alpha_t I - eta_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T`` at any chunk size (the erase of
DGD on a Hebbian write); the chunk size then only places the anchor reads.

State: ``final_state`` is a :class:`DGDState` (memory, anchor, offset inside the chunk); pass it
back to continue the stream exactly, also mid-chunk. A plain ``[B, H, K, V]`` tensor means
``S_0`` at a chunk start.

Implementations (``impl=``; both take the same ``chunk_size``, which is part of the maths):

* ``"reference"``: token by token, plain torch.
* ``"triton"``: the generated Triton kernels (:mod:`nldsl.codegen.kernels`): the same chunkwise
  form with every anchor period inside one 64-token chunk (so ``chunk_size`` is a power of two up
  to 64), the retention taken in log space.
* ``"chunked"``: the UT-transform engine of :mod:`nldsl.runtime._erase` over the chunk grid
  (head finishing an earlier chunk | whole chunks | tail). With ``chunk_size = 1`` the
  per-token rule above is run with 64-token compute tiles (same engine, ``gamma = 2 eta``,
  ``v / 2``), so the exact rule is fast too.
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

__all__ = ["dgd", "DGDState"]

_OP = "dgd"
_PER_TOKEN_TILE = 64  # compute tile for chunk_size=1 (an implementation detail)


class DGDState(NamedTuple):
    """memory ``S`` ``[B, H, K, V]``; anchor: the state the current chunk's gradients are taken
    at; offset: tokens of the current chunk already consumed (0 = at a chunk start)."""

    memory: Tensor
    anchor: Tensor
    offset: int


def dgd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor | float,
    alpha: Tensor | float,
    *,
    scale: float | None = None,
    initial_state: Tensor | DGDState | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
    read: str = "running",
    objective: str = "l2",
) -> MemoryOutput:
    """DGD with retention: ``S_t = (alpha_t I - eta_t k k^T) S_{t-1} - eta_t k (k^T S_a - v^T)``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        eta: step size ``[B, T, H]`` (or a number). alpha: retention ``[B, T, H]`` (or a number).
        scale: query scale, default ``K ** -0.5``.
        initial_state: None, ``S_0`` ``[B, H, K, V]``, or a :class:`DGDState`.
        output_final_state: return a :class:`DGDState`.
        impl: ``"reference"``, ``"chunked"`` or ``"triton"`` (the generated kernels; CUDA tensors
            or ``TRITON_INTERPRET=1``; chunk_size a power of two up to 64).
        chunk_size: the anchor period (part of the semantics); 1 = exact per-token DGD.
        read: ``"running"`` or ``"anchor"`` (see the module docstring).
        objective: ``"l2"`` (above) or ``"dot"`` (the gradient term ``+ eta_t k v^T``, no anchor in
            it; ``"reference"`` and ``"chunked"`` only).
    """
    B, T, H, K, V = check_qkv(_OP, q, k, v)
    eta = check_gate(_OP, "eta", eta, B, T, H, q)
    alpha = check_gate(_OP, "alpha", alpha, B, T, H, q)
    C = check_chunk_size(_OP, chunk_size)
    check_read(_OP, read)
    if objective not in ("l2", "dot"):
        raise ValueError(f"{_OP}: objective must be 'l2' or 'dot', got {objective!r}")
    if objective == "dot" and impl == "triton":
        raise ValueError(f"{_OP}: the Triton kernels take the l2 objective; use impl='chunked' for 'dot'")
    scale = resolve_scale(_OP, scale, K)
    fn = dispatch(_OP, impl, {"reference": _reference, "chunked": _chunked, "triton": _triton})
    shape = (B, H, K, V)
    if isinstance(initial_state, DGDState):
        check_state(_OP, "initial_state.memory", initial_state.memory, shape, q)
        check_state(_OP, "initial_state.anchor", initial_state.anchor, shape, q)
        off = initial_state.offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < C:
            raise ValueError(
                f"{_OP}: initial_state.offset must be an int in [0, chunk_size={C}), got {off!r} "
                "(was the state produced with another chunk_size?)"
            )
        tensors = (initial_state.memory, initial_state.anchor)
    elif initial_state is None or isinstance(initial_state, Tensor):
        if initial_state is not None:
            check_state(_OP, "initial_state", initial_state, shape, q)
        tensors, off = (initial_state,), 0
    else:
        raise TypeError(f"{_OP}: initial_state must be None, a [B, H, K, V] tensor or a DGDState")
    dt = compute_dtype(q, k, v, eta, alpha, *tensors)
    if isinstance(initial_state, DGDState):
        S0, A0 = (x.to(dt) for x in tensors)
    else:
        S0 = q.new_zeros(shape, dtype=dt) if initial_state is None else initial_state.to(dt)
        A0 = S0
    o, state = fn(q, k, v, eta.to(dt), alpha.to(dt), scale, DGDState(S0, A0, off), dt, C, read, objective == "l2")
    return MemoryOutput(o.to(q.dtype), state if output_final_state else None)


def _reference(q, k, v, eta, alpha, scale, state, dt, C, read, l2):
    q, k, v = (x.to(dt) for x in (q, k, v))
    S, A, off = state
    outs = []
    for t in range(q.shape[1]):
        if off == 0:
            A = S                                                   # a new chunk: re-anchor
        kt, et, at = k[:, t], eta[:, t, :, None, None], alpha[:, t, :, None, None]
        erase = kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]  # k k^T S
        err = torch.einsum("bhk,bhkv->bhv", kt, A) - v[:, t] if l2 else -v[:, t]  # k^T S_a - v^T (l2)
        S = at * S - et * erase - et * kt[..., :, None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, A if read == "anchor" else S))
        off = (off + 1) % C
    return torch.stack(outs, dim=1), DGDState(S, A if off else S, off)


def _pieces(q, k, v, eta, alpha, dt, C):
    """Chunk [B, T, H, ...] inputs for the engine: keys/values as c=1 virtual tokens; padded
    steps (only the per-token path pads) get alpha = 1 and eta = 0, exact no-ops."""
    qc, kc, vc = (to_chunks(x, C, dt) for x in (q, k, v))
    ec = to_chunks(eta.unsqueeze(-1), C, dt)                     # [B, H, N, C, 1]
    ac = 1 - to_chunks((1 - alpha).unsqueeze(-1), C, dt).squeeze(-1)  # pads with alpha = 1
    return qc, kc.unsqueeze(-2), vc.unsqueeze(-2), ec, ac


def _triton(q, k, v, eta, alpha, scale, state, dt, C, read, l2):
    from nldsl.runtime._triton import runtime_kernel

    kernel = runtime_kernel(_OP, "dgd", lr="tensor", decay="tensor", head_k=k.shape[-1], head_v=v.shape[-1],
                            chunk_size=C, period=C, read=read)
    # the kernels take the retention in log space (alpha = 0 becomes the smallest normal float)
    log_alpha = alpha.clamp_min(torch.finfo(alpha.dtype).tiny).log()
    return kernel(q, k, v, eta, log_alpha, scale=scale, initial_state=state, output_final_state=True)


def _chunked(q, k, v, eta, alpha, scale, state, dt, C, read, l2):
    T = q.shape[1]
    S, A, off = state
    if C == 1:
        # Exact per-token DGD = erase engine with gamma = 2 eta and values v / 2 (no anchor term):
        # eta k v^T - 2 eta k k^T S = (2 eta) k (v/2 - S^T k)^T. On the dot objective the erase
        # is the only state term: gamma = eta and the values as they are.
        qc, kc, vc, ec, ac = _pieces(q, k, v, eta, alpha, dt, min(_PER_TOKEN_TILE, T))
        o, S, _ = erase_chunks(qc, kc, vc / 2 if l2 else vc, 2 * ec if l2 else ec, ac, S, scale,
                               read="before" if read == "anchor" else "running")
        return from_chunks(o, T), DGDState(S, S, 0)
    head = min((C - off) % C, T)
    body = (T - head) // C * C
    tail = T - head - body
    outs, tail_start = [], None
    for start, length, size in ((0, head, head), (head, body, C), (head + body, tail, tail)):
        if length == 0:
            continue
        sl = slice(start, start + length)
        anchor = A if start == 0 and off > 0 else None  # only the head continues a chunk
        qc, kc, vc, ec, ac = _pieces(q[:, sl], k[:, sl], v[:, sl], eta[:, sl], alpha[:, sl], dt, size)
        o, S, tail_start = erase_chunks(qc, kc, vc, ec, ac, S, scale, anchor_term=l2, anchor=anchor, read=read)
        outs.append(from_chunks(o, length))
    off_new = (off + T) % C
    if off_new == 0:
        A = S
    elif tail:
        A = tail_start
    return torch.cat(outs, dim=1), DGDState(S, A, off_new)
