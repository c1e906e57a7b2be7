r"""Chunked engine for "retain, then erase and write at the previous state" matrix memories.

Shared by :mod:`nldsl.runtime.dgd` and :mod:`nldsl.runtime.omega`. One head's state ``S``
(``[K, V]``) evolves per step t as

    S_t = alpha_t S_{t-1} + sum_{w=1}^{c} k_{t,w} x_{t,w}^T,
    x_{t,w} = gamma_{t,w} (v_{t,w} - S_{t-1}^T k_{t,w} - S_a^T k_{t,w} [anchor term, optional])

i.e. a multiplicative retention ``alpha_t`` plus ``c`` gradient steps of the L2 loss
``1/2 ||S^T k - v||^2`` taken at the *previous, undecayed* state ``S_{t-1}`` (the Omega rule's
window of c "virtual tokens" per step; DGD has c = 1 and an extra gradient taken at a chunk
anchor ``S_a``). Note the contrast with the gated delta rule, whose erase acts on the decayed
state ``alpha_t S_{t-1}``.

Chunkwise form. Inside a chunk of C steps entering with ``S_0``, let ``P[t, j] =
prod_{l=j+1}^t alpha_l`` (:func:`segment_products`, index 0 = chunk start). Unrolling,
``S_{t-1} = P[t-1, 0] S_0 + sum_{j<t} P[t-1, j] sum_w k_{j,w} x_{j,w}^T``, so the ``C*c``
unknowns ``x`` solve a unit lower-triangular system (the same UT transform as the delta rule,
with the virtual tokens ordered by step):

    (I + strict_lower(diag(gamma) (K_v K_v^T) * P[t-1, j])) X
        = diag(gamma) (V_v - diag(P[t-1, 0]) K_v S_0 - K_v S_a)

so ``X = U - W_0 S_0 - W_a S_a``. Outputs and the chunk-end state are then

    o_t  = scale ( P[t, 0] q_t S_0 + sum_{j<=t} P[t, j] sum_w (q_t . k_{j,w}) x_{j,w} )
    S_C  = P[C, 0] S_0 + sum_{j,w} P[C, j] k_{j,w} x_{j,w}^T

("read before write", ``o_t = scale q_t S_{t-1}``, uses row ``t-1`` of ``P`` instead of row t).
"""
from __future__ import annotations

import torch
from torch import Tensor

from nldsl.runtime._common import segment_products, ut_apply

__all__ = ["erase_chunks"]


def erase_chunks(
    qc: Tensor,
    kv: Tensor,
    vv: Tensor,
    gv: Tensor,
    alpha: Tensor,
    S: Tensor,
    scale: float,
    *,
    anchor_term: bool = False,
    anchor: Tensor | None = None,
    read: str = "running",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run N chunks of the rule above.

    Args:
        qc: ``[B, H, N, C, K]`` queries; kv: ``[B, H, N, C, c, K]`` virtual keys; vv:
            ``[B, H, N, C, c, V]`` virtual values; gv: ``[B, H, N, C, c]`` their step sizes;
            alpha: ``[B, H, N, C]`` retention (padded steps must carry ``alpha = 1, gv = 0``).
        S: ``[B, H, K, V]`` state entering the first chunk.
        anchor_term: add the gradient at the anchor ``S_a`` (DGD). The anchor is each chunk's
            start state, except that ``anchor`` (if given, and then ``N == 1``) overrides it.
        read: ``"running"`` (``o_t`` reads ``S_t``), ``"before"`` (reads ``S_{t-1}``) or
            ``"anchor"`` (reads ``S_a``).

    Returns:
        ``(o [B, H, N, C, V], S_end, S_start_of_last_chunk)``.
    """
    B, H, N, C, c, K = kv.shape
    Vd = vv.shape[-1]
    Cc = C * c
    kf = kv.reshape(B, H, N, Cc, K)
    vf = vv.reshape(B, H, N, Cc, Vd)
    gf = gv.reshape(B, H, N, Cc, 1)
    P = segment_products(alpha)                                  # [B, H, N, C+1, C+1]

    def per_virtual(m: Tensor) -> Tensor:                        # [.., C, C] -> [.., C, Cc]
        return m.repeat_interleave(c, dim=-1) if c > 1 else m

    prev = per_virtual(P[..., :-1, 1:])                          # P[t-1, j(p)]
    prev0 = P[..., :-1, 0]                                       # P[t-1, 0]
    if c > 1:
        prev_vv = prev.repeat_interleave(c, dim=-2)              # rows per virtual token too
        prev0_v = prev0.repeat_interleave(c, dim=-1)
    else:
        prev_vv, prev0_v = prev, prev0
    gk = gf * kf
    rhs = [gf * vf, gk * prev0_v.unsqueeze(-1)] + ([gk] if anchor_term else [])
    sol = ut_apply((gk @ kf.transpose(-1, -2)) * prev_vv, torch.cat(rhs, dim=-1))  # one UT transform
    U, W0 = sol[..., :Vd], sol[..., Vd:Vd + K]
    Wa = sol[..., Vd + K:] if anchor_term else None
    if anchor_term and anchor is None:
        W0, Wa = W0 + Wa, None                                   # S_a = S_0 in every chunk
    end = (kf * per_virtual(P[..., -1:, 1:]).transpose(-1, -2)).transpose(-1, -2)  # [K, Cc]
    end0 = P[..., -1, 0, None, None]
    U_, W0_, end_, end0_ = U.unbind(2), W0.unbind(2), end.unbind(2), end0.unbind(2)
    starts, xs = [], []
    for n in range(N):  # inter-chunk state pass
        starts.append(S)
        x = U_[n] - W0_[n] @ S
        if Wa is not None:
            x = x - Wa[:, :, n] @ anchor
        xs.append(x)
        S = end0_[n] * S + end_[n] @ x
    last_start = starts[-1]
    starts, X = torch.stack(starts, dim=2), torch.stack(xs, dim=2)
    qs = qc * scale
    if read == "anchor":
        o = qs @ (starts if anchor is None else anchor.unsqueeze(2))
    else:
        rows = slice(1, None) if read == "running" else slice(None, -1)
        o = (qs * P[..., rows, 0].unsqueeze(-1)) @ starts \
            + ((qs @ kf.transpose(-1, -2)) * per_virtual(P[..., rows, 1:])) @ X
    return o, S, last_start
