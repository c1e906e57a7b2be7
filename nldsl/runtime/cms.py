r"""The Continuum Memory System (NL section 7.1, Eq. 70-74; section 7.3).

A CMS is ``n`` MLP blocks ``MLP^(1) .. MLP^(n)`` with periods ``C_1, .., C_n`` (fastest first, the
order of Fig. 5). Block l's weights are constant inside each of its chunks (``C_l`` consecutive
tokens from the start of the stream) and, at the end of every chunk, take one step on the sum of
its per-token gradients over exactly that chunk, all evaluated at the chunk-start weights
(Eq. 71 with the sum over the chunk's C_l tokens):

    theta_l <- theta_l - sum_{t in chunk} eta_{l,t} grad_theta L_l(theta_l^{chunk start}; t)

Eq. 71's sum is "the error component of an arbitrary optimizer"; besides gradient descent a
block may take its steps with momentum and weight decay (``momentum=beta``, ``retention=alpha``,
constants per block): a block's optimizer steps once per chunk, on the chunk's summed gradient
``G``, as an outer optimizer steps once per accumulated batch:

    m_l <- beta_l m_l + G,    theta_l <- alpha_l theta_l - m_l

(``beta = 0``, ``alpha = 1``: plain GD). With either, a block still moves at a boundary whose
chunk wrote nothing (decay, or the momentum of earlier chunks), so ``lr = 0`` keeps it at its
initial weights only without them.

Reads always use the chunk-start weights (``read anchor``; the paper's definition). A ``running``
read is not offered: with the ``surprise`` signal propagated through the chain it would make a
token's read depend on its own write (use :func:`nldsl.runtime.deep_memory.mlp_memory` per level for
running-read memories with given targets).

Each block is ``M(x) = x + W_L act(... act(W_1 x))`` (``residual``), or with ``prenorm="rms"``
``M(x) = x + W_L act(... act(W_1 rms(x)))``, ``rms(x) = x / sqrt(mean(x^2) + 1e-6)`` (no gain:
``W_1`` absorbs one). The pre-norm keeps every block's input at unit scale, so a chain of
near-identity residual blocks does not compound its input's scale (without it, two or three
chained blocks kept even Titans at chance on MQAR in our runs). The block's weights are trained
on the normalised input; the surprise passes the norm's Jacobian. Weights ``[d_out, d_in]`` in
application order (see :mod:`nldsl.runtime.deep_memory`), shared by the batch (``[d_out, d_in]``:
meta-learned Parameters or a pretrained MLP's weights, section 7.3) or per sequence
(``[B, d_out, d_in]``). The state is always per sequence. The chunked implementation keeps
shared weights as they are until a block's first step makes them per sequence: a block reads
them with one product over every sequence's tokens, and their outer gradient is one product
too (not one per sequence, then a sum). A state holds them as a broadcast view
(:func:`batch_view`) that a call continuing from it recognises, and a gradient sum that is
exactly zero (a block that just stepped) as a recognised broadcast zero (:func:`zero_sum`).

Variants (``variant=``):

* ``"sequential"`` (Eq. 70, 73): ``y = MLP^(n)(...MLP^(1)(x))``; every initial state is an
  argument (meta-learned by the outer level through backprop).
* ``"nested"`` (Eq. 72): the same chain, and block l is re-initialised to its initial weights
  ``params[l]`` at every chunk boundary of the next slower block l+1, i.e. after every
  ``C_{l+1} / C_l`` of its own chunks (the slower level's context is the faster level's episode;
  the update block l would take at that boundary is discarded). Periods must divide each other.
  The slowest block never resets.
* ``"independent"`` (Eq. 74, head-wise): every block reads the same input,
  ``y = sum_l w_l MLP^(l)(x)`` with ``agg_weights`` ``w`` (a ``[n]`` tensor, e.g. learnable; None = 1).

Signal (``signal=``), i.e. what ``L_l`` is (``eta_{l,t}`` = ``lr``):

* ``"values"``: ``target`` (one ``[B, T, D_out]`` tensor for every block, or one per block) is
  regressed: ``L_l = 1/2 ||y_l - target_l||^2`` (``objective="l2"``) or ``-<y_l, target_l>``
  (``"dot"``).
* ``"self"``: the block regresses its own transform of the given values,
  ``target_l = MLP^(l)_anchor(values_l)`` (``target`` holds the values, NL Eq. 87).
* ``"surprise"``: the local surprise signal of an outer objective, ``L_l = <y_l, delta_l>`` (its
  gradient at the block output is ``delta_l``; ``objective`` is ignored). ``delta`` is either one
  tensor per block (``delta_l = dL/dy_l`` computed by the caller, e.g. from a first forward pass)
  or a single ``[B, T, D]`` tensor: the surprise at the *chain output*, which the op propagates to
  every block output through the downstream blocks at their current weights (exact local
  surprise ``delta_l = J_{l+1}^T .. J_n^T delta``, NL section 3.3's "knowledge transfer via
  backpropagation"; for ``independent``, ``delta_l = w_l delta``).

Using the surprise signal in training: the outer gradient needs the outputs first. Either pass
the chain-output surprise once (the op propagates it, causally, at the weights each token was
read with), or take two passes: (1) run with ``lr=0`` (or ``detach``) and ``return_info=True``,
(2) ``delta_l = torch.autograd.grad(loss, info.outputs)``, (3) run again from the same state
with ``delta=[delta_l]`` to take the steps and carry the new state.

Pretrained blocks (section 7.3): the weights are in ``nn.Linear.weight`` layout, so an MLP
``fc2(act(fc1(x)))`` without biases is ``(fc1.weight, fc2.weight)`` (``residual=False`` unless
the block adds its input). ``lr = 0`` leaves every block exactly at its initial weights: the CMS is then the static
(pretrained) MLP chain (section 7.3). State (:class:`CmsState`): per block the current weights,
the pending gradient sum of the current chunk and the offset inside it, so a stream split
anywhere continues exactly. ``return_info=True`` adds a :class:`CmsInfo` with every block's
output and the positions at which each block updated / was reset (probing the periods).

Differentiability as in :mod:`nldsl.runtime.deep_memory`: writes are differentiable by default;
``detach=True`` makes them constants (first-order "meta + delta": gradients still reach x, the
aggregation weights and, straight through, the starting weights: a call continuing a detached
call's state sends them to the weights that stream started from, not to the state between).

Implementations: ``"reference"`` (token loop, inner gradients by ``torch.func.grad`` of the
per-token objective, the chain-output surprise by differentiating ``<y, delta>`` through the
whole chain), ``"chunked"`` (a loop over the pieces between consecutive level boundaries;
every piece is a static MLP chain batched over its tokens, with a closed-form backward whose
rank-1 per-token gradients are summed by one matmul per layer; on a CPU, detached two-layer
blocks read, backpropagate and write as C calls over torch's BLAS, :mod:`._cms_block`) and
``"triton"`` (``"chunked"`` with each block's forward, errors and chunk sums from the fused Triton
MLP kernel: two-layer blocks).
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakTensorKeyDictionary

from nldsl.runtime import _cms_block, _mlp_write
from nldsl.runtime import _native as native
from nldsl.runtime._common import check_kernel_objective, check_objective, compute_dtype, dispatch, objective_loss
from nldsl.runtime.deep_memory import (
    ACTIVATIONS,
    _bmm,
    _times_transposed,
    check_layers,
    hidden,
    hidden_act,
    mlp_backward,
    mlp_forward,
    output_error,
    segment_lengths,
    split_time,
)

__all__ = ["cms_chain", "CmsState", "CmsInfo", "CmsOutput"]

_OP = "cms_chain"


class CmsState(NamedTuple):
    """weights: per block, the current (chunk-start) weights ``[B, d_out, d_in]`` per layer;
    grad_sum: per block, ``sum eta_t grad_t`` over the consumed tokens of the current chunk;
    offset: per block, tokens of its current chunk already consumed; momentum: per block, its
    momentum per layer (None without momentum)."""

    weights: tuple
    grad_sum: tuple
    offset: tuple
    momentum: Optional[tuple] = None


class CmsInfo(NamedTuple):
    """outputs: every block's output ``[B, T, D]``; updates / resets: per block, the token
    indices (0-based, within this call) after which the block stepped / was re-initialised."""

    outputs: tuple
    updates: tuple
    resets: tuple


class CmsOutput(NamedTuple):
    o: Tensor
    final_state: Optional[CmsState]
    info: Optional[CmsInfo]


def _per_level(name: str, x, n: int, required: bool):
    if x is None:
        if required:
            raise ValueError(f"{_OP}: this signal needs {name}")
        return None
    if isinstance(x, Tensor):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{_OP}: {name} must be one tensor or one per level ({n}), got {len(x)}")
    return x


def _rates(name: str, value, n: int) -> list:
    """Per block, a momentum decay / retention (None: none) from one number or one per block.
    Any finite number runs (the checker warns about values outside [0, 1])."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{_OP}: {name} must be one number or one per block ({n}), got {len(values)}")
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{_OP}: {name} must be a finite number (or None), got {v!r}")
    return [None if v is None else float(v) for v in values]


def cms_chain(
    x: Tensor,
    params: Sequence[Sequence[Tensor]],
    *,
    periods: Sequence[int],
    lr,
    variant: str = "sequential",
    signal: str = "surprise",
    delta=None,
    target=None,
    objective: str = "l2",
    p: Optional[float] = None,
    huber_delta: Optional[float] = None,
    agg_weights: Optional[Tensor] = None,
    momentum=None,
    retention=None,
    activation: str = "gelu",
    hidden_norm: str = "none",
    prenorm: str = "none",
    residual: bool = True,
    detach: bool = False,
    initial_state: Optional[CmsState] = None,
    output_final_state: bool = False,
    return_info: bool = False,
    impl: str = "chunked",
    kernel=None,
) -> CmsOutput:
    """Run a CMS over ``x [B, T, D]`` (see the module docstring).

    Args:
        params: per block, its weights in application order (``[d_out, d_in]`` or
            ``[B, d_out, d_in]``); the initial state (and the reset value of ``nested``).
        periods: per block, its chunk size C_l (fastest first).
        lr: one number / ``[B, T]`` tensor for every block, or one per block.
        variant: ``"sequential"``, ``"nested"`` or ``"independent"``.
        signal: ``"values"``, ``"self"`` or ``"surprise"``; ``delta`` / ``target`` as described.
        objective: ``"l2"``, ``"dot"``, ``"l1"``, ``"lp"`` (exponent ``p``) or ``"huber"`` (threshold
            ``huber_delta``, default 1) (values / self signals; the Triton kernel takes l2 and dot).
        prenorm: ``"none"`` or ``"rms"``: RMS-normalise each block's input (the residual adds
            the input itself).
        agg_weights: ``[n]`` weights of the independent variant's sum (None = plain sum).
        momentum, retention: the blocks' momentum decay beta and weight decay alpha, fractions in
            [0, 1] (None: none), one number for every block or one per block (None entries: none).
        detach: writes are constants for autograd.
        initial_state: a :class:`CmsState` to continue a stream.
        impl: ``"chunked"`` (default), ``"reference"`` or ``"triton"`` (the chunked path with every
            block's forward, errors and chunk-summed gradients from the fused Triton MLP kernel).
        kernel: with ``impl="triton"``, the :class:`~nldsl.runtime._triton.MlpKernel` to run (a
            compiled spec's; rendered for each block's dims); None renders one for this call.

    Returns:
        ``CmsOutput(o [B, T, D_out] in x's dtype, final_state or None, info or None)``.
    """
    return _cms_chain(x, params, periods=periods, lr=lr, variant=variant, signal=signal, delta=delta,
                      target=target, objective=objective, p=p, huber_delta=huber_delta,
                      agg_weights=agg_weights, momentum=momentum, retention=retention, activation=activation,
                      hidden_norm=hidden_norm, prenorm=prenorm, residual=residual, detach=detach,
                      initial_state=initial_state, output_final_state=output_final_state,
                      return_info=return_info, impl=impl, kernel=kernel)


def _cms_chain(x, params, *, periods, lr, variant="sequential", signal="surprise", delta=None, target=None,
               objective="l2", p=None, huber_delta=None, agg_weights=None, momentum=None, retention=None,
               activation="gelu", hidden_norm="none", prenorm="none", residual=True,
               detach=False, initial_state=None, output_final_state=False, return_info=False, impl="chunked",
               kernel=None, record=None, reuse=None, donate=False) -> CmsOutput:
    """:func:`cms_chain`, plus a way for a caller that runs the same piece twice (a read pass, then
    the writes from the same state and input: :class:`nldsl.nn.deep.CmsChain`) to skip the second
    forward. ``record``: a list that receives, per piece, every block's forward ``(y, hidden
    pre-activations, layer inputs, 1 / rms of the block input or None)``, detached (chunked impl
    only). ``reuse``: such a list from a call with the same ``x``, state, weights and
    ``detach=True``: its forwards stand in for this call's (the same values); this call's output
    then carries no gradient (use its state). ``donate``: nothing else holds ``initial_state``'s
    gradient sums (the caller made them and drops the state), so they may be accumulated in place."""
    fn = dispatch(_OP, impl, {"chunked": _chunked, "reference": _reference, "triton": _chunked})
    if kernel is not None and impl != "triton":
        raise ValueError(f"{_OP}: kernel= is used with impl='triton' only (impl={impl!r})")
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"{_OP}: x must be a [B, T, D] tensor")
    B, T, D = x.shape
    n = len(params)
    if n < 1 or len(periods) != n:
        raise ValueError(f"{_OP}: need one entry of periods per block ({n} blocks, {len(periods)} periods)")
    periods = tuple(periods)
    for period in periods:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"{_OP}: periods must be positive ints, got {periods}")
    if variant not in ("sequential", "nested", "independent"):
        raise ValueError(f"{_OP}: variant must be 'sequential', 'nested' or 'independent', got {variant!r}")
    if variant == "nested" and any(periods[i + 1] % periods[i] for i in range(n - 1)):
        raise ValueError(f"{_OP}: the nested variant needs each period to divide the next, got {periods}")
    if signal not in ("values", "self", "surprise"):
        raise ValueError(f"{_OP}: signal must be 'values', 'self' or 'surprise', got {signal!r}")
    check_objective(_OP, objective, p, huber_delta)
    check_kernel_objective(_OP, impl, objective)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if prenorm not in ("none", "rms"):
        raise ValueError(f"{_OP}: prenorm must be 'none' or 'rms', got {prenorm!r}")

    d_in = D
    for l, ws in enumerate(params):
        d_out = ws[-1].shape[-2]
        check_layers(f"{_OP} (block {l})", list(ws), d_in if variant != "independent" else D, d_out, residual, 0)
        if variant != "independent":
            d_in = d_out
    if variant == "independent" and len({ws[-1].shape[-2] for ws in params}) != 1:
        raise ValueError(f"{_OP}: the independent variant sums the blocks: they need one output dim")

    single_delta = signal == "surprise" and isinstance(delta, Tensor)
    deltas = _per_level("delta", delta, n, signal == "surprise")
    targets = _per_level("target", target, n, signal in ("values", "self"))
    lrs = _per_level("lr", lr if isinstance(lr, (list, tuple)) else [lr] * n, n, True)
    betas, alphas = _rates("momentum", momentum, n), _rates("retention", retention, n)

    dt = compute_dtype(x, *(w for ws in params for w in ws), *(d for d in deltas or [] if isinstance(d, Tensor)),
                       *(t for t in targets or [] if isinstance(t, Tensor)), agg_weights)
    etas = []  # per block a [B, T] tensor, or a number (the chunked path scales by it as it is)
    for l, e in enumerate(lrs):
        if isinstance(e, (int, float)) and not isinstance(e, bool):
            etas.append(float(e) if impl == "chunked" else torch.full((B, T), float(e), dtype=dt, device=x.device))
        elif isinstance(e, Tensor):
            e = e.to(dt)
            if e.dim() == 3 and e.shape[-1] == 1:
                e = e.squeeze(-1)
            if tuple(e.shape) != (B, T):
                raise ValueError(f"{_OP}: lr of block {l} must be a number or a [B, T] tensor, got {tuple(e.shape)}")
            etas.append(e)
        else:
            raise TypeError(f"{_OP}: lr of block {l} must be a number or a [B, T] tensor")

    def batched(W: Tensor) -> Tensor:
        W = W.to(dt)
        # the chunked path reads a weight shared by the batch as it is: one product over every
        # sequence's tokens, and one for its gradient (see the module docstring)
        return W.unsqueeze(0).expand(B, *W.shape) if W.dim() == 2 and impl != "chunked" else W

    init = [[batched(W) for W in ws] for ws in params]
    if initial_state is not None:
        if not isinstance(initial_state, CmsState) or len(initial_state.weights) != n:
            raise TypeError(f"{_OP}: initial_state must be a CmsState with {n} blocks")
        ws = [[(_SHARED.get(W, W) if impl == "chunked" else W).to(dt) for W in lw] for lw in initial_state.weights]
        gs = [[None if G in _ZEROS else G.to(dt) for G in lg] for lg in initial_state.grad_sum]
        offs = list(initial_state.offset)
        for l, o in enumerate(offs):
            if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < periods[l]:
                raise ValueError(f"{_OP}: initial_state.offset[{l}] must be an int in [0, {periods[l]}), got {o!r}")
    else:
        ws = [list(lw) for lw in init]
        gs = [[None] * len(lw) for lw in ws]  # None: a gradient sum that is still exactly zero
        offs = [0] * n
    # per block its momentum per layer (None entries: exact zeros), None for a block without one
    ms = [None if b is None else [None] * len(lw) for b, lw in zip(betas, ws)]
    if initial_state is not None and any(b is not None for b in betas):
        if initial_state.momentum is None or len(initial_state.momentum) != n:
            raise ValueError(f"{_OP}: initial_state carries no momentum for its {n} blocks (a call without "
                             "momentum made it)")
        ms = [None if b is None else [None if M in _ZEROS else M.to(dt) for M in lm]
              for b, lm in zip(betas, initial_state.momentum)]

    xs = x.to(dt)
    deltas = None if deltas is None else [d.to(dt) for d in deltas]
    targets = None if targets is None else [t.to(dt) for t in targets]
    agg = None if agg_weights is None else agg_weights.to(dt)
    st = None
    if detach:
        st = [[_StraightThrough(W) if W.requires_grad else None for W in lw] for lw in ws]
        ws = [[W.detach() if S is None else S.detached for W, S in zip(lw, ls)] for lw, ls in zip(ws, st)]
        gs = [[None if G is None else G.detach() for G in lg] for lg in gs]
        ms = [None if lm is None else [None if M is None else M.detach() for M in lm] for lm in ms]
        init = [[W.detach() for W in lw] for lw in init]
        etas = [e.detach() if isinstance(e, Tensor) else e for e in etas]
        deltas = None if deltas is None else [d.detach() for d in deltas]
        targets = None if targets is None else [t.detach() for t in targets]

    # lr 0 everywhere (a number): this call writes nothing, so its errors are never computed
    writes = any(not isinstance(e, (int, float)) or e != 0 for e in lrs)
    if reuse is not None and not (detach and impl != "triton"):
        raise ValueError(f"{_OP}: reuse needs detach=True and the chunked implementation")
    act = hidden_act(hidden_norm, activation)
    kept = _kept_derivative(xs, act, detach, impl)
    cfg = dict(variant=variant, signal=signal, single_delta=single_delta, objective=objective, p=p,
               huber_delta=huber_delta, writes=writes, kept=kept, blocks=_native_blocks(xs, params, kept, impl),
               act=act, residual=residual, prenorm=prenorm == "rms",
               detach=detach, periods=periods, betas=betas, alphas=alphas, kernels=None, info=return_info,
               record=record if impl != "triton" else None, reuse=reuse, donate=donate,
               discard=not (output_final_state or return_info))
    if impl == "triton":
        from nldsl.codegen.kernels import kernel_residual
        from nldsl.runtime._triton import runtime_mlp_kernel

        cfg["kernels"] = [
            runtime_mlp_kernel(_OP, kernel, depth=len(block), d_in=block[0].shape[-1], d_hidden=block[0].shape[-2],
                               d_out=block[-1].shape[-2], activation=activation, hidden_norm=hidden_norm,
                               residual=kernel_residual(residual, prenorm), chunk=min(periods))
            for block in params]
    # ms, like ws, gs and offs, is updated in place at the blocks' boundaries
    y, ws, gs, offs, outputs, updates, resets = fn(xs, ws, gs, ms, offs, init, etas, deltas, targets, agg, st, cfg)
    state = None
    if output_final_state:
        # detached writes keep the straight-through link to the starting weights in the state, so
        # a stream split into calls sends the outer gradient of every read to them, as one call does
        ws = _read_weights(ws, st)
        gs = [[zero_sum(W, B) if G is None else G for W, G in zip(lw, lg)] for lw, lg in zip(ws, gs)]
        ws = [[batch_view(W, B) if W.dim() == 2 else W for W in lw] for lw in ws]
        moms = None
        if any(lm is not None for lm in ms):  # a zero momentum (or a block without one) as a broadcast zero
            moms = tuple(tuple(zero_sum(W, B) if lm is None or lm[i] is None else lm[i] for i, W in enumerate(lw))
                         for lw, lm in zip(ws, ms))
        state = CmsState(tuple(tuple(lw) for lw in ws), tuple(tuple(lg) for lg in gs), tuple(offs), moms)
    info = None
    if return_info:
        info = CmsInfo(tuple(o.to(x.dtype) for o in outputs), tuple(tuple(u) for u in updates),
                       tuple(tuple(r) for r in resets))
    return CmsOutput(y.to(x.dtype), state, info)


#: the broadcast views :func:`batch_view` made, by identity, with the shared weight each stands for
_SHARED = WeakTensorKeyDictionary()
#: the exact-zero gradient sums :func:`zero_sum` made, by identity
_ZEROS = WeakTensorKeyDictionary()


def batch_view(W: Tensor, B: int) -> Tensor:
    """A weight ``W [d_out, d_in]`` shared by the batch as a state's ``[B, d_out, d_in]`` (a view).
    A chunked call continuing from the state reads ``W`` itself again; a view since replaced or
    edited is read per sequence."""
    view = W.unsqueeze(0).expand(B, *W.shape)
    _SHARED[view] = W
    return view


def zero_sum(W: Tensor, B: int) -> Tensor:
    """An exact-zero gradient sum of a block weight ``W`` as a state's ``[B, d_out, d_in]``: a
    broadcast zero (no weight-sized allocation), which a call continuing from the state skips
    (nothing to add to a step or to apply at a boundary); one since replaced is summed as given."""
    zero = W.new_zeros(()).expand(B, *W.shape[-2:])
    _ZEROS[zero] = True
    return zero


class _StraightThrough:
    """The straight-through link of a detached call: a read of the weights ``W`` a block reached
    has the value of ``W`` and sends its gradient to the weights the stream started from (the
    root: this call's starting weights, or, where they are the state of an earlier detached call,
    that call's root; the value and gradient of ``W + (root - root.detach())``), without the
    weight-sized ops of that sum and without a chain of links through the states between calls.
    Weights that need no gradient get no link at all."""

    __slots__ = ("given", "root", "detached")

    def __init__(self, W: Tensor):
        self.given, self.root, self.detached = W, _ROOTS.get(W, W), W.detach()

    def read(self, W: Tensor) -> Tensor:
        """``W`` as a tensor (the state, the reference and Triton reads)."""
        if W is self.detached:
            return self.given
        if W.dim() < self.root.dim():  # shared weights (a nested reset) for per-sequence ones:
            W = W.expand_as(self.root)  # read per sequence, so each sends its own gradient
        linked = _Through.apply(W, self.root)
        _ROOTS[linked] = self.root
        return linked

    def link(self, W: Tensor) -> "_Link":
        """``W`` for the chunked reads' products (:class:`_LinkedProduct`)."""
        return _Link(W, self.root)


#: the weights a detached call's state links straight through to, by the state's tensors
_ROOTS = WeakTensorKeyDictionary()


class _Link(NamedTuple):
    """A detached weight ``value`` whose reads send their gradient to ``root``."""

    value: Tensor
    root: Tensor


class _Through(torch.autograd.Function):
    """``W`` (a constant of the detached writes) with its gradient passed to ``start``."""

    @staticmethod
    def forward(ctx, W: Tensor, start: Tensor) -> Tensor:
        ctx.shape = start.shape  # [d_out, d_in] when shared by the batch: the sequences' sum
        return W.view_as(W)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if ctx.needs_input_grad[0] else None), grad.sum_to_size(ctx.shape)


class _LinkedProduct(torch.autograd.Function):
    """``a @ W^T`` for a detached weight ``W`` whose gradient goes to ``root``. With a root shared
    by the batch (``[d_out, d_in]``, the meta-learned weights) that gradient is one product over
    every sequence's tokens, where autograd would take one weight-sized product per sequence (a
    fresh ``[B, d_out, d_in]`` tensor a read) and sum them."""

    @staticmethod
    def forward(ctx, a: Tensor, W: Tensor, root: Tensor) -> Tensor:
        ctx.save_for_backward(a, W)
        ctx.shared = root.dim() == 2
        return _times_transposed(a, W)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, W = ctx.saved_tensors
        da = _bmm(g, W) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[2]:
            droot = None
        elif ctx.shared:
            droot = g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        else:
            droot = torch.bmm(g.transpose(-1, -2), a)
        return da, None, droot


def _linked_product(a: Tensor, W) -> Tensor:
    """A block layer's ``a @ W^T`` for a weight or a :class:`_Link`."""
    if isinstance(W, _Link):
        return _LinkedProduct.apply(a, W.value, W.root)
    return _times_transposed(a, W)


def _read_weights(ws, st, links: bool = False):
    """The weights ``ws`` as a detached call reads them: tensors (:meth:`_StraightThrough.read`)
    or, with ``links``, :class:`_Link` reads for the chunked products."""
    if st is None:
        return ws
    return [[W if S is None else S.link(W) if links else S.read(W) for W, S in zip(lw, ls)]
            for lw, ls in zip(ws, st)]


def _add(G, S):
    """``G + S`` for a gradient sum ``G`` that may still be an exact zero (None)."""
    return S if G is None else G + S


def _rank1_factors(eta, e, a):
    """``(left, right)`` with ``left @ right = sum_t eta_t e_t a_t^T`` (eta scales the narrower factor)."""
    if e.shape[-1] <= a.shape[-1]:
        return (eta * e).transpose(-1, -2), a
    return e.transpose(-1, -2), eta * a


def _sum_rank1(G, eta, e, a, own: bool = False):
    """``G + sum_t eta_t e_t a_t^T`` (one matmul). ``own``: nothing else holds G (this call made it,
    or the caller handed the state over), so a constant G is accumulated in place."""
    left, right = _rank1_factors(eta, e, a)
    if G is None:
        return left @ right
    if own and not G.requires_grad and 0 not in G.stride():
        return G.baddbmm_(left, right)
    return torch.baddbmm(G, left, right)


def _step(W, G, eta, e, a, own: bool = False):
    """``W - (G + sum_t eta_t e_t a_t^T)``: a block's step at the end of its chunk, with the last
    piece's sum in the same product (no sum is materialised when G is still zero)."""
    if G is None:
        return torch.baddbmm(W, *_rank1_factors(eta, e, a), alpha=-1)
    return W - _sum_rank1(G, eta, e, a, own)


_RMS_EPS = 1e-6


def _rms(x):
    """``(x / rms(x), 1 / rms(x))`` over the last dim."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _RMS_EPS)
    return x * r, r


def _rms_backward(xn, r, g):
    """dL/dx from dL/d(x / rms(x)) = ``g``: ``r (g - xn mean(g xn))``."""
    return r * (g - xn * (g * xn).mean(-1, keepdim=True))


class _KeptDerivative(torch.autograd.Function):
    """``(act(h), act'(h))`` by the C kernels in one pass (``activations``, _mlp_write.c): the
    outer backward multiplies by the kept derivative and a detached write's errors reuse it, where
    torch would evaluate act' twice more (gelu's: ~5% of a Hope step on a CPU). Once
    differentiable: only detached writes use it (their errors take no outer gradient)."""

    @staticmethod
    def forward(ctx, h: Tensor, lib, code: int):
        h = h.contiguous()
        a, d = torch.empty_like(h), torch.empty_like(h)
        native.check("_mlp_write", lib.activations(ctypes.c_int64(code), native.pointer(h),
                                                   ctypes.c_int64(h.numel()), native.pointer(a), native.pointer(d),
                                                   None))
        ctx.mark_non_differentiable(d)
        ctx.save_for_backward(d)
        ctx.set_materialize_grads(False)  # (no zeros made for d's gradient, which is never used)
        return a, d

    @staticmethod
    @once_differentiable
    def backward(ctx, ga: Optional[Tensor], _):
        (d,) = ctx.saved_tensors
        return None if ga is None else ga * d, None, None


def _kept_derivative(x: Tensor, act: str, detach: bool, impl: str):
    """The chunked blocks' hidden map ``h -> (act(h), act'(h))`` (:class:`_KeptDerivative`), or None
    (torch's ops): detached writes on tensors the C kernels take, an activation without a norm."""
    if not detach or impl != "chunked" or act not in native.ACTIVATIONS or not native.runs(x):
        return None
    lib = _mlp_write._library(x.dtype)
    if lib is None:
        return None
    code = native.ACTIVATIONS.index(act)
    return lambda h: _KeptDerivative.apply(h, lib, code)


def _native_blocks(x: Tensor, params, kept, impl: str):
    """The C blocks (:mod:`._cms_block`) for a chain whose blocks all take them, or None: the
    chunked path with the kept derivative (detached writes, an activation the C kernels have),
    two-layer blocks that keep the width of ``x``."""
    D = x.shape[-1]
    if kept is None or impl != "chunked" or any(len(ws) != 2 or ws[0].shape[-1] != D or ws[1].shape[-2] != D
                                                for ws in params):
        return None
    return _cms_block.library(x)


def _block_forward(ws, x, cfg):
    """One block on ``x``: ``(y, hidden pre-activations (or with cfg["kept"] their act'), layer
    inputs, 1 / rms(x) or None)``; ``ws``: weights or :class:`_Link` reads."""
    if cfg["blocks"] is not None:
        return _cms_block.read(cfg["blocks"], ws, x, cfg["prenorm"], cfg["residual"],
                               native.ACTIVATIONS.index(cfg["act"]))
    if not cfg["prenorm"]:
        return (*mlp_forward(ws, x, cfg["act"], cfg["residual"], _linked_product, cfg["kept"]), None)
    xn, r = _rms(x)
    y, hs, ins = mlp_forward(ws, xn, cfg["act"], False, _linked_product, cfg["kept"])
    return (y + x if cfg["residual"] else y), hs, ins, r


def _input_error(ws, fw, es, d, cfg):
    """dL/d(block input) from the block's forward ``fw``, its layer errors ``es`` and the
    gradient ``d`` at its output."""
    g = es[0] @ ws[0]
    if fw[3] is not None:
        g = _rms_backward(fw[2][0], fw[3], g)
    return g + d if cfg["residual"] else g


def _detached(fw):
    y, hs, ins, r = fw
    return y.detach(), [h.detach() for h in hs], [a.detach() for a in ins], None if r is None else r.detach()


def _boundaries(L, t, ws, gs, ms, offs, init, cfg, updates, resets):
    """Advance every block by L tokens (the piece ended at token t + L - 1); apply updates and
    nested resets at the boundaries reached."""
    periods = cfg["periods"]
    n = len(ws)
    hit = [False] * n
    for l in range(n):
        offs[l] += L
        if offs[l] == periods[l]:
            if ms[l] is not None:  # m <- beta m + G (None: an exact zero)
                beta = cfg["betas"][l]
                ms[l] = [G if M is None else M * beta if G is None else torch.add(G, M, alpha=beta)
                         for M, G in zip(ms[l], gs[l])]
            steps = gs[l] if ms[l] is None else ms[l]
            alpha = cfg["alphas"][l]
            ws[l] = [W if alpha is None else W * alpha for W in ws[l]]
            ws[l] = [W if S is None else W - S for W, S in zip(ws[l], steps)]
            gs[l] = [None] * len(gs[l])
            offs[l] = 0
            hit[l] = True
            updates[l].append(t + L - 1)
    if cfg["variant"] == "nested":
        for l in range(n - 1):
            if hit[l + 1]:
                ws[l] = list(init[l])
                gs[l] = [None] * len(gs[l])
                if ms[l] is not None:
                    ms[l] = [None] * len(ms[l])
                offs[l] = 0
                resets[l].append(t + L - 1)


def _chunked(x, ws, gs, ms, offs, init, etas, deltas, targets, agg, st, cfg):
    periods, act, kept = cfg["periods"], cfg["act"], cfg["kept"] is not None
    variant, signal = cfg["variant"], cfg["signal"]
    n = len(ws)
    B, T, _ = x.shape
    ys, outs = [], [[] for _ in range(n)]
    updates, resets = [[] for _ in range(n)], [[] for _ in range(n)]
    lens = segment_lengths(T, list(zip(offs, periods)))
    xp = split_time(x, lens)
    ep = [split_time(e, lens) if isinstance(e, Tensor) else [e] * len(lens) for e in etas]
    dp = None if deltas is None else [split_time(d, lens) for d in deltas]
    tp = None if targets is None else [split_time(tg, lens) for tg in targets]
    # the caller's gradient sums are never written in place, unless it handed the state over
    given = [[] for _ in gs] if cfg["donate"] else [list(lg) for lg in gs]
    t = 0
    for j, L in enumerate(lens):
        if cfg["kernels"] is not None:  # impl='triton'
            rws = _read_weights(ws, st)
            out, level_outs, sums = _kernel_piece(
                cfg["kernels"], ws, rws, xp[j], [e[j] for e in ep], None if dp is None else [d[j] for d in dp],
                None if tp is None else [tg[j] for tg in tp], agg, cfg)
            ys.append(out)
            for l in range(n):
                outs[l].append(level_outs[l])
                gs[l] = [_add(G, S.to(W.dtype)) for G, S, W in zip(gs[l], sums[l], ws[l])]
            _boundaries(L, t, ws, gs, ms, offs, init, cfg, updates, resets)
            t += L
            continue
        # forward through the blocks with their (constant) chunk-start weights
        if cfg["reuse"] is not None:  # the same forward, recorded by a read pass
            fw = cfg["reuse"][j]
            for l in range(n):
                outs[l].append(fw[l][0])
        else:
            rws, inp, fw = _read_weights(ws, st, links=True), xp[j], []
            for l in range(n):
                fw.append(_block_forward(rws[l], inp, cfg))
                outs[l].append(fw[l][0])
                if variant != "independent":
                    inp = fw[l][0]
            if cfg["record"] is not None:
                cfg["record"].append([_detached(f) for f in fw])
        if variant == "independent":
            out = sum((fw[l][0] if agg is None else agg[l] * fw[l][0]) for l in range(n))
        else:
            out = fw[-1][0]
        ys.append(out)
        if cfg["discard"] and j == len(lens) - 1:  # no state is returned: the last piece's writes are unseen
            break
        if not cfg["writes"]:
            _boundaries(L, t, ws, gs, ms, offs, init, cfg, updates, resets)
            t += L
            continue
        if cfg["detach"]:
            fw = [_detached(f) for f in fw]
        if (cfg["blocks"] is not None and signal == "surprise" and cfg["single_delta"] and variant != "independent"
                and not any(isinstance(e[j], Tensor) for e in ep)):  # every block's writes in one C call
            _native_learn(ws, gs, ms, offs, fw, dp[0][j], [e[j] for e in ep], given, cfg)
            _boundaries(L, t, ws, gs, ms, offs, init, cfg, updates, resets)
            t += L
            continue
        # errors at every block output, then per-layer errors
        errs = [None] * n
        if signal == "surprise" and cfg["single_delta"]:
            d = dp[0][j]
            if variant == "independent":
                for l in range(n):
                    e = d if agg is None else agg[l] * d
                    errs[l] = mlp_backward(ws[l], fw[l][1], e, act, kept)
            else:
                for l in range(n - 1, -1, -1):
                    errs[l] = mlp_backward(ws[l], fw[l][1], d, act, kept)
                    if l:
                        d = _input_error(ws[l], fw[l], errs[l], d, cfg)
        else:
            for l in range(n):
                if signal == "surprise":
                    eps = dp[l][j]
                else:
                    tgt = tp[l][j]
                    if signal == "self":
                        tgt = _block_forward(ws[l], tgt, cfg)[0]
                    eps = output_error(fw[l][0], tgt, cfg["objective"], cfg["p"], cfg["huber_delta"])
                errs[l] = mlp_backward(ws[l], fw[l][1], eps, act, kept)
        # accumulate sum_t eta_t e_t a_t^T (one matmul per layer); a block whose chunk this piece
        # ends takes its step here (the boundary below then finds its sum at zero)
        for l in range(n):
            e_t = ep[l][j].unsqueeze(-1) if isinstance(ep[l][j], Tensor) else ep[l][j]
            own = [G is not None and not any(G is S for S in given[l]) for G in gs[l]]
            terms = zip(ws[l], gs[l], errs[l], fw[l][2], own)
            plain = ms[l] is None and cfg["alphas"][l] is None
            if offs[l] + L == periods[l] and plain:
                ws[l] = [_step(W, G, e_t, e, a, o) for W, G, e, a, o in terms]
                gs[l] = [None] * len(gs[l])
            else:
                gs[l] = [_sum_rank1(G, e_t, e, a, o) for _, G, e, a, o in terms]
        _boundaries(L, t, ws, gs, ms, offs, init, cfg, updates, resets)
        t += L
    outputs = [_cat_time(o) for o in outs] if cfg["info"] else None
    return _cat_time(ys), ws, gs, offs, outputs, updates, resets


def _native_learn(ws, gs, ms, offs, fw, delta, etas, given, cfg):
    """A piece's writes by :func:`._cms_block.learn`: each block's sum added to its gradient sum (in
    place where this call made it, or the caller handed it over), or, for a block whose chunk the
    piece ends, its step taken from the weights (the boundary then finds its sum at zero);
    ``fw``: the detached reads."""
    B, L = delta.shape[:2]
    coefs, starts, targets, steps = [], [], [], []
    for l, eta in enumerate(etas):
        steps.append(offs[l] + L == cfg["periods"][l] and ms[l] is None and cfg["alphas"][l] is None)
        start, target = [], []
        for W, G in zip(ws[l], gs[l]):
            if steps[l]:  # W - (G + eta sum): from the weights (less the pending sum)
                start.append(W if G is None else W - G)
            else:  # G + eta sum: in place where nothing else holds G
                start.append(G)
            own = G is not None and not steps[l] and G.is_contiguous() and not any(G is S for S in given[l])
            target.append(G if own else W.new_empty(B, *W.shape[-2:]))
        coefs.append([-eta if steps[l] else eta] * len(start))
        starts.append(start)
        targets.append(target)
    _cms_block.learn(cfg["blocks"], ws, fw, delta, coefs, starts, targets, cfg["prenorm"], cfg["residual"])
    for l, step in enumerate(steps):
        if step:
            ws[l], gs[l] = targets[l], [None] * len(gs[l])
        else:
            gs[l] = targets[l]


def _cat_time(xs):
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def _kernel_piece(kernels, ws, rws, x, etas, deltas, targets, agg, cfg):
    """One piece with the fused MLP kernel (one launch per block, two for a chain that propagates
    the chain-output surprise): ``(output, every block's output, every block's sum_t eta_t grad_t)``.
    The same computation as :func:`_chunked`'s closed form: reads at ``rws``, errors at ``ws``
    (equal in value; with ``detach`` the sums are constants). With a pre-norm the kernel runs
    the MLP on the normalised input and the residual is added here."""
    n, variant, signal = len(ws), cfg["variant"], cfg["signal"]
    residual = cfg["residual"] and cfg["prenorm"]  # the residual the kernel leaves to us

    def kernel_input(inp):
        return _rms(inp) if cfg["prenorm"] else (inp, None)

    def summed(r):
        return [S.detach() for S in r.sums] if cfg["detach"] else list(r.sums)

    ys, sums = [None] * n, [None] * n
    if signal == "surprise" and cfg["single_delta"] and variant != "independent":
        # forward through the chain, then the chain-output surprise backwards through it: each
        # block's error is the input error of the block after it (its input's gradient)
        inputs, inp = [], x
        for l in range(n):
            src, rinv = kernel_input(inp)
            inputs.append((src, rinv))
            y = kernels[l](rws[l], src, outputs=("y",)).y
            inp = ys[l] = y + inp if residual else y
        d = deltas[0]
        for l in range(n - 1, -1, -1):
            src, rinv = inputs[l]
            if cfg["detach"]:
                src, rinv = src.detach(), None if rinv is None else rinv.detach()
            r = kernels[l](ws[l], src, d, etas[l], objective="given",
                           outputs=("sums", "input_error") if l else ("sums",))
            sums[l] = summed(r)
            if l:
                g = r.input_error if rinv is None else _rms_backward(src, rinv, r.input_error)
                d = g + d if residual else g
        return ys[-1], ys, sums
    inp = x
    for l in range(n):
        block_in = x if variant == "independent" else inp
        src = kernel_input(block_in)[0]
        if signal == "surprise":
            d = deltas[l]
            if cfg["single_delta"] and agg is not None:  # independent: delta_l = w_l delta
                d = agg[l] * d
            r = kernels[l](rws[l], src, d, etas[l], objective="given", outputs=("y", "sums"))
        else:
            tgt, self_target = targets[l], signal == "self"
            if cfg["prenorm"] and self_target:  # the kernel's own target would skip the norm
                tgt, self_target = _block_forward(ws[l], tgt, cfg)[0], False
            if residual and cfg["objective"] == "l2":  # y - tgt = kernel y - (tgt - input)
                tgt = tgt - block_in
            r = kernels[l](rws[l], src, tgt, etas[l], objective=cfg["objective"],
                           self_target=self_target, outputs=("y", "sums"))
        ys[l], sums[l] = (r.y + block_in if residual else r.y), summed(r)
        inp = ys[l]
    if variant == "independent":
        out = sum((ys[l] if agg is None else agg[l] * ys[l]) for l in range(n))
    else:
        out = ys[-1]
    return out, ys, sums


# --------------------------------------------------------------------------------------------
# reference: token by token, inner gradients by torch.func
# --------------------------------------------------------------------------------------------

def _apply1(ws, x, act, residual, prenorm):
    a = F.rms_norm(x, x.shape[-1:], eps=_RMS_EPS) if prenorm else x  # torch's own, not _chunked's _rms
    for i, W in enumerate(ws):
        a = W @ a
        if i < len(ws) - 1:
            a = hidden(a, act)
    return a + x if residual else a


def _local_loss(ws, x, tgt, *, objective, act, residual, prenorm, p=None, huber_delta=None):
    return objective_loss(objective, _apply1(ws, x, act, residual, prenorm), tgt, p, huber_delta)


def _chain_surprise(all_ws, x, d, agg, *, variant, act, residual, prenorm):
    if variant == "independent":
        y = 0
        for l, ws in enumerate(all_ws):
            yl = _apply1(ws, x, act, residual, prenorm)
            y = y + (yl if agg is None else agg[l] * yl)
    else:
        y = x
        for ws in all_ws:
            y = _apply1(ws, y, act, residual, prenorm)
    return (y * d).sum()


def _reference(x, ws, gs, ms, offs, init, etas, deltas, targets, agg, st, cfg):
    variant, signal = cfg["variant"], cfg["signal"]
    block = dict(act=cfg["act"], residual=cfg["residual"], prenorm=cfg["prenorm"])
    apply1 = torch.vmap(functools.partial(_apply1, **block))
    n = len(ws)
    B, T, _ = x.shape
    ys, outs = [], [[] for _ in range(n)]
    updates, resets = [[] for _ in range(n)], [[] for _ in range(n)]
    local = torch.func.vmap(torch.func.grad(functools.partial(
        _local_loss, objective="dot" if signal == "surprise" else cfg["objective"], p=cfg["p"],
        huber_delta=cfg["huber_delta"], **block)))
    joint = torch.func.vmap(
        torch.func.grad(functools.partial(_chain_surprise, variant=variant, **block)),
        in_dims=(0, 0, 0, None),
    )
    for t in range(T):
        rws = _read_weights(ws, st)
        inp, ins = x[:, t], []
        ylist = []
        for l in range(n):
            src = inp if variant != "independent" else x[:, t]
            ins.append(src)
            y = apply1(tuple(rws[l]), src)
            ylist.append(y)
            outs[l].append(y)
            inp = y
        if variant == "independent":
            ys.append(sum((ylist[l] if agg is None else agg[l] * ylist[l]) for l in range(n)))
        else:
            ys.append(ylist[-1])
        if cfg["detach"]:
            ins = [a.detach() for a in ins]
        if signal == "surprise" and cfg["single_delta"]:
            grads = joint(tuple(tuple(lw) for lw in ws), x[:, t].detach() if cfg["detach"] else x[:, t],
                          deltas[0][:, t], agg.detach() if (agg is not None and cfg["detach"]) else agg)
        else:
            grads = []
            for l in range(n):
                if signal == "surprise":
                    tgt = -deltas[l][:, t]                       # <y, delta> = -<y, -delta>
                else:
                    tgt = targets[l][:, t]
                    if signal == "self":
                        tgt = apply1(tuple(ws[l]), tgt)
                grads.append(local(tuple(ws[l]), ins[l], tgt))
        for l in range(n):
            e = etas[l][:, t, None, None]
            gs[l] = [_add(G, e * g) for G, g in zip(gs[l], grads[l])]
        _boundaries(1, t, ws, gs, ms, offs, init, cfg, updates, resets)
    outputs = [torch.stack(o, dim=1) for o in outs]
    return torch.stack(ys, dim=1), ws, gs, offs, outputs, updates, resets
