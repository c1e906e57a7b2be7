r"""Self-modifying (deep self-referential) Titans: NL section 8.1-8.2, Eq. 83-93 (and Hope's Eq. 94-96).

Per head, on inputs ``x [B, T, H, D]`` (the caller's per-head projection of the residual stream):

    x~_t  = causal depthwise conv_W(x)_t                      (width W, e.g. 4; optional)
    k_t   = M_k,a(x~_t),  v_t = M_v,a(x~_t),  q_t = M_q,a(x~_t) (or a static q)   (Eq. 86)
    eta_t = eta_scale * softplus(M_eta,a(x~_t) + eta_bias),  alpha_t = sigmoid(M_alpha,a(x~_t) + alpha_bias)
    k_t, q_t <- k_t / ||k_t||, q_t / ||q_t||                  (qk_norm, section 8.3)
    v^_{m,t} = M_m,a(v_t)                                      (self-generated values, Eq. 87)
    M_{m,t} = DGD step of 1/2 ||M_m(k_t) - v^_{m,t}||^2 at M_m,a   for every memory m  (Eq. 88, 90)
    y_t   = M_memory,a(q_t)                                    (read="anchor"; Eq. 86/90)

``a`` is the anchor of each memory: the state at the start of its chunk. The main memory M_memory
updates in chunks of ``chunk_size`` tokens; the generating memories (M_k, M_v, M_q, M_eta, M_alpha)
in chunks of ``gen_chunk_size`` (the paper's two chunk sizes, section 8.2). Every generated
quantity of a token (k, v, q, eta, alpha and the targets v^) is read from the generating
memories' anchor, so a chunk's inputs are known at its start; with both chunk sizes 1 this is
the per-token recurrence of Eq. 86-88 (reads before writes).

The memories are :mod:`nldsl.runtime.deep_memory` MLPs, weights in application order:

* M_k, M_v, M_q, M_memory: ``M(z) = z + W_1 act(W_2 z)`` (Eq. 89/91): ``params[m] = (W_2 [H, d_h, D],
  W_1 [H, D, d_h])`` (``residual=False`` drops the ``z +``).
* M_eta, M_alpha: one number per head, so the residual is dropped: ``M(z) = W_1 act(W_2 z)`` with
  ``W_1 [H, 1, d_h]`` (paper-equations.md section 6.4: the residual is dimensionally impossible).
  Their raw outputs are squashed: ``eta = eta_scale * softplus(. + eta_bias)``, ``alpha =
  sigmoid(. + alpha_bias)`` (the paper leaves the parameterisation open; these are the
  reproductions' choices, with biases so that a small initial state starts at a chosen rate).
* Each of k, v, q, eta, alpha may instead be static: pass the tensor (``k``, ``v``, ``q``: ``[B, T,
  H, D]``, the caller's projection; ``eta_logits``, ``alpha_logits``: ``[B, T, H]`` raw values that
  go through the same squashing) and leave the memory out of ``params`` (Table 6's "w/o
  inner-projection" ablations, the text's static ``q``). Static inputs bypass the convolution.
  ``retention=False`` fixes alpha = 1 (Table 6 "w/o weight decay").

Learning rule (``rule="dgd"``, Eq. 88): ``W_2 <- W_2 (alpha I - eta k k^T) - eta grad_{W_2}``,
``W_1 <- alpha W_1 - eta grad_{W_1}``: the erase multiplies the input-side matrix (the only one
whose input is k), the other decays by alpha; gradients at the anchor, the erase on the running
state. ``rule="gd"`` drops the erase (Table 6 "w/o DGD"). ``beta_momentum`` (None = off; a number
or ``[B, T, H]``) adds Titans' momentum ``S_t = beta_t S_{t-1} - eta_t grad``, ``W_t = (...) W_{t-1} +
S_t`` to every memory (Table 6 "w/o momentum"; the paper's equations omit its form). Objective
``"l2"`` (Eq. 86) or ``"dot"``. All memories share k, eta, alpha, beta (Eq. 88).

``read="running"`` lets the output read M_memory including the writes of its chunk up to t; the
generating memories always read at their anchor (a running read of M_k would need k_t to write
k_t). State (:class:`SelfModifyingState`): every memory's weights / anchor / momentum, both chunk
offsets and the convolution's last ``W - 1`` raw inputs, so a stream split anywhere continues
exactly. Differentiable writes by default (outer gradients reach every initial state, the conv,
the static inputs and the biases through all inner updates); ``detach=True`` makes the writes
constants (first order; then only the output path -- M_memory's and M_q's starting weights
straight through, q, x via q -- gets gradients).

Implementations: ``"reference"`` (token loop, inner gradients by ``torch.func.grad``) and
``"chunked"`` (a loop over the pieces between boundaries of either chunk size; each piece runs
:func:`nldsl.runtime.deep_memory.chunk_step` once per group of same-shaped memories, stacked along
the batch axis: {M_k, M_v, M_q}, {M_eta, M_alpha}, {M_memory}).
"""
from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nldsl.runtime._common import MemoryOutput, check_chunk_size, compute_dtype, dispatch
from nldsl.runtime.deep_memory import (
    ACTIVATIONS,
    _single_loss,
    check_layers,
    chunk_step,
    mlp_forward,
    segment_lengths,
    split_time,
)

__all__ = ["self_modifying_titans", "SelfModifyingState", "causal_conv1d", "GENERATED"]

_OP = "self_modifying_titans"
GENERATED = ("k", "v", "q", "eta", "alpha")
_VEC = ("k", "v", "q")
_SCA = ("eta", "alpha")


class SelfModifyingState(NamedTuple):
    """weights / anchor / momentum: ``{memory name: tuple of [B, H, d_out, d_in]}`` (momentum None
    without momentum); offset_gen / offset_memory: tokens consumed of the current chunk of the
    generating memories / of M_memory; conv: the last ``W - 1`` raw inputs ``[B, W-1, H, D]``
    (None without convolution)."""

    weights: dict
    anchor: dict
    momentum: Optional[dict]
    offset_gen: int
    offset_memory: int
    conv: Optional[Tensor]


def causal_conv1d(x: Tensor, weight: Tensor, state: Optional[Tensor] = None):
    """Causal depthwise convolution over time: ``y_t = sum_j weight[..., j] x_{t - W + 1 + j}``.

    x: ``[B, T, *C]``; weight: ``[*C, W]``; state: the previous ``W - 1`` inputs ``[B, W-1, *C]``
    (None = zeros). Returns ``(y [B, T, *C], new_state [B, W-1, *C])``.
    """
    B, T = x.shape[:2]
    chans = x.shape[2:]
    W = weight.shape[-1]
    if tuple(weight.shape[:-1]) != tuple(chans):
        raise ValueError(f"causal_conv1d: weight must be [{', '.join(map(str, chans))}, W], got {tuple(weight.shape)}")
    if state is None:
        state = x.new_zeros(B, W - 1, *chans)
    full = torch.cat([state.to(x.dtype), x], dim=1)                   # [B, W-1+T, *C]
    flat = full.reshape(B, full.shape[1], -1).transpose(1, 2)         # [B, Cn, W-1+T]
    y = F.conv1d(flat, weight.reshape(-1, 1, W).to(x.dtype), groups=flat.shape[1])
    y = y.transpose(1, 2).reshape(B, T, *chans)
    return y, full[:, full.shape[1] - (W - 1):]


def self_modifying_titans(
    x: Tensor,
    *,
    params: Mapping[str, Sequence[Tensor]],
    chunk_size: int,
    gen_chunk_size: int,
    q: Optional[Tensor] = None,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    eta_logits: Optional[Tensor] = None,
    alpha_logits: Optional[Tensor] = None,
    beta_momentum=None,
    eta_scale: float = 1.0,
    eta_bias=0.0,
    alpha_bias=0.0,
    retention: bool = True,
    conv_weight: Optional[Tensor] = None,
    qk_norm: bool = True,
    rule: str = "dgd",
    objective: str = "l2",
    read: str = "anchor",
    activation: str = "gelu",
    residual: bool = True,
    detach: bool = False,
    initial_state: Optional[SelfModifyingState] = None,
    output_final_state: bool = False,
    impl: str = "chunked",
) -> MemoryOutput:
    """Self-modifying Titans over ``x [B, T, H, D]`` (see the module docstring).

    Args:
        params: ``{"memory": (W_2, W_1), "k": .., "v": .., "q": .., "eta": .., "alpha": ..}``: the
            (meta-learned) initial weights of M_memory and of every *generated* input, each
            ``[H, d_out, d_in]`` or ``[B, H, d_out, d_in]``. Ignored when ``initial_state`` is given
            except to know which inputs are generated.
        chunk_size: M_memory's chunk size. gen_chunk_size: the generating memories' chunk size.
        q, k, v, eta_logits, alpha_logits: static inputs for those not generated.
        beta_momentum: momentum decay (None = no momentum).
        eta_scale, eta_bias, alpha_bias: the gates' squashing (numbers or tensors, e.g. learnable).
        retention: False fixes alpha = 1.
        conv_weight: ``[H, D, W]`` causal depthwise conv on x (None = no conv).
        qk_norm: L2-normalise k and q.
        rule: ``"dgd"`` or ``"gd"``. objective: ``"l2"`` or ``"dot"``. read: ``"anchor"`` or
            ``"running"`` (M_memory's output read).
        detach: writes are constants for autograd.
        initial_state / output_final_state: a :class:`SelfModifyingState` to continue a stream.
        impl: ``"chunked"`` (default) or ``"reference"``.

    Returns:
        ``MemoryOutput(y [B, T, H, D] in x's dtype, final_state or None)``.
    """
    fn = dispatch(_OP, impl, {"chunked": _chunked, "reference": _reference})
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{_OP}: x must be a [B, T, H, D] tensor")
    B, T, H, D = x.shape
    Cm = check_chunk_size(_OP, chunk_size)
    Cg = check_chunk_size(_OP, gen_chunk_size, "gen_chunk_size")
    for name, val, ok in (("rule", rule, ("gd", "dgd")), ("objective", objective, ("l2", "dot")),
                          ("read", read, ("anchor", "running")), ("activation", activation, ACTIVATIONS)):
        if val not in ok:
            raise ValueError(f"{_OP}: {name} must be one of {ok}, got {val!r}")
    if "memory" not in params:
        raise ValueError(f"{_OP}: params needs the main memory's initial weights under 'memory'")
    static = {"k": k, "v": v, "q": q, "eta": eta_logits, "alpha": alpha_logits}
    unknown = set(params) - set(GENERATED) - {"memory"}
    if unknown:
        raise ValueError(f"{_OP}: unknown memories in params: {sorted(unknown)}")
    gen = []
    for name in GENERATED:
        if name == "alpha" and not retention:
            if "alpha" in params or alpha_logits is not None:
                raise ValueError(f"{_OP}: retention=False fixes alpha = 1: drop params['alpha'] / alpha_logits")
            continue
        has_mem, has_static = name in params, static[name] is not None
        if has_mem == has_static:
            label = name if name in _VEC else f"{name}_logits"
            raise ValueError(
                f"{_OP}: {name} must come from exactly one source: params[{name!r}] (generated) "
                f"or the static {label} argument"
            )
        if has_mem:
            gen.append(name)
        else:
            want = (B, T, H, D) if name in _VEC else (B, T, H)
            if tuple(static[name].shape) != want:
                raise ValueError(f"{_OP}: static {name} must have shape {want}, got {tuple(static[name].shape)}")

    def resid(name):
        return residual if name in _VEC + ("memory",) else False

    names = gen + ["memory"]
    if initial_state is not None:
        if not isinstance(initial_state, SelfModifyingState):
            raise TypeError(f"{_OP}: initial_state must be a SelfModifyingState")
        if set(initial_state.weights) != set(names):
            raise ValueError(
                f"{_OP}: initial_state holds memories {sorted(initial_state.weights)}, expected {sorted(names)}"
            )
        offsets = (("offset_gen", initial_state.offset_gen, Cg), ("offset_memory", initial_state.offset_memory, Cm))
        for nm, off, C in offsets:
            if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < C:
                raise ValueError(f"{_OP}: initial_state.{nm} must be an int in [0, {C}), got {off!r}")
        base = {n: tuple(initial_state.weights[n]) for n in names}
    else:
        base = {n: tuple(params[n]) for n in names}
    for n in names:
        d_out = D if n in _VEC + ("memory",) else 1
        check_layers(f"{_OP} (M_{n})", base[n], D, d_out, resid(n), 1)

    gate = lambda g: None if g is None else (  # noqa: E731
        torch.full((B, T, H), float(g), dtype=x.dtype, device=x.device) if isinstance(g, (int, float)) else g)
    beta = gate(beta_momentum)
    if beta is not None and beta.dim() == 4:
        beta = beta.squeeze(-1)
    dt = compute_dtype(x, *(s for s in static.values()), beta, conv_weight,
                       *(w for n in names for w in base[n]))

    def heads(W):  # [H, do, di] / [B, H, do, di] -> [B*H, do, di]
        W = W.to(dt)
        if W.dim() == 3:
            W = W.unsqueeze(0).expand(B, *W.shape)
        return W.reshape(B * H, *W.shape[-2:])

    def seq(t):  # [B, T, H, *] -> [B*H, T, *]
        t = t.to(dt)
        return t.transpose(1, 2).reshape(B * H, T, *t.shape[3:])

    ws = {n: [heads(W) for W in base[n]] for n in names}
    if initial_state is not None:
        anchor = {n: [heads(W) for W in initial_state.anchor[n]] for n in names}
        if beta is not None and initial_state.momentum is not None:
            ms = {n: [heads(M) for M in initial_state.momentum[n]] for n in names}
        else:
            ms = {n: [torch.zeros_like(W) for W in ws[n]] for n in names} if beta is not None else None
        offs = (initial_state.offset_gen, initial_state.offset_memory)
        conv_state = initial_state.conv
    else:
        anchor = {n: list(ws[n]) for n in names}
        ms = {n: [torch.zeros_like(W) for W in ws[n]] for n in names} if beta is not None else None
        offs = (0, 0)
        conv_state = None

    xc = x.to(dt)
    new_conv = None
    if conv_weight is not None:
        if conv_weight.dim() != 3 or tuple(conv_weight.shape[:2]) != (H, D):
            raise ValueError(f"{_OP}: conv_weight must be [H, D, W] = [{H}, {D}, W], got {tuple(conv_weight.shape)}")
        xc, new_conv = causal_conv1d(xc, conv_weight.to(dt), conv_state)
    inputs = {"x": seq(xc)}
    for n in GENERATED:
        if n not in gen and static[n] is not None:
            inputs[n] = seq(static[n])
    if beta is not None:
        inputs["beta"] = seq(beta)

    st = None
    if detach:
        st = {n: [W - W.detach() for W in ws[n]] for n in names}
        ws = {n: [W.detach() for W in ws[n]] for n in names}
        anchor = {n: [W.detach() for W in anchor[n]] for n in names}
        ms = None if ms is None else {n: [M.detach() for M in ms[n]] for n in names}

    cfg = dict(gen=gen, objective=objective, rule=rule, act=activation, residual=residual, read=read,
               qk_norm=qk_norm, eta_scale=eta_scale, eta_bias=eta_bias, alpha_bias=alpha_bias,
               retention=retention, detach=detach, Cg=Cg, Cm=Cm)
    y, ws, anchor, ms, offs = fn(inputs, ws, anchor, ms, offs, st, cfg)
    y = y.reshape(B, H, T, D).transpose(1, 2).to(x.dtype)
    state = None
    if output_final_state:
        back = lambda d: {n: tuple(W.reshape(B, H, *W.shape[-2:]) for W in d[n]) for n in names}  # noqa: E731
        state = SelfModifyingState(back(ws), back(anchor), None if ms is None else back(ms),
                                   offs[0], offs[1], new_conv)
    return MemoryOutput(y, state)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------

def _gates(zeta, zalpha, cfg):
    eta = cfg["eta_scale"] * F.softplus(zeta + cfg["eta_bias"])
    alpha = torch.sigmoid(zalpha + cfg["alpha_bias"]) if cfg["retention"] else None
    return eta, alpha


def _normalize(t, cfg):
    return F.normalize(t, dim=-1) if cfg["qk_norm"] else t


# --------------------------------------------------------------------------------------------
# chunked
# --------------------------------------------------------------------------------------------

def _plan(ws, cfg):
    """Stack every memory with the same hidden widths into one group (generating memories first,
    M_memory last): one chunk_step per piece for all of them. Scalar memories (M_eta, M_alpha)
    get their output matrix zero-padded to D rows (the padded outputs and targets are exactly 0,
    so their gradients and rows stay 0) and a residual mask of 0."""
    groups: dict = {}
    for n in cfg["gen"] + ["memory"]:
        key = tuple(W.shape[-2] for W in ws[n][:-1])
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _stack(d, names, D):
    def pad(W, n):
        return F.pad(W, (0, 0, 0, D - W.shape[-2])) if n in _SCA else W
    L = len(d[names[0]])
    return [torch.cat([pad(d[n][i], n) if i == L - 1 else d[n][i] for n in names], dim=0) for i in range(L)]


def _unstack(stacked, names, N):
    out = {}
    for j, n in enumerate(names):
        ws = [W[j * N:(j + 1) * N] for W in stacked]
        if n in _SCA:
            ws[-1] = ws[-1][:, :1]
        out[n] = ws
    return out


def _chunked(inputs, ws, anchor, ms, offs, st, cfg):
    act, detach = cfg["act"], cfg["detach"]
    xs = inputs["x"]
    N, T, D = xs.shape
    G = []
    for names in _plan(ws, cfg):
        res_rows = [cfg["residual"] if n in _VEC + ("memory",) else False for n in names]
        residual = (res_rows[0] if len(set(res_rows)) == 1 else
                    torch.tensor(res_rows, dtype=xs.dtype, device=xs.device).repeat_interleave(N))
        n_gen = sum(n != "memory" for n in names)
        G.append(dict(
            names=names, n_gen=n_gen, has_mem="memory" in names, residual=residual,
            ws=_stack(ws, names, D), anchor=_stack(anchor, names, D),
            ms=None if ms is None else _stack(ms, names, D), st=None if st is None else _stack(st, names, D),
        ))
    off_g, off_m = offs
    Cg, Cm = cfg["Cg"], cfg["Cm"]

    def re_anchor(g, gen_rows: bool, mem_rows: bool):
        cut = g["n_gen"] * N
        if gen_rows and (mem_rows or not g["has_mem"]) or mem_rows and g["n_gen"] == 0:
            g["anchor"] = g["ws"]
        elif gen_rows and g["n_gen"]:
            g["anchor"] = [torch.cat([w[:cut], a[cut:]]) for w, a in zip(g["ws"], g["anchor"])]
        elif mem_rows and g["has_mem"]:
            g["anchor"] = [torch.cat([a[:cut], w[cut:]]) for w, a in zip(g["ws"], g["anchor"])]

    ys = []
    lens = segment_lengths(T, [(off_g, Cg), (off_m, Cm)])
    parts = {n: split_time(z, lens) for n, z in inputs.items()}
    for j, L in enumerate(lens):
        for g in G:
            re_anchor(g, off_g == 0, off_m == 0)
        xt = parts["x"][j]
        # generated inputs, read at the generating memories' anchor
        got = {n: parts[n][j] for n in ("k", "v", "q", "eta", "alpha") if n in parts}
        for g in G:
            if not g["n_gen"]:
                continue
            cut = g["n_gen"] * N
            rw = [w[:cut] for w in g["anchor"]]
            if g["st"] is not None:
                rw = [w + s[:cut] for w, s in zip(rw, g["st"])]
            res = g["residual"][:cut] if isinstance(g["residual"], Tensor) else g["residual"]
            out = mlp_forward(rw, xt.repeat(g["n_gen"], 1, 1), act, res)[0]
            for i, n in enumerate(g["names"][:g["n_gen"]]):
                o = out[i * N:(i + 1) * N]
                got[n] = o[..., 0] if n in _SCA else o
        k_, v_, q_ = _normalize(got["k"], cfg), got["v"], _normalize(got["q"], cfg)
        eta, alpha = _gates(got["eta"], got.get("alpha"), cfg)
        beta = parts["beta"][j] if "beta" in parts else None
        if detach:
            k_, v_, eta = k_.detach(), v_.detach(), eta.detach()
            alpha = None if alpha is None else alpha.detach()
            beta = None if beta is None else beta.detach()
        for g in G:
            r = len(g["names"])
            rep = lambda z: None if z is None else z.repeat(r, *([1] * (z.dim() - 1)))  # noqa: E731
            o, g["ws"], g["ms"] = chunk_step(
                g["ws"], g["ms"], g["anchor"], rep(k_), rep(v_), rep(eta), rep(alpha), rep(beta),
                q_ if g["has_mem"] else None,
                objective=cfg["objective"], signal="self", rule=cfg["rule"], act=act,
                residual=g["residual"], read=cfg["read"], st=g["st"],
                read_rows=slice(g["n_gen"] * N, (g["n_gen"] + 1) * N),
            )
            if g["has_mem"]:
                ys.append(o)
        off_g = (off_g + L) % Cg
        off_m = (off_m + L) % Cm
    for g in G:
        re_anchor(g, off_g == 0, off_m == 0)
    ws_o, an_o, ms_o = {}, {}, ({} if ms is not None else None)
    for g in G:
        ws_o.update(_unstack(g["ws"], g["names"], N))
        an_o.update(_unstack(g["anchor"], g["names"], N))
        if ms is not None:
            ms_o.update(_unstack(g["ms"], g["names"], N))
    return torch.cat(ys, dim=1), ws_o, an_o, ms_o, (off_g, off_m)


# --------------------------------------------------------------------------------------------
# reference: token by token
# --------------------------------------------------------------------------------------------

def _reference(inputs, ws, anchor, ms, offs, st, cfg):
    act, detach, rule = cfg["act"], cfg["detach"], cfg["rule"]
    xs = inputs["x"]
    N, T, _ = xs.shape
    names = list(ws)
    res = {n: (cfg["residual"] if n in _VEC + ("memory",) else False) for n in names}
    grad_fns = {
        r: torch.func.vmap(torch.func.grad(functools.partial(
            _single_loss, objective=cfg["objective"], act=act, residual=r)))
        for r in (True, False)
    }
    ws = {n: tuple(w) for n, w in ws.items()}
    anchor = {n: tuple(w) for n, w in anchor.items()}
    ms = None if ms is None else {n: tuple(m) for n, m in ms.items()}
    off_g, off_m = offs
    Cg, Cm = cfg["Cg"], cfg["Cm"]

    def apply(weights, z, n, with_st=True):
        if with_st and st is not None:
            weights = [w + s for w, s in zip(weights, st[n])]
        return mlp_forward(weights, z.unsqueeze(1), act, res[n])[0].squeeze(1)

    ys = []
    for t in range(T):
        if off_g == 0:
            for n in cfg["gen"]:
                anchor[n] = ws[n]
        if off_m == 0:
            anchor["memory"] = ws["memory"]
        got = {n: inputs[n][:, t] for n in ("k", "v", "q", "eta", "alpha") if n in inputs}
        for n in cfg["gen"]:
            o = apply(anchor[n], xs[:, t], n)
            got[n] = o.squeeze(-1) if n in _SCA else o
        kt, vt, qt = _normalize(got["k"], cfg), got["v"], _normalize(got["q"], cfg)
        eta, alpha = _gates(got["eta"], got.get("alpha"), cfg)
        beta = inputs["beta"][:, t] if "beta" in inputs else None
        if detach:
            kt, vt, eta = kt.detach(), vt.detach(), eta.detach()
            alpha = None if alpha is None else alpha.detach()
            beta = None if beta is None else beta.detach()
        if cfg["read"] == "anchor":
            ys.append(apply(anchor["memory"], qt, "memory"))
        e = eta[:, None, None]
        a = 1.0 if alpha is None else alpha[:, None, None]
        new_ws, new_ms = {}, {}
        for n in names:
            target = apply(anchor[n], vt, n, with_st=False)          # v^ = M_a(v)   (Eq. 87)
            grads = grad_fns[res[n]](anchor[n], kt, target)
            lw, lm = [], []
            for i, (W, g) in enumerate(zip(ws[n], grads)):
                r = -e * g
                if ms is not None:
                    r = beta[:, None, None] * ms[n][i] + r
                    lm.append(r)
                if rule == "dgd" and i == 0:
                    W = a * W - e * (W @ kt.unsqueeze(-1)) * kt.unsqueeze(-2) + r
                else:
                    W = a * W + r
                lw.append(W)
            new_ws[n] = tuple(lw)
            new_ms[n] = tuple(lm)
        ws = new_ws
        if ms is not None:
            ms = new_ms
        if cfg["read"] == "running":
            ys.append(apply(ws["memory"], qt, "memory"))
        off_g = (off_g + 1) % Cg
        off_m = (off_m + 1) % Cm
    if off_g == 0:
        for n in cfg["gen"]:
            anchor[n] = ws[n]
    if off_m == 0:
        anchor["memory"] = ws["memory"]
    return torch.stack(ys, dim=1), ws, anchor, ms, (off_g, off_m)
