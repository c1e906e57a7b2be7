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

      (I + A) U' = diag(beta) (V - diag(Gamma) K S_0),
      A = strict_lower(diag(beta) (K K^T * D)),   D[t, j] = exp(b_t - b_j)

  so ``U' = T (diag(beta) V - diag(beta Gamma) K S_0)`` with ``T = (I + A)^{-1}`` (the UT
  transform: one batched triangular solve against the identity). Then

      o = scale * ( diag(Gamma) Q S_0 + ((Q K^T) * D * causal) U' )
      S_C = Gamma_C S_0 + (K * exp(b_C - b))^T U'

  Every product is a batched matmul over the (chunk, batch, head) matrices of a group of
  chunks; a Python loop over the group's chunks carries ``S`` (three small products per
  chunk). A ``torch.autograd.Function`` with a hand-written backward (:class:`_ChunkedDeltaRule`)
  saves five small tensors per chunk and walks the chunks in reverse, instead of letting
  autograd record and replay a few hundred small ops. On a CPU a group is a few chunks, so that
  its operands stay in cache (the default ``chunk_size`` there is 32, the fastest tile; see
  benchmarks/README.md); on a GPU it is the whole sequence. Padded tokens (``k = v = 0,
  beta = 0, g = 0``) are exact no-ops. The fla naming of these pieces: ``T`` is ``A`` after
  ``solve_tril``, ``U'`` is ``v_new`` of ``chunk_delta_h``, the read is ``chunk_fwd_o``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nldsl.runtime._common import (
    MemoryOutput,
    check_chunk_size,
    check_gate,
    check_qkv,
    check_state,
    chunk_major_rows,
    compute_dtype,
    dispatch,
    resolve_scale,
    to_chunk_major,
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
    chunk_size: int | None = None,
) -> MemoryOutput:
    """DeltaNet's rule ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. (fla's layers L2-normalise ``k``; this op
            does not, so that it is a pure function of its inputs.)
        beta: step size ``[B, T, H]`` (or a number).
        scale, initial_state (``[B, H, K, V]``), output_final_state: as fla.
        impl: ``"reference"``, ``"chunked"`` or ``"triton"``; chunk_size: chunked tile (results do
            not depend on it; the reference ignores it). None: 32 for ``"chunked"`` on a CPU
            (the fastest tile there), 64 otherwise.
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
    chunk_size: int | None = None,
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
    if chunk_size is None:
        chunk_size = _CPU_CHUNK if impl == "chunked" and q.device.type == "cpu" else 64
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


_CPU_CHUNK = 32  # default tile of the chunked path on a CPU (benchmarks/README.md: 16, 32, 64)


def _chunked(q, k, v, beta, g, scale, S, dt, C):
    C = min(C, q.shape[1])
    return _ChunkedDeltaRule.apply(q, k, v, beta, g, S, scale, C, _chunk_group(q, S.shape[0] * S.shape[1], C))


# rows (chunks x batch x heads x chunk tokens) processed together on a CPU thread: a group's
# operands (~[1024, 64] float32 each) stay in a core's L2 cache while its ~40 ops run over them
_CPU_ROWS_PER_THREAD = 1024


def _chunk_group(q: Tensor, BH: int, C: int) -> int:
    """How many chunks the chunked path batches into one group of ops.

    On a CPU, a few chunks at a time: whole-sequence batches of these small products stream every
    intermediate through main memory, and that costs more than the arithmetic. On a GPU, every
    chunk in one group: launches, not memory, are what costs there."""
    if q.device.type != "cpu":
        return q.shape[1]
    return max(1, _CPU_ROWS_PER_THREAD * torch.get_num_threads() // (BH * C))


_LOG2E = 1.4426950408889634


def _gate_factors(g: Tensor, beta: Tensor):
    """Per-token factors of the chunk-local retention, from the chunk-major log gate ``g``
    ``[N, B*H, C]``: ``b2 = log2(e) * b`` (``b_t`` the cumulative log retention from the chunk
    start; ``exp2`` is cheaper than ``exp``), ``Gamma = exp(b)``, ``exp(b_C - b)`` and
    ``beta * Gamma``."""
    b = g.cumsum(-1)
    gamma = b.exp()
    return b * _LOG2E, gamma, (b[..., -1:] - b).exp_(), beta * gamma


def _within_chunk_decay(b2: Tensor, causal: Tensor, out: Tensor) -> Tensor:
    """``D[t, j] = exp(b_t - b_j)`` for ``j <= t``, 0 above the diagonal (``b2`` rows ``[R, C]``),
    into ``out``. The upper triangle is zeroed before the exponential, so it cannot overflow."""
    return torch.sub(b2.unsqueeze(-1), b2.unsqueeze(-2), out=out).mul_(causal).exp2_().mul_(causal)


def _rows(x: Tensor) -> Tensor:
    """``[m, B*H, ...]`` -> ``[m*B*H, ...]``: a group of chunks as one batch of matrices."""
    return x.flatten(0, 1)


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)


class _ChunkedDeltaRule(torch.autograd.Function):
    """The WY/UT chunkwise (gated) delta rule with a hand-written backward.

    Inputs as :func:`_run` passes them (``q, k, v`` ``[B, T, H, D]`` in any float dtype; ``beta``,
    ``g`` (or None), ``S0`` in the compute dtype). Work is chunk-major (``[N, B*H, C, D]``) and goes
    a group of ``group`` chunks at a time, every product a 3-D batched matmul over the group's
    (chunk, batch, head) matrices. In chunk n, with ``A = strict_lower(diag(beta) (K K^T * D))``
    and ``T = (I + A)^{-1}`` (one batched triangular solve per group):

        Y  = diag(beta) V - (K * beta Gamma) S_n        U = T Y        (the new values U')
        o  = (Q * Gamma) S_n + ((Q K^T) * D) U
        S_{n+1} = Gamma_C S_n + (K * exp(b_C - b))^T U

    Applying ``T`` to ``Y`` once per chunk (not ``T V`` and ``T K`` ahead of the state pass)
    saves a product in the forward and two in the backward.

    Saved for the backward, per chunk: ``Q K^T * D``, ``K K^T * D``, ``T``, ``U`` and the chunk's
    start state ``S_n``; the gate factors and ``D`` are recomputed. The backward walks the
    chunks in reverse, carrying ``dS`` (the gradient of ``S_{n+1}``):

        dU  = ((Q K^T) * D)^T dO + (K * exp(b_C - b)) dS        dY = T^T dU
        dS_n = Gamma_C dS + (Q * Gamma)^T dO - (K * beta Gamma)^T dY
        dA  = -strict_lower(dY U^T)                         (from dT = -T dA T)

    and the rest (dQ, dK, dV, dbeta) are products of those with the saved tensors. The log gate's
    gradient: ``d b_t = <q_t, dq_t> - <k_t, dk_t>`` plus two corrections (see the code), summed in
    reverse over the chunk (``b`` is a cumulative sum of ``g``). Scratch tensors live in one
    workspace per call, reused by every group. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, scale, C, group):
        B, T, H, K = q.shape
        V = v.shape[-1]
        dt, dev = S0.dtype, q.device
        qs = to_chunk_major(q, C, dt, scale)
        kc, vc, bc = (to_chunk_major(x, C, dt) for x in (k, v, beta))
        N, BH = kc.shape[:2]
        G = min(group, N)
        gated = g is not None
        if gated:
            b2, gamma, to_end, beta_gamma = _gate_factors(to_chunk_major(g, C, dt), bc)
        # with no gradient to compute, the per-chunk buffers hold one group at a time
        keep = any(ctx.needs_input_grad[:6])
        slots = N if keep else G
        qk = torch.empty(slots, BH, C, C, dtype=dt, device=dev)   # (Q K^T) * D, causal
        kk = torch.empty_like(qk)                                  # (K K^T) * D
        Tinv = torch.empty_like(qk)
        U = torch.empty(slots, BH, C, V, dtype=dt, device=dev)
        S = torch.empty(slots + 1, BH, K, V, dtype=dt, device=dev)  # S[n]: the state chunk n starts from
        S[0] = S0.reshape(BH, K, V)
        o = torch.empty(B, N * C, H, V, dtype=q.dtype, device=dev)
        ws = _Workspace(G * BH, dt, dev)
        eye = torch.eye(C, dtype=dt, device=dev)
        causal = torch.ones(C, C, dtype=dt, device=dev).tril_()
        for n0 in range(0, N, G):
            m, chunks = min(G, N - n0), slice(n0, min(n0 + G, N))
            R = m * BH
            base = n0 if keep else 0
            if not keep and n0:
                S[0] = S[G]
            here = slice(base, base + m)
            qn, kn, bn = _rows(qs[chunks]), _rows(kc[chunks]), _col(_rows(bc[chunks]))
            qk_, kk_, T_, U_ = (_rows(x[here]) for x in (qk, kk, Tinv, U))
            torch.bmm(qn, kn.mT, out=qk_)
            torch.bmm(kn, kn.mT, out=kk_)
            w = ws("w", R, C, K)                                  # rows of K that S is read with
            if gated:
                D = _within_chunk_decay(_rows(b2[chunks]), causal, ws("D", R, C, C))
                qk_.mul_(D)
                kk_.mul_(D)
                torch.mul(kn, _col(_rows(beta_gamma[chunks])), out=w)
                qg = torch.mul(qn, _col(_rows(gamma[chunks])), out=ws("qg", R, C, K))
                kd = torch.mul(kn, _col(_rows(to_end[chunks])), out=ws("kd", R, C, K))  # rows it writes with
            else:
                qk_.tril_()
                torch.mul(kn, bn, out=w)
                qg, kd = qn, kn
            A = torch.mul(kk_, bn, out=ws("A", R, C, C))
            torch.linalg.solve_triangular(A, eye.expand(R, C, C), upper=False, unitriangular=True, out=T_)
            Y = torch.mul(_rows(vc[chunks]), bn, out=ws("Y", R, C, V)).view(m, BH, C, V)
            w, kd = w.view(m, BH, C, K), kd.view(m, BH, C, K)
            for i in range(m):  # the state pass: three small products per chunk
                n = base + i
                Y[i].baddbmm_(w[i], S[n], alpha=-1)
                torch.bmm(Tinv[n], Y[i], out=U[n])
                torch.bmm(kd[i].mT, U[n], out=S[n + 1])
                if gated:
                    S[n + 1].addcmul_(S[n], gamma[n0 + i, :, -1, None, None])
                else:
                    S[n + 1].add_(S[n])
            on = torch.bmm(qg, _rows(S[here]), out=ws("o", R, C, V))
            on.baddbmm_(qk_, U_)
            chunk_major_rows(o, C, chunks).copy_(on.view(m, B, H, C, V))
        final = S[base + m].view(B, H, K, V).clone()
        ctx.scale, ctx.shape = scale, (B, T, H)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.group, ctx.gated = G, gated
        if gated:
            ctx.save_for_backward(qs, kc, vc, bc, b2, gamma, to_end, beta_gamma, qk, kk, Tinv, U, S)
        else:
            ctx.save_for_backward(qs, kc, vc, bc, qk, kk, Tinv, U, S)
        ctx.set_materialize_grads(False)
        return o[:, :T], final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS_final):
        gated = ctx.gated
        if gated:
            qs, kc, vc, bc, b2, gamma, to_end, beta_gamma, qk, kk, Tinv, U, S = ctx.saved_tensors
        else:
            qs, kc, vc, bc, qk, kk, Tinv, U, S = ctx.saved_tensors
        B, T, H = ctx.shape
        N, BH, C, K = qs.shape
        V = vc.shape[-1]
        G = ctx.group
        dt, dev = qs.dtype, qs.device
        reads_used = do is not None  # q only enters the reads
        if not reads_used:
            do = torch.zeros(B, T, H, V, dtype=dt, device=dev)
        do = to_chunk_major(do, C, dt)
        if dS_final is None:
            dS = torch.zeros(BH, K, V, dtype=dt, device=dev)
        else:
            dS = dS_final.reshape(BH, K, V).to(dt)
        dq, dk = (torch.empty(B, N * C, H, K, dtype=d, device=dev) for d in ctx.dtypes[:2])
        dv = torch.empty(B, N * C, H, V, dtype=ctx.dtypes[2], device=dev)
        dbeta = torch.empty_like(bc)
        db = torch.empty_like(bc) if gated else None
        ws = _Workspace(G * BH, dt, dev)
        causal = torch.ones(C, C, dtype=dt, device=dev).tril_()
        strict = torch.ones(C, C, dtype=dt, device=dev).tril_(-1)
        dS_next = torch.empty(G, BH, K, V, dtype=dt, device=dev)  # dS_{n+1} of the group's chunks
        dS_carry = torch.empty(BH, K, V, dtype=dt, device=dev)
        for n1 in range(N, 0, -G):
            n0 = max(n1 - G, 0)
            m, chunks = n1 - n0, slice(n0, n1)
            R = m * BH
            qn, kn, vn, don = (_rows(x[chunks]) for x in (qs, kc, vc, do))
            qk_, kk_, Sn, Un = (_rows(x[chunks]) for x in (qk, kk, S, U))
            bn = _col(_rows(bc[chunks]))
            w = ws("w", R, C, K)
            if gated:
                D = _within_chunk_decay(_rows(b2[chunks]), causal, ws("D", R, C, C))
                gm = _rows(gamma[chunks])
                torch.mul(kn, _col(_rows(beta_gamma[chunks])), out=w)
                qg = torch.mul(qn, _col(gm), out=ws("qg", R, C, K))
                kd = torch.mul(kn, _col(_rows(to_end[chunks])), out=ws("kd", R, C, K))
            else:
                torch.mul(kn, bn, out=w)
                qg, kd = qn, kn
            dU = torch.bmm(qk_.mT, don, out=ws("dU", R, C, V))                  # + kd dS in the loop
            dSn = torch.bmm(qg.mT, don, out=ws("dSn", R, K, V)).view(m, BH, K, V)  # + the carried terms
            dY = ws("dY", R, C, V)
            dU3, dY3 = dU.view(m, BH, C, V), dY.view(m, BH, C, V)
            w3, kd3 = w.view(m, BH, C, K), kd.view(m, BH, C, K)
            for i in range(m - 1, -1, -1):  # the state pass in reverse
                n = n0 + i
                dS_next[i] = dS
                dU3[i].baddbmm_(kd3[i], dS)
                torch.bmm(Tinv[n].mT, dU3[i], out=dY3[i])
                if gated:
                    dSn[i].addcmul_(dS, gamma[n, :, -1, None, None])
                else:
                    dSn[i].add_(dS)
                dS = dSn[i].baddbmm_(w3[i].mT, dY3[i], alpha=-1)
            dS = dS_carry.copy_(dS)  # the next group reuses the workspace
            dSx = _rows(dS_next[:m])
            dqg = torch.bmm(don, Sn.mT, out=ws("dqg", R, C, K))                  # d(Q * Gamma)
            dw = torch.bmm(dY, Sn.mT, out=ws("dw", R, C, K))                     # d(w) = -dw
            dkd = torch.bmm(Un, dSx.mT, out=ws("dkd", R, C, K))                  # d(kd)
            dqk = torch.bmm(don, Un.mT, out=ws("dqk", R, C, C))                  # d((Q K^T) * D)
            E = torch.bmm(dY, Un.mT, out=ws("E", R, C, C)).mul_(strict)          # dA = -E
            dvn = torch.mul(dY, bn, out=dU)                                       # dU is spent
            chunk_major_rows(dv, C, chunks).copy_(dvn.view(m, B, H, C, V))
            e_kk = torch.linalg.vecdot(E, kk_)                                   # rows of E * (K K^T * D)
            dw_k = torch.linalg.vecdot(dw, kn)
            dbn = torch.linalg.vecdot(dY, vn).sub_(e_kk)
            if gated:
                _rows(dbeta[chunks]).copy_(dbn.sub_(dw_k * gm))
                # what the chunk's last token's b_C adds: the state decay and the write weights
                to_end_part = torch.linalg.vecdot(dkd, kd)
                last = to_end_part.sum(-1) + torch.linalg.vecdot(Sn.flatten(1), dSx.flatten(1)) * gm[:, -1]
                dqk.mul_(D)
                dkk = E.mul_(D).mul_(bn).neg_()                                  # d(K K^T), lower half
                dqn = dqg.mul_(_col(gm))
                dkn = dkd.mul_(_col(_rows(to_end[chunks])))
                dkn.addcmul_(dw, _col(_rows(beta_gamma[chunks])), value=-1)
            else:
                _rows(dbeta[chunks]).copy_(dbn.sub_(dw_k))
                dqk.tril_()
                dkk = E.mul_(bn).neg_()
                dqn = dqg
                dkn = dkd.addcmul_(dw, bn, value=-1)
            dqn.baddbmm_(dqk, kn)
            dkn.baddbmm_(dqk.mT, qn)
            dkn.baddbmm_(torch.add(dkk, dkk.mT, out=ws("M", R, C, C)), kn)
            if gated:
                # d b_t (b: the chunk-local cumulative log gate). q_t only enters with exp(+b_t) and
                # k_t mostly with exp(-b_t), so d b_t = <q_t, dq_t> - <k_t, dk_t>, corrected where a
                # row of K enters with exp(+b_t): in w (-2 <dw_t, w_t>) and as the row of
                # K K^T * D (+2 <k_t, (dKK k)_t> = -2 beta_t <E_t, (K K^T * D)_t>)
                dbl = torch.linalg.vecdot(qn, dqn).sub_(torch.linalg.vecdot(kn, dkn))
                dbl.sub_(dw_k.mul_(_rows(beta_gamma[chunks])).add_(e_kk.mul_(bn.squeeze(-1))), alpha=2)
                dbl[:, -1] += last
                _rows(db[chunks]).copy_(dbl)
            torch.mul(dqn.view(m, B, H, C, K), ctx.scale, out=chunk_major_rows(dq, C, chunks))
            chunk_major_rows(dk, C, chunks).copy_(dkn.view(m, B, H, C, K))
        dg = None
        if gated:  # b is the cumulative sum of g over the chunk: sum d b in reverse
            dg = _from_chunk_major(db.flip(-1).cumsum_(-1).flip(-1), B, H, T)
        return (dq[:, :T] if reads_used else None, dk[:, :T], dv[:, :T], _from_chunk_major(dbeta, B, H, T), dg,
                dS.view(B, H, K, V), None, None, None)


class _Workspace:
    """Scratch buffers for one group of chunks, allocated on first use and reused by every group
    (a last, smaller group takes a prefix): no allocation, and no page faults on fresh memory,
    per group."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.dtype, self.device = rows, dtype, device
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, rows: int, *shape: int) -> Tensor:
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.empty(self.rows, *shape, dtype=self.dtype, device=self.device)
        return buf[:rows]


def _from_chunk_major(x: Tensor, B: int, H: int, T: int) -> Tensor:
    """A per-token ``[N, B*H, C]`` tensor back to ``[B, T, H]``."""
    N, _, C = x.shape
    return x.view(N, B, H, C).permute(1, 0, 3, 2).reshape(B, N * C, H)[:, :T]
