r"""Softmax attention as a non-parametric associative memory, with the KV cache as its state.

Nested Learning Eq. 62-63: softmax attention is the Nadaraya-Watson solution of a weighted L2
regression over the stored pairs, re-solved for every query (a memory "of infinite frequency"):

    o_t = sum_{i in W_t} softmax_i(scale * q_t . k_i) v_i

with ``W_t`` every earlier token and ``t`` itself (causal), or only the last ``window`` of them
(sliding window, Eq. 63: ``t - window < i <= t``). The "state" of this memory is the set of
stored pairs: the KV cache. ``final_state`` is a :class:`KVCache` holding the keys and values a
continuation needs (all of them, or the last ``window - 1`` with a window); passing it back as
``initial_state`` continues the stream exactly. The cache keeps ``k``'s and ``v``'s dtype
(there is no recurrence to accumulate error in).

Implementations (``impl=``):

* ``"reference"``: explicit ``softmax(scale Q K^T + mask) V`` in plain torch.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` when there is no
  cache and no window, an explicit boolean mask otherwise). This is the fast path; there is no
  "chunked" impl for attention.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nldsl.runtime._common import MemoryOutput, check_qkv, check_state, dispatch, resolve_scale

__all__ = ["softmax_attention", "KVCache"]

_OP = "softmax_attention"


class KVCache(NamedTuple):
    """keys ``[B, L, H, K]`` and values ``[B, L, H, V]`` of the L most recent tokens."""

    keys: Tensor
    values: Tensor


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    initial_state: KVCache | None = None,
    kv_cache: KVCache | None = None,
    output_final_state: bool = False,
    impl: str = "sdpa",
) -> MemoryOutput:
    """Causal softmax attention, optionally over a sliding window, with a KV cache as state.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        window: None (full causal) or ``w >= 1``: token t attends to ``t-w < i <= t``.
        scale: default ``K ** -0.5``.
        initial_state / kv_cache: a :class:`KVCache` from an earlier call (two names for the
            same argument, the first as in every other runtime op; give at most one).
        output_final_state: return the :class:`KVCache` a continuation needs.
        impl: ``"reference"`` or ``"sdpa"``.
    """
    B, T, H, K, V = check_qkv(_OP, q, k, v)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{_OP}: window must be None or a positive int, got {window!r}")
    if initial_state is not None and kv_cache is not None:
        raise ValueError(f"{_OP}: pass the cache as initial_state or kv_cache, not both")
    cache = initial_state if initial_state is not None else kv_cache
    scale = resolve_scale(_OP, scale, K)
    fn = dispatch(_OP, impl, {"reference": _reference, "sdpa": _sdpa})
    if cache is not None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"{_OP}: the cache must be a KVCache(keys, values), got {type(cache).__name__}")
        L = cache.keys.shape[1] if cache.keys.dim() == 4 else -1
        check_state(_OP, "cache.keys", cache.keys, (B, L, H, K), q)
        check_state(_OP, "cache.values", cache.values, (B, L, H, V), q)
        k_all = torch.cat([cache.keys.to(k.dtype), k], dim=1)
        v_all = torch.cat([cache.values.to(v.dtype), v], dim=1)
    else:
        k_all, v_all = k, v
    L = k_all.shape[1] - T
    mask = _mask(T, L, window, q.device)  # [T, L+T], True = attend
    o = fn(q, k_all, v_all, mask, scale, window is None and L == 0)
    state = None
    if output_final_state:
        keep = k_all.shape[1] if window is None else window - 1
        start = max(k_all.shape[1] - keep, 0)
        state = KVCache(k_all[:, start:], v_all[:, start:])
    return MemoryOutput(o, state)


def _mask(T: int, L: int, window: int | None, device) -> Tensor:
    pos_q = torch.arange(T, device=device)[:, None] + L     # absolute position of each query
    pos_k = torch.arange(L + T, device=device)[None, :]
    allowed = pos_k <= pos_q
    if window is not None:
        allowed &= pos_k > pos_q - window
    return allowed


def _reference(q, k, v, mask, scale, plain_causal):
    dt = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bthk,bshk->bhts", q.to(dt), k.to(dt)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))        # every row keeps its own token
    return torch.einsum("bhts,bshv->bthv", scores.softmax(dim=-1), v.to(dt)).to(q.dtype)


def _sdpa(q, k, v, mask, scale, plain_causal):
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))      # SDPA wants [B, H, T, D]
    if plain_causal:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)
