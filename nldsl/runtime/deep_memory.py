r"""Deep (MLP) associative memories trained in context by gradient steps (Titans / NL section 6).

One memory per head: a small MLP on ``D``-dimensional vectors,

    M(x) = x + W_L act( ... act(W_2 act(W_1 x)) ... )        (residual=True; depth L >= 1)

with the weights given **in application order**: ``params[0]`` is the input-side matrix
(``[d_1, K]``; the paper's ``W_2`` in Eq. 89 ``M(x) = x + W_1 s(W_2 x)``), ``params[-1]`` the
output-side one (``[V, d_{L-1}]``, the paper's ``W_1``). No biases (Eq. 89 has none). ``residual``
needs ``K == V``. Activations: gelu (exact erf), silu, relu, tanh, identity.

Objective on a pair (k_t, v_t), per token (``objective=``):

* ``"l2"``:  ``1/2 ||M(k_t) - v_t||^2``   (gradient at the output ``M(k_t) - v_t``; the 1/2 is the
  convention of Eq. 93 and of :func:`nldsl.runtime.dgd`, so a depth-1 non-residual memory with
  ``rule="dgd"`` is exactly that op's matrix memory)
* ``"dot"``: ``-<M(k_t), v_t>``           (gradient at the output ``-v_t``; the Hebbian memory of
  Eq. 64; with ``v = -delta`` this is the local-surprise objective ``<M(k), delta>`` of section 3)
* ``"l1"``, ``"lp"`` (``1/p ||M(k_t) - v_t||_p^p``, exponent ``p``), ``"huber"`` (threshold
  ``delta``): the robust objectives of the Miras family (section 5; Moneta, Yaad), gradient at the
  output ``sign(r)``, ``|r|^(p-1) sign(r)``, ``clamp(r, -delta, delta)`` for ``r = M(k_t) - v_t``
  (:func:`mlp_memory` only; their writes are composed from torch ops, the fused write and the
  Triton kernel take l2 and dot)

Signal (``signal=``): ``"values"``: the target is ``v_t`` as given; ``"self"``: the memory
generates its own target ``v^_t = M_a(v_t)`` from the anchor state (NL Eq. 87; v must then have
the input dim K). The inner gradient treats the target as a constant; the outer gradient flows
through it (unless ``detach``).

Update per token t (all per sequence and head; ``g_{i,t} = grad_{W_i} L(M_a; k_t, v_t)`` is taken
at the **anchor** state ``M_a``, the state at the start of t's chunk):

    u_{i,t} = -eta_t g_{i,t}                            (a rank-1 matrix: -eta_t e_{i,t} a_{i,t}^T)
    R_{i,t} = u_{i,t}                                   (no momentum)
    R_{i,t} = S_{i,t} = beta_t S_{i,t-1} + u_{i,t}      (momentum: Titans Eq. 9-10, NL signs)
    rule="gd":  W_{i,t} = alpha_t W_{i,t-1} + R_{i,t}
    rule="dgd": W_{1,t} = W_{1,t-1} (alpha_t I - eta_t k_t k_t^T) + R_{1,t}     (input-side matrix)
                W_{i,t} = alpha_t W_{i,t-1} + R_{i,t}                          (i > 1)
    rule="omega": as gd with u_{i,t} = -sum_{s=t-c+1}^{t} eta_s g_{i,s}         (NL Eq. 68, Atlas)
    precondition: S_{i,t} = beta_t S_{i,t-1} - g_{i,t},  W_{i,t} = alpha_t W_{i,t-1} + eta_t NS(S_{i,t})
                (Newton-Schulz, Muon as the inner optimizer: Atlas Eq. 32-33; with rule omega
                g_{i,t} sums the window's gradients; see :mod:`nldsl.runtime._preconditioned`)

With the Omega rule each step's gradient is summed over the window of the last ``c = window``
tokens, every one taken at t's anchor (the window's tokens before t's chunk too, as Atlas takes
them all at ``M_{t-1}``), ``eta_s`` the weight of token s in every window that holds it, as in
:func:`nldsl.runtime.omega_rule`; at the start of a stream the window holds fewer tokens.

``alpha`` is the retention (keep) factor (None = 1, no decay), ``beta_momentum`` the momentum
decay (None = no momentum buffer at all). The DGD erase multiplies the *running* state
``W_{t-1}`` (as printed in Eq. 90) while the gradient uses the anchor; it acts on the input-side
matrix because that is the only one whose input is ``k_t`` (paper-equations.md section 12 item 4,
the choice of specs/hope.nl). With ``chunk_size=1`` everything is the exact per-token recurrence.

Chunks and reads. Tokens are grouped in chunks of ``chunk_size`` consecutive tokens from the start
of the stream. ``read="anchor"``: token t reads ``o_t = M_a(scale q_t)`` (read-before-write; with
C=1 this is ``M_{t-1}``, NL Eq. 86/90). ``read="running"``: token t reads the state after its own
write, ``M_t`` (the anchor plus the writes of the tokens of its chunk up to t: Titans' mini-batch
dual form; with C=1, ``M_t``). ``scale`` defaults to 1 (an MLP memory is nonlinear, so the
``K ** -0.5`` query scaling of the linear ops is not a neutral default).

State (:class:`DeepMemoryState`): the current weights, the anchor weights, the momentum buffers
and the offset inside the current chunk, all batched per sequence ``[B, H, d_out, d_in]`` (never
shared across the batch, never Parameters). A partial chunk at the end of a call is carried
(anchor + offset), so splitting a stream anywhere and passing the state back is exactly one pass.

Differentiability. By default writes are differentiable: outer gradients flow through every
inner update into the initial weights (meta-learned ``params``), k, v, eta, alpha, beta and q
(second order through the inner gradients). ``detach=True`` makes the writes constants for
autograd ("meta + delta", first order): the read weights are ``W_base + (W_t - W_base).detach()``,
so outer gradients reach q and, straight through, the call's starting weights, but nothing flows
through any write (k, v, eta, alpha, beta get no gradient). Pass ``params.detach()`` to block
the initial weights as well.

Implementations (``impl=``):

* ``"reference"``: an explicit token loop; the inner gradients come from ``torch.func.grad`` of the
  per-token loss (independent of the closed-form backward the chunked path uses).
* ``"chunked"`` (default): a Python loop over chunks only. Per chunk, the gradients of all C
  tokens at the anchor come from a closed-form backward of the MLP batched over
  batch x heads x tokens. Each per-token gradient of a layer is rank-1 (``e a^T``), so momentum and
  retention become scalar coefficient matrices over the chunk (products of gates via
  :func:`segment_products`: ``W_t = A_t W_0 + m_t S_0 + sum_j c[t, j] u_j``), and the DGD erase is
  solved for the whole chunk by a unit lower-triangular system (the UT transform of the delta
  rule, see below). Running reads never build a weight per token: ``W_t z = A_t W_0 z + m_t S_0 z
  + sum_j c[t, j] (a_j . z) (-eta_j e_j) (+ DGD term)``, i.e. masked ``[C, C]`` matmuls. For a
  layer ``[d_out, d_in]`` and chunk C this keeps ``C (C + d_out + d_in)`` numbers per head instead
  of the ``C d_out d_in`` of a weight copy per token (d=32, hidden 128, C=64: ~15k vs ~262k floats
  per head and layer, 18x less; and nothing is stored per token for the end-of-chunk state).
  Only the anchor weights of each chunk are kept (autograd needs them for the backward). The
  Omega rule takes the gradients of the ``c - 1`` tokens before the piece at its anchor too, and
  multiplies the coefficients by the window's band ``[j <= s <= j + c - 1]``. For
  two-layer memories (every shipped spec's) a piece's writes, its gate coefficients and its
  running read are one autograd function each, their backward written out
  (:mod:`nldsl.runtime._mlp_write`, :mod:`nldsl.runtime._running_read`); other depths compose
  the same maths from torch ops.
* ``"triton"``: ``"chunked"`` with each chunk's gradients (forward, output error, both layers'
  errors) from one fused Triton kernel (:class:`nldsl.runtime._triton.MlpKernel`; two-layer
  MLPs; docs/kernels.md). Its backward is the closed form above, differentiated by autograd.

DGD inside a chunk. Write ``X`` for the input-side matrix, chunk start ``X_0`` (the running state
the chunk enters with), ``P[t, j] = prod_{l=j+1}^t alpha_l``. Since
``X_t = alpha_t X_{t-1} + h_t k_t^T + R_t`` with ``h_t = -eta_t X_{t-1} k_t``, unrolling gives
``X_t = P[t,0] X_0 + m_t S_0 + sum_{j<=t} (c[t,j] u_j + P[t,j] h_j k_j^T)``; the ``h_j`` solve

    (I + diag(eta) (P[t-1, j] k_t . k_j)_{j<t}) h
        = -diag(eta) (P[t-1, 0] K X_0^T + m_{t-1} K S_0^T + (c[t-1, j] k_t . k_j)_{j<t} U)

with ``U = (-eta_j e_j)_j``: one batched triangular solve per chunk.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nldsl.runtime._activations import (
    ACTIVATIONS,
    activation,
    activation_grad,
    hidden,
    hidden_act,
    hidden_backward,
)
from nldsl.runtime._common import (
    MemoryOutput,
    check_chunk_size,
    check_kernel_objective,
    check_objective,
    check_read,
    check_state,
    compute_dtype,
    dispatch,
    objective_loss,
    output_error,
    segment_products,
    ut_apply,
)
from nldsl.runtime._mlp_write import end_state, mlp_write, per_row
from nldsl.runtime._preconditioned import orthogonalize_batch, preconditioned_step
from nldsl.runtime._running_read import running_read

__all__ = [
    "ACTIVATIONS",
    "DeepMemoryState",
    "mlp_memory",
    "mlp_apply",
    "activation",
    "activation_grad",
    "hidden",
    "hidden_act",
    "hidden_backward",
]

_OP = "mlp_memory"


class DeepMemoryState(NamedTuple):
    """The carried state of :func:`mlp_memory` (all tensors ``[B, H, d_out, d_in]`` per layer).

    weights: the current (running) weights; anchor: the weights the current chunk's gradients
    are taken at (== weights when ``offset == 0``); momentum: the momentum buffers (None when
    the op runs without momentum); offset: tokens of the current chunk already consumed; window:
    with the Omega rule, the last ``window - 1`` tokens' keys ``[B, c-1, H, K]``, values
    ``[B, c-1, H, V]`` and steps ``[B, c-1, H]`` (oldest first, zero before the stream's start),
    else None.
    """

    weights: tuple
    anchor: tuple
    momentum: Optional[tuple]
    offset: int
    window: Optional[tuple] = None


# --------------------------------------------------------------------------------------------
# the MLP (batched: weights [N, d_out, d_in], inputs [N, L, d_in])
# --------------------------------------------------------------------------------------------

def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; 3-D operands with one batch size go straight to ``torch.bmm`` (``torch.matmul``
    wraps them in expand / reshape ops, each a dispatch and an autograd node, which at a
    memory's sizes cost about as much as the product)."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


class _DecayWrite(torch.autograd.Function):
    """``A W + m M + left^T a``: a layer's state at the end of a piece (``A``, ``m`` per-row
    scalars; ``M`` optional). Forward: :func:`~nldsl.runtime._mlp_write.end_state`; backward: two
    products and per-row dot products, where autograd through the broadcasting products, the
    addcmul and the baddbmm issues about three times the ops, most of them weight-sized."""

    @staticmethod
    def forward(ctx, W, A, M, m, left, a):
        ctx.save_for_backward(W, A, M, m, left, a)
        return end_state(W, A, M, m, left, a)

    @staticmethod
    def backward(ctx, g):
        W, A, M, m, left, a = ctx.saved_tensors
        need = ctx.needs_input_grad

        def dot(x):  # per-row <g, x>, summed to the scalar's shape
            return (g * x).sum((-2, -1), keepdim=True)

        dW = (g * A).sum_to_size(W.shape) if need[0] else None
        dA = dot(W).sum_to_size(A.shape) if need[1] else None
        dM = (g * m).sum_to_size(M.shape) if M is not None and need[2] else None
        dm = dot(M).sum_to_size(m.shape) if M is not None and need[3] else None
        dleft = _bmm(a, g.transpose(-1, -2)) if need[4] else None
        da = _bmm(left, g) if need[5] else None
        return dW, dA, dM, dm, dleft, da


def decay_write(W: Tensor, A: Tensor, M: Optional[Tensor], m: Optional[Tensor], left: Tensor, a: Tensor) -> Tensor:
    """``A W + m M + left^T a`` (``[N, do, di]``; ``A``, ``m`` broadcast per row, ``left``
    ``[N, L, do]``, ``a`` ``[N, L, di]``), differentiable (see :class:`_DecayWrite`)."""
    return _DecayWrite.apply(W, A, M, m, left, a)


def _add_residual(y: Tensor, x: Tensor, residual) -> Tensor:
    """``y + x`` where ``residual`` is True, per row where it is a ``[N]`` 0/1 mask (memories of
    different kinds stacked along the batch axis)."""
    if isinstance(residual, Tensor):
        return y + residual.view(-1, *([1] * (x.dim() - 1))) * x
    return y + x if residual else y


def _times_transposed(a: Tensor, W: Tensor) -> Tensor:
    return _bmm(a, W.transpose(-1, -2))


def mlp_forward(ws: Sequence, x: Tensor, act: str, residual, product=_times_transposed, kept=None):
    """``(y, hidden pre-activations, per-layer inputs)`` of the MLP on ``x [N, L, d_in]``;
    ``residual``: a bool or a per-row ``[N]`` mask; ``product(a, W)``: a layer's ``a @ W^T``
    (a caller's own, for weights it reads in its own way). ``kept``: a function ``h -> (act(h),
    act'(h))`` for the hidden layers; the hidden entries are then the derivatives act'(h) (for
    :func:`mlp_backward` with ``kept=True``)."""
    hs, ins = [], []
    a = x
    y = x
    for i, W in enumerate(ws):
        ins.append(a)
        h = product(a, W)
        if i < len(ws) - 1:
            if kept is None:
                hs.append(h)
                a = hidden(h, act)
            else:
                a, d = kept(h)
                hs.append(d)
        else:
            y = h
    return _add_residual(y, x, residual), hs, ins


def mlp_apply(ws: Sequence[Tensor], x: Tensor, act: str = "gelu", residual: bool = True) -> Tensor:
    """``M(x)`` for weights ``[..., d_out, d_in]`` (application order) and ``x [..., L, d_in]``."""
    return mlp_forward(ws, x, act, residual)[0]


def mlp_backward(ws: Sequence[Tensor], hs: Sequence[Tensor], eps: Tensor, act: str,
                 kept: bool = False) -> list[Tensor]:
    """Errors ``e_i = dL/d(pre-activation of layer i)`` for an output gradient ``eps``; the weight
    gradient of layer i for one token is ``e_i a_i^T`` (``a_i`` = the layer's input). ``kept``:
    ``hs`` are the derivatives ``mlp_forward(kept=...)`` kept, not pre-activations."""
    n = len(ws)
    es: list = [None] * n
    d = eps
    es[n - 1] = d
    for i in range(n - 1, 0, -1):
        d = _bmm(d, ws[i])
        d = d * hs[i - 1] if kept else hidden_backward(d, hs[i - 1], act)
        es[i - 1] = d
    return es


# --------------------------------------------------------------------------------------------
# one chunk (or a piece of one) of writes and reads: the engine shared with self_modifying.py
# --------------------------------------------------------------------------------------------

def _lower_ones(L: int, like: Tensor) -> Tensor:
    return torch.ones(L + 1, L + 1, dtype=like.dtype, device=like.device).tril()


class PieceGates(NamedTuple):
    """The gate coefficients of a piece of L tokens (index 0 of Pa = the piece start, see
    :func:`segment_products`): ``Pa`` ``[.., L+1, L+1]``, ``Da[t, j] = P_a[t, j]``, ``A[t] =
    P_a[t, 0]``; with momentum ``Db``, ``Bv`` (beta's), ``c[t, j] = sum_l P_a[t, l] P_b[l, j]``
    (the weight of token j's step in W_t), ``m[t]`` (of the entering momentum S_0 in W_t);
    ``c_prev``, ``m_prev``: the same at t - 1."""

    Pa: Tensor
    Da: Tensor
    A: Tensor
    c: Tensor
    c_prev: Tensor
    Db: Optional[Tensor] = None
    Bv: Optional[Tensor] = None
    m: Optional[Tensor] = None
    m_prev: Optional[Tensor] = None


def piece_gates(alpha: Optional[Tensor], beta: Optional[Tensor], L: int, like: Tensor, *, momentum: bool) -> PieceGates:
    """:class:`PieceGates` from the retention ``alpha`` (None = 1) and momentum decay ``beta``
    (``[N, L]``)."""
    Pa = segment_products(alpha) if alpha is not None else _lower_ones(L, like)
    Da, A = Pa[..., 1:, 1:], Pa[..., 1:, 0]
    if not momentum:
        return PieceGates(Pa, Da, A, Da, Pa[..., :-1, 1:])
    Pb = segment_products(beta)
    Db, Bv = Pb[..., 1:, 1:], Pb[..., 1:, 0]
    Q = _bmm(Pa, Pb)
    m = _bmm(Da, Bv.unsqueeze(-1)).squeeze(-1)
    return PieceGates(Pa, Da, A, Q[..., 1:, 1:], Q[..., :-1, 1:], Db, Bv, m, F.pad(m[..., :-1], (1, 0)))


def window_band(L: int, c: int, like: Tensor) -> Tensor:
    """``[L, L + c - 1]``: 1 where token s (the piece's ``c - 1`` predecessors, then its L tokens)
    is in step j's window, ``j <= s <= j + c - 1``."""
    j = torch.arange(L, device=like.device)[:, None]
    s = torch.arange(L + c - 1, device=like.device)[None, :]
    return ((s >= j) & (s <= j + c - 1)).to(like.dtype)


def composed_write(ws, ms, anchor, k, v, eta, g: PieceGates, *, objective, signal, rule, act, residual, kernel,
                   p=None, delta=None, preceding=None):
    """The writes of a piece composed from torch ops (any depth; the Triton kernel's gradients):
    returns ``(ins, pairs, ws_end, ms_end)`` as :func:`chunk_step` uses them. ``preceding``: the
    Omega rule's ``(k, v, eta)`` of the ``c - 1`` tokens before the piece, whose gradients are taken
    at this anchor too; step j's write sums those of the tokens in its window."""
    Pa, Da, A, c, c_prev, Db, Bv, m, m_prev = g
    if preceding is not None:
        band = window_band(k.shape[1], preceding[0].shape[1] + 1, k)
        k, v, eta = (torch.cat([w, x], dim=1) for w, x in zip(preceding, (k, v, eta)))
        c, Db = c @ band, None if Db is None else Db @ band
    L = k.shape[1]
    # gradients of all L tokens at the anchor: per layer, the rank-1 factors e_j a_j^T
    if kernel is None:  # closed-form backward, batched
        if signal == "self":  # the target M_a(v) in the same products as M_a(k)
            y, hs, ins = mlp_forward(anchor, torch.cat([k, v], dim=1), act, residual)
            y, target = y.split(L, dim=1)
            hs, ins = [h.split(L, dim=1)[0] for h in hs], [k] + [a.split(L, dim=1)[0] for a in ins[1:]]
        else:
            y, hs, ins = mlp_forward(anchor, k, act, residual)
            target = v
        es = mlp_backward(anchor, hs, output_error(y, target, objective, p, delta), act)
    else:  # forward, output error and both layers' errors fused in the Triton kernel
        g = kernel(anchor, k, v, objective=objective, self_target=signal == "self", residual=residual)
        ins, es = [k, g.hidden], list(g.errors)
    neg_eta = -eta.unsqueeze(-1)
    Us = [neg_eta * e for e in es]                                 # u_j = U_j a_j^T

    pairs = []
    for i, a in enumerate(ins):
        pr = [(c, Us[i])]
        if rule == "dgd" and i == 0:
            KK = _bmm(a, a.transpose(-1, -2))                      # k_t . k_j
            # X_0 k_t: at a chunk start the running state is the anchor, whose products with k
            # the forward already took (the kernel path does not return them)
            reuse = kernel is None and len(hs) > 0 and ws[0] is anchor[0]
            Xk = hs[0] if reuse else _bmm(a, ws[0].transpose(-1, -2))
            rhs = Pa[..., :-1, 0].unsqueeze(-1) * Xk + _bmm(c_prev * KK, Us[0])
            if ms is not None:
                rhs = rhs + m_prev.unsqueeze(-1) * _bmm(a, ms[0].transpose(-1, -2))
            e_col = eta.unsqueeze(-1)
            h = ut_apply(e_col * (Pa[..., :-1, 1:] * KK), -e_col * rhs)
            pr.append((Da, h))
        pairs.append(pr)

    def coef_last(coef: Tensor) -> Tensor:
        return coef[..., -1, :].unsqueeze(-1)                      # [.., L, 1]

    # end-of-piece state: per layer A W_0 (+ m S_0) + (sum over pairs of coef * left)^T a, the
    # write terms of a layer share their right vectors, so one fused matmul-add takes them all
    ws_end, ms_end = [], None
    A_last = A[..., -1].unsqueeze(-1).unsqueeze(-1)
    for i, a in enumerate(ins):
        left = None
        for coef, lf in pairs[i]:
            t = coef_last(coef) * lf
            left = t if left is None else left + t
        m_last = None if ms is None else m[..., -1].unsqueeze(-1).unsqueeze(-1)
        ws_end.append(decay_write(ws[i], A_last, None if ms is None else ms[i], m_last, left, a))
    if ms is not None:
        B_last = Bv[..., -1].unsqueeze(-1).unsqueeze(-1)
        ms_end = [decay_write(ms[i], B_last, None, None, coef_last(Db) * Us[i], a) for i, a in enumerate(ins)]
    return ins, pairs, ws_end, ms_end


def chunk_step(
    ws: Sequence[Tensor],
    ms: Optional[Sequence[Tensor]],
    anchor: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    alpha: Optional[Tensor],
    beta: Optional[Tensor],
    q: Optional[Tensor],
    *,
    objective: str,
    signal: str,
    rule: str,
    act: str,
    residual,
    read: str,
    st: Optional[Sequence[Tensor]] = None,
    kernel=None,
    p: Optional[float] = None,
    delta: Optional[float] = None,
    preceding: Optional[tuple] = None,
    precondition: Optional[tuple] = None,
):
    """Run L <= C consecutive tokens that share one anchor.

    ws/ms: running weights/momentum entering the piece (``[N, do, di]``); anchor: the anchor
    weights; k ``[N, L, K]``, v ``[N, L, *]``, eta/alpha/beta ``[N, L]`` (alpha/beta may be None;
    the five may have N / G rows, shared by G groups of rows: see ``_mlp_write.per_row``), q
    ``[N, L, K]`` or None (no read). ``residual``: a bool or a per-row ``[N]`` mask. ``st``:
    straight-through terms added to the read weights (detach mode). ``kernel``: an
    :class:`~nldsl.runtime._triton.MlpKernel` that computes the gradients below in one launch
    (impl='triton'). ``p``, ``delta``: the lp / huber objective's parameter. ``preceding``: the
    Omega rule's ``(k, v, eta)`` of the ``c - 1`` tokens before the piece. ``precondition``:
    ``(steps, (a, b, c))``, steps orthogonalised by Newton-Schulz (:mod:`._preconditioned`; rule
    gd or omega). Returns ``(o or None, ws_end, ms_end)``.
    """
    fused = kernel is None and precondition is None and len(ws) == 2 and objective in ("l2", "dot") and \
        preceding is None
    if not fused or q is not None:  # only mlp_write reads inputs shared by groups of rows as they are
        k, v, eta, alpha, beta = (per_row(t, ws[0].shape[0]) for t in (k, v, eta, alpha, beta))
    if precondition is not None:
        return preconditioned_step(ws, ms, anchor, k, v, eta, alpha, beta, q, objective=objective, signal=signal,
                                   act=act, residual=residual, read=read, st=st, p=p, delta=delta,
                                   precondition=precondition, preceding=preceding)
    L = k.shape[1]
    running = q is not None and read == "running"
    # the writes. Per layer i the write terms of the piece are (coefficient [.., L, L], left
    # vectors [N, L, do]) pairs, all with right vectors ins[i]: a running read needs them.
    if fused:  # backward written out
        ws_end, ms_end, U1, U2, hs, Sk, rc = mlp_write(
            ws, ms, anchor, k, v, eta, alpha, beta if ms is not None else None, objective=objective, signal=signal,
            rule=rule, act=act, residual=residual, read=running)
        if running and st is None:  # the read as one function too
            return running_read(q, ws, ms, k, Sk, U1, U2, hs, rc, act=act, residual=residual), ws_end, ms_end
        ins = [k, Sk]
        if running:
            pairs = [[(rc.c, U1)] + ([(rc.Da, hs)] if hs is not None else []), [(rc.c, U2)]]
            A, m = rc.A, rc.m
    else:
        g = piece_gates(alpha, beta, L, k, momentum=ms is not None)
        ins, pairs, ws_end, ms_end = composed_write(ws, ms, anchor, k, v, eta, g, objective=objective,
                                                    signal=signal, rule=rule, act=act, residual=residual,
                                                    kernel=kernel, p=p, delta=delta, preceding=preceding)
        A, m = g.A, g.m

    # reads
    o = None
    if q is not None:
        if read == "anchor":
            rw = anchor if st is None else [w + z for w, z in zip(anchor, st)]
            o = mlp_forward(rw, q, act, residual)[0]
        else:
            z = q
            n = len(ins)
            for i, a in enumerate(ins):
                pre = A.unsqueeze(-1) * _bmm(z, ws[i].transpose(-1, -2))
                za = _bmm(z, a.transpose(-1, -2))                  # a_j . z_t   [N, L, L]
                for coef, left in pairs[i]:
                    pre = pre + _bmm(coef * za, left)
                if ms is not None:
                    pre = pre + m.unsqueeze(-1) * _bmm(z, ms[i].transpose(-1, -2))
                if st is not None:
                    pre = pre + _bmm(z, st[i].transpose(-1, -2))
                z = hidden(pre, act) if i < n - 1 else pre
            o = _add_residual(z, q, residual)
    return o, ws_end, ms_end


# --------------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------------

def _gate(name: str, x, B: int, T: int, H: int, like: Tensor) -> Tensor:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.full((B, T, H), float(x), dtype=like.dtype, device=like.device)
    if not isinstance(x, Tensor):
        raise TypeError(f"{_OP}: {name} must be a [B, T, H] tensor or a number, got {type(x).__name__}")
    if x.dim() == 4 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if tuple(x.shape) != (B, T, H):
        raise ValueError(f"{_OP}: {name} must have shape [B, T, H] = {(B, T, H)}, got {tuple(x.shape)}")
    return x


def check_layers(op: str, ws: Sequence[Tensor], d_in: int, d_out: int, residual: bool, lead: int):
    """Check a weight chain ``[..., d_1, d_in], ..., [..., d_out, d_{L-1}]`` with ``lead`` or
    ``lead + 1`` leading dims (shared or per batch)."""
    if not isinstance(ws, (list, tuple)) or len(ws) < 1:
        raise TypeError(f"{op}: params must be a non-empty sequence of weight tensors (application order)")
    prev = d_in
    for i, W in enumerate(ws):
        if not isinstance(W, Tensor) or W.dim() not in (lead + 2, lead + 3):
            raise ValueError(f"{op}: params[{i}] must be a tensor with {lead + 2} or {lead + 3} dims")
        if W.shape[-1] != prev:
            raise ValueError(
                f"{op}: params[{i}] has input dim {W.shape[-1]}, expected {prev} (weights are "
                "[d_out, d_in] in application order)"
            )
        prev = W.shape[-2]
    if prev != d_out:
        raise ValueError(f"{op}: the last layer has output dim {prev}, expected {d_out}")
    if residual and d_in != d_out:
        raise ValueError(f"{op}: residual=True needs input dim == output dim, got {d_in} and {d_out}")


def _check_precondition(precondition, rule: str, impl: str) -> tuple:
    """``(steps, (a, b, c))`` for a preconditioned memory, or a ValueError saying what is wrong."""
    try:
        steps, coefficients = precondition
        coefficients = tuple(float(x) for x in coefficients)
    except (TypeError, ValueError):
        raise ValueError(f"{_OP}: precondition must be (steps, (a, b, c)), got {precondition!r}") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or len(coefficients) != 3:
        raise ValueError(f"{_OP}: precondition must be (steps >= 0, (a, b, c)), got {precondition!r}")
    if rule not in ("gd", "omega"):
        raise ValueError(f"{_OP}: a preconditioned memory takes rule 'gd' or 'omega', not {rule!r}")
    if impl == "triton":
        raise ValueError(f"{_OP}: the Triton kernel computes plain steps; use impl='chunked' with precondition")
    return steps, coefficients


def _to_heads(W: Tensor, B: int, H: int, dt) -> Tensor:
    """[H, do, di] or [B, H, do, di] -> [B*H, do, di]."""
    W = W.to(dt)
    if W.dim() == 3:
        W = W.unsqueeze(0).expand(B, *W.shape)
    return W.reshape(B * H, W.shape[-2], W.shape[-1])


def _from_heads(W: Tensor, B: int, H: int) -> Tensor:
    return W.reshape(B, H, W.shape[-2], W.shape[-1])


def mlp_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta,
    alpha=None,
    beta_momentum=None,
    *,
    params: Optional[Sequence[Tensor]] = None,
    chunk_size: int,
    read: str = "anchor",
    objective: str = "l2",
    rule: str = "gd",
    window: int = 1,
    signal: str = "values",
    activation: str = "gelu",
    hidden_norm: str = "none",
    residual: bool = True,
    scale: float = 1.0,
    detach: bool = False,
    initial_state: Optional[DeepMemoryState] = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    kernel=None,
    p: Optional[float] = None,
    delta: Optional[float] = None,
    precondition: Optional[tuple] = None,
) -> MemoryOutput:
    """An MLP memory per head, written by in-context gradient steps (see the module docstring).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (``[B, T, H, K]`` with ``signal="self"``).
        eta: step size ``[B, T, H]`` or a number. alpha: retention ``[B, T, H]``, a number, or None
            (no decay). beta_momentum: momentum decay ``[B, T, H]``, a number, or None (no
            momentum). Gates that multiply (alpha, beta) may be 0 exactly.
        params: initial weights in application order, each ``[H, d_out, d_in]`` (shared by the
            batch, e.g. meta-learned Parameters) or ``[B, H, d_out, d_in]``. Required unless
            ``initial_state`` is given (which then takes precedence).
        chunk_size: C, the anchor period (part of the semantics).
        read: ``"anchor"`` or ``"running"``. objective: ``"l2"``, ``"dot"``, ``"l1"``, ``"lp"``
            (exponent ``p`` >= 1) or ``"huber"`` (threshold ``delta`` > 0, default 1). rule:
            ``"gd"``, ``"dgd"`` or ``"omega"`` (with ``window`` >= 1 tokens; 1 is gd). signal:
            ``"values"`` or ``"self"``.
        activation, residual: the MLP's. scale: multiplies q before the read (default 1).
        detach: writes are constants for autograd (first-order "meta + delta").
        initial_state: a :class:`DeepMemoryState` to continue a stream.
        output_final_state: return the :class:`DeepMemoryState`.
        impl: ``"chunked"`` (default), ``"reference"`` or ``"triton"``: the chunked path with each
            chunk's gradients from the fused Triton kernel (two-layer MLPs only; CUDA tensors, or
            CPU under ``TRITON_INTERPRET=1``).
        kernel: with ``impl="triton"``, the :class:`~nldsl.runtime._triton.MlpKernel` to run (a
            compiled spec's); None renders one for this call's configuration.
        precondition: ``(steps, (a, b, c))``: every layer steps by ``eta`` times the Newton-Schulz
            orthogonalisation of its momentum of raw gradients (Muon as the inner optimizer, Atlas;
            :mod:`nldsl.runtime._preconditioned`). Rule ``"gd"`` or ``"omega"`` (the window's
            gradients summed unweighted), ``impl`` chunked or reference.

    Returns:
        ``MemoryOutput(o [B, T, H, V] in q's dtype, final_state or None)``.
    """
    fn = dispatch(_OP, impl, {"chunked": _chunked, "reference": _reference, "triton": _chunked})
    if kernel is not None and impl != "triton":
        raise ValueError(f"{_OP}: kernel= is used with impl='triton' only (impl={impl!r})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be a [B, T, H, D] tensor")
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: q, k must be [B, T, H, K] and v [B, T, H, V] with the same B, T, H")
    C = check_chunk_size(_OP, chunk_size)
    check_read(_OP, read)
    check_objective(_OP, objective, p, delta)
    check_kernel_objective(_OP, impl, objective)
    if rule not in ("gd", "dgd", "omega"):
        raise ValueError(f"{_OP}: rule must be 'gd', 'dgd' or 'omega', got {rule!r}")
    c = check_chunk_size(_OP, window, "window")
    if c > 1 and rule != "omega":
        raise ValueError(f"{_OP}: window={c} is the Omega rule's; pass rule='omega'")
    if c > 1 and impl == "triton":
        raise ValueError(f"{_OP}: the Triton kernel takes one token a step; use impl='chunked' for the Omega rule")
    if signal not in ("values", "self"):
        raise ValueError(f"{_OP}: signal must be 'values' or 'self', got {signal!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if signal == "self" and v.shape[-1] != K:
        raise ValueError(f"{_OP}: signal='self' feeds v to the memory: v needs the key dim {K}")

    if initial_state is not None:
        if not isinstance(initial_state, DeepMemoryState):
            raise TypeError(f"{_OP}: initial_state must be a DeepMemoryState")
        off = initial_state.offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < C:
            raise ValueError(f"{_OP}: initial_state.offset must be an int in [0, {C}), got {off!r}")
        base = initial_state.weights
        if (initial_state.window is None) != (c == 1):
            raise ValueError(f"{_OP}: initial_state.window holds the Omega rule's last window - 1 tokens: "
                             + ("None without a window" if c == 1 else f"pass them with window={c}"))
        if c > 1:
            for name, t, shape in zip(("keys", "values", "steps"), initial_state.window,
                                      ((B, c - 1, H, K), (B, c - 1, H, v.shape[-1]), (B, c - 1, H))):
                check_state(_OP, f"initial_state.window {name}", t, shape, q)
    else:
        if params is None:
            raise ValueError(f"{_OP}: pass params (the initial weights) or initial_state")
        base = tuple(params)
        off = 0
    V = base[-1].shape[-2]
    check_layers(_OP, base, K, V, residual, 1)
    if V != v.shape[-1] and signal == "values":
        raise ValueError(f"{_OP}: the memory outputs {V} dims but v has {v.shape[-1]}")

    eta = _gate("eta", eta, B, T, H, q)
    alpha = None if alpha is None else _gate("alpha", alpha, B, T, H, q)
    beta = None if beta_momentum is None else _gate("beta_momentum", beta_momentum, B, T, H, q)
    dt = compute_dtype(q, k, v, eta, alpha, beta, *base)

    def seq(x):  # [B, T, H, *] -> [B*H, T, *]
        x = x.to(dt)
        return x.transpose(1, 2).reshape(B * H, x.shape[1], *x.shape[3:])

    ws = [_to_heads(W, B, H, dt) for W in base]
    if initial_state is not None:
        anchor = [_to_heads(W, B, H, dt) for W in initial_state.anchor]
        if beta is not None:
            ms = (
                [_to_heads(M, B, H, dt) for M in initial_state.momentum]
                if initial_state.momentum is not None
                else [torch.zeros_like(W) for W in ws]
            )
        else:
            ms = None
    else:
        anchor = list(ws)
        ms = [torch.zeros_like(W) for W in ws] if beta is not None else None

    qs, ks, vs, es = seq(q) * scale, seq(k), seq(v), seq(eta)
    cache = None  # the Omega rule's tokens before the call: (k, v, eta) [N, c - 1, *]
    if c > 1:
        if initial_state is not None:
            cache = tuple(seq(t) for t in initial_state.window)
        else:
            cache = tuple(x.new_zeros(x.shape[0], c - 1, *x.shape[2:]) for x in (ks, vs, es))
    al = None if alpha is None else seq(alpha)
    be = None if beta is None else seq(beta)
    st = None
    if detach:
        st = [W - W.detach() for W in ws]
        ws = [W.detach() for W in ws]
        anchor = [W.detach() for W in anchor]
        ms = None if ms is None else [M.detach() for M in ms]
        ks, vs, es = ks.detach(), vs.detach(), es.detach()
        cache = None if cache is None else tuple(t.detach() for t in cache)
        al = None if al is None else al.detach()
        be = None if be is None else be.detach()

    cfg = dict(objective=objective, signal=signal, rule=rule, act=hidden_act(hidden_norm, activation),
               residual=residual, read=read, p=p, delta=delta)
    if precondition is not None:
        cfg["precondition"] = _check_precondition(precondition, rule, impl)
    if cache is not None:  # the call's tokens behind the cached ones, so a piece's predecessors are a slice
        ks, vs, es = (torch.cat([w, x], dim=1) for w, x in zip(cache, (ks, vs, es)))
    if impl == "triton":
        from nldsl.runtime._triton import runtime_mlp_kernel

        cfg["kernel"] = runtime_mlp_kernel(_OP, kernel, depth=len(base), d_in=K, d_hidden=base[0].shape[-2],
                                           d_out=V, activation=activation, hidden_norm=hidden_norm,
                                           residual=residual, chunk=C)
    o, ws, anchor, ms, off = fn(qs, ks, vs, es, al, be, ws, anchor, ms, off, C, cfg, st, c - 1)
    o = o.reshape(B, H, T, -1).transpose(1, 2).to(q.dtype)
    state = None
    if output_final_state:
        last = None
        if c > 1:  # the last c - 1 tokens, back to [B, c - 1, H, *]
            last = tuple(x[:, T:].reshape(B, H, c - 1, *x.shape[2:]).transpose(1, 2) for x in (ks, vs, es))
        state = DeepMemoryState(
            tuple(_from_heads(W, B, H) for W in ws),
            tuple(_from_heads(W, B, H) for W in anchor),
            None if ms is None else tuple(_from_heads(M, B, H) for M in ms),
            off,
            last,
        )
    return MemoryOutput(o, state)


# --------------------------------------------------------------------------------------------
# implementations (inputs already [N, T, *] in the compute dtype)
# --------------------------------------------------------------------------------------------

def segment_lengths(T: int, offsets_periods) -> list[int]:
    """Lengths of the consecutive pieces of a T-token call that cross no chunk boundary of any
    of the ``(offset, period)`` clocks."""
    offs = [o for o, _ in offsets_periods]
    lens = []
    t = 0
    while t < T:
        L = min([T - t] + [C - o for o, (_, C) in zip(offs, offsets_periods)])
        lens.append(L)
        offs = [(o + L) % C for o, (_, C) in zip(offs, offsets_periods)]
        t += L
    return lens


def split_time(x: Optional[Tensor], lens: list[int]):
    """Split ``[N, T, ...]`` along time once (one SplitBackward node instead of a slice per
    piece, whose backward would allocate a full-length gradient every time)."""
    if x is None:
        return [None] * len(lens)
    if len(lens) == 1:  # (no split node for the one piece of a call inside one chunk)
        return [x]
    return list(x.split(lens, dim=1))


def _chunked(q, k, v, eta, alpha, beta, ws, anchor, ms, off, C, cfg, st, lead=0):
    # lead: the Omega rule's c - 1 tokens in front of k, v and eta (the window's, from before the call)
    lens = segment_lengths(q.shape[1], [(off, C)])
    tokens = (k, v, eta)
    if lead:
        tokens = tuple(x[:, lead:] for x in tokens)
    pieces = zip(*(split_time(z, lens) for z in (q, *tokens, alpha, beta)))
    preceding = [None] * len(lens)
    if lead:  # every piece's predecessors in one gather (a slice per piece would cost a full-length gradient each)
        starts = torch.tensor([0, *lens[:-1]], device=k.device).cumsum(0)
        idx = starts[:, None] + torch.arange(lead, device=k.device)  # [pieces, lead]
        preceding = list(zip(*(x[:, idx].unbind(1) for x in (k, v, eta))))
    outs = []
    for L, (qp, kp, vp, ep, ap, bp), pre in zip(lens, pieces, preceding):
        if off == 0:
            anchor = ws
        o, ws, ms = chunk_step(ws, ms, anchor, kp, vp, ep, ap, bp, qp, st=st, preceding=pre, **cfg)
        outs.append(o)
        off = (off + L) % C
    if off == 0:
        anchor = ws
    return torch.cat(outs, dim=1), ws, anchor, ms, off


def _single_loss(ws, x, target, *, objective, act, residual, p=None, delta=None):
    """Per-token loss for one sequence-head (weights [do, di], x [di]) for torch.func.grad: the
    objectives as written (the chunked path uses their derivatives, ``output_error``)."""
    a = x
    for i, W in enumerate(ws):
        a = W @ a
        if i < len(ws) - 1:
            a = hidden(a, act)
    return objective_loss(objective, a + x if residual else a, target, p, delta)


def token_update(ws, ms, step, a, b, e, k, rule) -> tuple[list, list]:
    """One token's write in the token loops (the references): ``R_i = -step_i`` (``+ b M_i`` with
    momentum, then the new ``M_i``), ``W_i <- a W_i + R_i``, DGD's erase ``- e (W_1 k) k^T`` on the
    input-side layer. ``step``: the eta-weighted gradients; ``a``, ``b``, ``e`` broadcast per row."""
    new_ws, new_ms = [], []
    for i, (W, g) in enumerate(zip(ws, step)):
        r = -g
        if ms is not None:
            r = b * ms[i] + r
            new_ms.append(r)
        if rule == "dgd" and i == 0:
            W = a * W - e * (W @ k.unsqueeze(-1)) * k.unsqueeze(-2) + r
        else:
            W = a * W + r
        new_ws.append(W)
    return new_ws, new_ms


def _reference(q, k, v, eta, alpha, beta, ws, anchor, ms, off, C, cfg, st, lead=0):
    act, residual, rule, read = cfg["act"], cfg["residual"], cfg["rule"], cfg["read"]
    pre = cfg.get("precondition")
    loss = functools.partial(_single_loss, objective=cfg["objective"], act=act, residual=residual, p=cfg["p"],
                             delta=cfg["delta"])
    grad_fn = torch.func.vmap(torch.func.grad(loss))
    ws, anchor = tuple(ws), tuple(anchor)
    ms = None if ms is None else tuple(ms)
    T = q.shape[1]
    outs = []

    def read_with(weights, x):
        if st is not None:
            weights = [w + s for w, s in zip(weights, st)]
        return mlp_forward(weights, x.unsqueeze(1), act, residual)[0].squeeze(1)

    for t in range(T):
        if off == 0:
            anchor = ws
        # the step's gradient: eta_s g_s summed over the window's tokens s (token t alone, but
        # under the Omega rule; k, v and eta hold the ``lead`` tokens in front), all at the anchor
        steps, raws = [], []
        for s in range(t, t + lead + 1):
            target = v[:, s]
            if cfg["signal"] == "self":
                target = mlp_forward(anchor, target.unsqueeze(1), act, residual)[0].squeeze(1)
            raws.append(grad_fn(anchor, k[:, s], target))
            steps.append([eta[:, s, None, None] * g for g in raws[-1]])
        step = [sum(gs) for gs in zip(*steps)]
        kt = k[:, t + lead]
        if read == "anchor":
            outs.append(read_with(anchor, q[:, t]))
        e = eta[:, t + lead, None, None]
        a = 1.0 if alpha is None else alpha[:, t, None, None]
        new_ws, new_ms = [], []
        if pre is not None:  # Muon's step: the orthogonalised momentum of the raw gradient, times eta
            raw = [sum(gs) for gs in zip(*raws)]  # the window's gradients, unweighted (Atlas' gamma = 1)
            for i, (W, g) in enumerate(zip(ws, raw)):
                S = -g if ms is None else beta[:, t, None, None] * ms[i] - g
                new_ms.append(S)
                new_ws.append(a * W + e * orthogonalize_batch(S, *pre))
        else:
            new_ws, new_ms = token_update(ws, ms, step, a, None if ms is None else beta[:, t, None, None], e, kt,
                                          rule)
        ws = tuple(new_ws)
        ms = tuple(new_ms) if ms is not None else None
        if read == "running":
            outs.append(read_with(ws, q[:, t]))
        off = (off + 1) % C
    if off == 0:
        anchor = ws
    return torch.stack(outs, dim=1), ws, anchor, ms, off
