r"""The anchor read of a stack of two-layer generating memories, as one autograd function.

Self-modifying Titans reads k, v, q, eta and alpha of every token of a piece from memories
stacked along the batch axis (``G`` memories times ``N`` sequence-heads, see
:mod:`nldsl.runtime.self_modifying`). Per row, on the piece's inputs ``x [G*N, L, D]``:

    Y = phi(x W_1^T) W_2^T + r x                     (the memory, read at its anchor)
    k, v, q = Y / max(||Y||, 1e-12)  or  Y           (L2-normalised where asked: F.normalize)
    eta = eta_max * sigmoid(Y[..., 0] + z_eta + b_eta),  alpha = sigmoid(Y[..., 0] + z_alpha + b_alpha)

(the rows of memory ``j`` are ``j*N .. (j+1)*N``; ``z`` the static logits added to a generated
rate, if any; M_eta / M_alpha's output matrix is zero-padded to D rows). Autograd through the
composed ops records some 35 nodes per piece (products, the norms, slices, selects, sigmoids);
this function records one, with the backward written out, on the same formulas.

On a CPU it runs as C (``_group_read.c``, :class:`_NativeGroupRead`: one row at a time), as the
memories' write does (see :mod:`nldsl.runtime._mlp_write`); the torch ops run on a GPU, without a
C compiler, and with ``NLDSL_NATIVE=0``.
"""
from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nldsl.runtime import _native as native
from nldsl.runtime._activations import _NORM_EPS2, split_hidden
from nldsl.runtime._common import contiguous
from nldsl.runtime._mlp_write import _Act, _T, _residual

__all__ = ["group_read"]

_SCALARS = ("eta", "alpha")
_UNIT_EPS = 1e-12  # F.normalize's


class _GroupRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, W1, W2, x, residual, eta_max, eta_bias, alpha_bias, *logits):
        act, names, units, N = cfg
        H = torch.bmm(x, _T(W1))
        fa = _Act(H, act)
        Y = _residual(torch.bmm(fa.S, _T(W2)), x, residual)
        outs, kept = [], []
        for j, (name, unit, z) in enumerate(zip(names, units, logits)):
            rows = Y[j * N:(j + 1) * N]
            if name in _SCALARS:
                pre = rows[..., 0] + (eta_bias if name == "eta" else alpha_bias)
                s = torch.sigmoid(pre if z is None else pre + z)
                outs.append(eta_max * s if name == "eta" else s)
                kept.append(s)
            elif unit:
                norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
                outs.append(rows / norm.clamp_min(_UNIT_EPS))
                kept.append(norm)
            else:
                outs.append(rows)
                kept.append(None)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skipped, not zeros
        ctx.residual = residual if not isinstance(residual, Tensor) else None
        ctx.save_for_backward(W1, W2, x, residual if isinstance(residual, Tensor) else None,
                              eta_max if isinstance(eta_max, Tensor) else None,
                              eta_bias if isinstance(eta_bias, Tensor) else None,
                              alpha_bias if isinstance(alpha_bias, Tensor) else None,
                              fa.H, fa.S, fa.inv_r, fa.g1, *outs, *kept)
        ctx.eta_max = None if isinstance(eta_max, Tensor) else eta_max
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        act, names, units, N = ctx.cfg
        G = len(names)
        W1, W2, x, mask, eta_max_t, eta_bias, alpha_bias, H, S, inv_r, g1, *rest = ctx.saved_tensors
        outs, kept = rest[:G], rest[G:]
        eta_max = ctx.eta_max if eta_max_t is None else eta_max_t
        need = ctx.needs_input_grad
        dY = torch.zeros(x.shape[0], x.shape[1], W2.shape[1], dtype=x.dtype, device=x.device)
        dlogits: list = []
        d_eta_max = d_eta_bias = d_alpha_bias = None
        for j, (name, unit, g, out, k) in enumerate(zip(names, units, grads, outs, kept)):
            if name in _SCALARS:
                dz = None
                if g is not None:
                    if name == "eta":
                        if eta_max_t is not None and need[5]:
                            d_eta_max = (g * k).sum_to_size(eta_max_t.shape)
                        dz = (g * eta_max) * k * (1.0 - k)
                    else:
                        dz = g * k * (1.0 - k)
                    dY[j * N:(j + 1) * N, :, 0] = dz
                    bias = eta_bias if name == "eta" else alpha_bias
                    if bias is not None:
                        db = dz.sum_to_size(bias.shape)
                        if name == "eta":
                            d_eta_bias = db
                        else:
                            d_alpha_bias = db
                dlogits.append(dz)
                continue
            dlogits.append(None)
            if g is None:
                continue
            if unit:   # y = x / r, r = max(||x||, eps): dx = (g - y (y . g) [||x|| >= eps]) / r
                proj = out * ((out * g).sum(-1, keepdim=True) * (k >= _UNIT_EPS))
                dY[j * N:(j + 1) * N] = (g - proj) / k.clamp_min(_UNIT_EPS)
            else:
                dY[j * N:(j + 1) * N] = g
        # Y = phi(x W1^T) W2^T + r x
        fa = _Act(H, act, S, inv_r, g1)
        dH, _ = fa.vjp(torch.bmm(dY, W2))
        dW1 = torch.bmm(_T(dH), x) if need[1] else None
        dW2 = torch.bmm(_T(dY), S) if need[2] else None
        dx = _residual(torch.bmm(dH, W1), dY, ctx.residual if mask is None else mask) if need[3] else None
        return (None, dW1, dW2, dx, None, d_eta_max, d_eta_bias, d_alpha_bias,
                *(d if n else None for d, n in zip(dlogits, need[8:])))


_KINDS = {"plain": 0, "unit": 1, "scalar": 2}


class ReadKernel(NamedTuple):
    """A configured call of ``_group_read.c``: the library and its ctypes arguments (the dims of
    one piece length, the memories' kinds, their shifts and scales), with ``h``, ``O`` and the
    hidden L2 norm for the buffers."""

    lib: ctypes.CDLL
    cfg_c: ctypes.Array
    kinds: ctypes.Array
    params: ctypes.Array
    h: int
    O: int
    l2: bool


def read_kernel(lib, cfg, x_shape, h: int, O: int, mask: Optional[Tensor], residual) -> ReadKernel:
    """The :class:`ReadKernel` for inputs of ``x_shape`` ``[G*N, L, D]`` (``cfg``: see
    :class:`_NativeGroupRead`; ``mask``: the residual's per-row mask or None)."""
    act, kinds, Ng, params = cfg
    N, L, D = x_shape
    base, l2 = split_hidden(act)
    dims = (N, Ng, len(kinds), L, D, h, O, l2, 2 if mask is not None else int(bool(residual)),
            native.ACTIVATIONS.index(base))
    return ReadKernel(lib, native.longs(dims),
                      native.longs(_KINDS[k] for k in kinds),
                      (ctypes.c_double * len(params))(*params), h, O, l2)


def read_outputs(kernel: ReadKernel, N: int, L: int, empty):
    """The forward's outputs for N rows of L tokens, each ``empty(*shape)``: the memories'
    (``[Ng, L, O]``, a scalar one's ``[Ng, L]``) and what the backward reads ``(S, inv_r, g1, Y,
    kept)``."""
    S, g1 = empty(N, L, kernel.h), empty(N, L, kernel.h)
    inv_r = empty(N, L) if kernel.l2 else None
    Y, kept = empty(N, L, kernel.O), empty(N, L)
    Ng = kernel.cfg_c[1]
    outs = [empty(Ng, L) if k == _KINDS["scalar"] else empty(Ng, L, kernel.O) for k in kernel.kinds]
    return outs, (S, inv_r, g1, Y, kept)


def read_forward(kernel: ReadKernel, W1, W2, x, mask, addends):
    """The memories' outputs (``[Ng, L, O]``, a scalar one's ``[Ng, L]``) and what the backward
    reads ``(S, inv_r, g1, Y, kept)``; contiguous inputs."""
    outs, keep = read_outputs(kernel, x.shape[0], x.shape[1], x.new_empty)
    native.check("_group_read", kernel.lib.forward(
        kernel.cfg_c, kernel.kinds, kernel.params, native.pointers((W1, W2, x, mask)), native.pointers(addends),
        native.pointers(outs), native.pointers(keep), ctypes.c_double(_NORM_EPS2)))
    return outs, keep


def read_backward(kernel: ReadKernel, W1, W2, x, mask, keep, grads, want_dz, into=None):
    """``(dW1, dW2, dx, dz)`` from each memory's output gradient (contiguous, or None: zero);
    ``dz``: a scalar memory's gradient at its sigmoid's input where ``want_dz`` says, else None.
    ``into``: contiguous weight gradients ``(dW1, dW2)`` to add the read's to, in place."""
    dW1, dW2 = (native.empty(W1), native.empty(W2)) if into is None else into
    dx = native.empty(x)
    Ng, L = kernel.cfg_c[1], x.shape[1]
    dz = [x.new_empty(Ng, L) if want and kind == _KINDS["scalar"] else None
          for kind, want in zip(kernel.kinds, want_dz)]
    native.check("_group_read", kernel.lib.backward(
        kernel.cfg_c, kernel.kinds, kernel.params, native.pointers((W1, W2, x, mask, *keep)),
        native.pointers(grads), native.pointers((dW1, dW2, dx)), native.pointers(dz),
        ctypes.c_int64(into is not None)))
    return dW1, dW2, dx, dz


class _NativeGroupRead(torch.autograd.Function):
    """:class:`_GroupRead` in ``_group_read.c`` (float32 and float64 CPU tensors). ``cfg``: the
    activation, each memory's kind (plain, unit or scalar), the rows per memory, and each
    memory's shift and scale (a scalar memory's output is ``scale * sigmoid(Y[..., 0] + shift +
    z)``); ``addends``: each memory's ``z`` ``[N, L]`` or None. Returns the memories' outputs."""

    @staticmethod
    def forward(ctx, lib, cfg, W1, W2, x, residual, *addends):
        W1, W2, x = contiguous(W1, W2, x)
        addends = contiguous(*addends)
        mask = residual.to(x.dtype).contiguous() if isinstance(residual, Tensor) else None
        ctx.kernel = read_kernel(lib, cfg, x.shape, W1.shape[-2], W2.shape[-2], mask, residual)
        outs, keep = read_forward(ctx.kernel, W1, W2, x, mask, addends)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: skipped, not zeros
        ctx.save_for_backward(W1, W2, x, mask, *keep)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        W1, W2, x, mask, *keep = ctx.saved_tensors
        dW1, dW2, dx, dz = read_backward(ctx.kernel, W1, W2, x, mask, keep, contiguous(*grads),
                                         ctx.needs_input_grad[6:])
        return (None, None, dW1, dW2, dx, None, *dz)


@functools.cache
def _library(dtype: torch.dtype):
    return native.library("_group_read", dtype)


def read_gates(names, units, logits, eta_max, eta_bias, alpha_bias, N: int, L: int):
    """Each memory's kind, the kernel's ``params`` (shift, scale per memory), its addends ``z``
    (``[N, L]`` or None) and the scale to apply after (a tensor eta_max, else None): number gates
    go into the kernel as its shift and scale; tensor ones are applied around it (added to the
    addend, multiplied after), so autograd carries their gradients."""
    kinds, params, addends, scaled = [], [], [], []
    for n, unit, z in zip(names, units, logits):
        if n not in _SCALARS:
            kinds.append("unit" if unit else "plain")
            params += [0.0, 1.0]
            addends.append(None)
            scaled.append(None)
            continue
        bias = eta_bias if n == "eta" else alpha_bias
        scale = eta_max if n == "eta" else 1.0
        if isinstance(bias, Tensor):
            z = bias.expand(N, L) if z is None else z + bias
        kinds.append("scalar")
        params += [0.0 if isinstance(bias, Tensor) else float(bias), 1.0 if isinstance(scale, Tensor) else float(scale)]
        addends.append(z)
        scaled.append(scale if isinstance(scale, Tensor) else None)
    return tuple(kinds), tuple(params), addends, scaled


def _native_group_read(lib, weights, x, *, act, residual, names, units, logits, eta_max, eta_bias,
                       alpha_bias) -> list[Tensor]:
    """:func:`group_read` by :class:`_NativeGroupRead` (the gates as :func:`read_gates` says)."""
    N = x.shape[0] // len(names)
    kinds, params, addends, scaled = read_gates(names, units, logits, eta_max, eta_bias, alpha_bias, N, x.shape[1])
    outs = _NativeGroupRead.apply(lib, (act, kinds, N, params), weights[0], weights[1], x, residual, *addends)
    return [o if s is None else s * o for o, s in zip(outs, scaled)]


def group_read(weights: Sequence[Tensor], x: Tensor, *, act: str, residual, names: Sequence[str],
               units: Sequence[bool], logits: Sequence[Optional[Tensor]], eta_max, eta_bias,
               alpha_bias) -> list[Tensor]:
    """The outputs of the memories ``names`` stacked in ``weights`` (``(W_1 [G*N, h, D], W_2
    [G*N, D, h])``, at their anchor) on ``x [G*N, L, D]`` (see the module docstring):
    ``[N, L, D]`` for k, v, q (L2-normalised where ``units`` says), ``[N, L]`` for eta, alpha
    (squashed, with ``logits`` added before; None entries for the others). ``residual``: a bool
    or a per-row 0/1 mask."""
    gates = [t for t in (*logits, eta_max, eta_bias, alpha_bias) if isinstance(t, Tensor)]
    lib = _library(x.dtype) if native.runs(x, *weights, *gates) else None
    if lib is not None:
        return _native_group_read(lib, weights, x, act=act, residual=residual, names=names, units=units,
                                  logits=logits, eta_max=eta_max, eta_bias=eta_bias, alpha_bias=alpha_bias)
    N = x.shape[0] // len(names)
    cfg = (act, tuple(names), tuple(bool(u) for u in units), N)
    return list(_GroupRead.apply(cfg, weights[0], weights[1], x, residual, eta_max, eta_bias, alpha_bias,
                                 *logits))
