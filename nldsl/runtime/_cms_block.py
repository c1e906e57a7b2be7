"""The CMS's two-layer blocks on a CPU as C calls (``_cms_block.c``) over the BLAS gemm torch links.

A Hope step runs its CMS in 16 pieces of 32 tokens, and each block of a piece took ~40 torch calls
(the pre-norm, two products, the activation, the residual; the writes' errors, input errors and
gradient sums; autograd's backward of each) on products of only 32 rows a sequence, so the calls'
overhead cost more than their arithmetic. Here a block's read is one autograd function whose
forward and backward are one C call each (:func:`read`), and a detached chain's writes of a piece
are one C call for every block (:func:`learn`): the same lines as :mod:`nldsl.runtime.cms`'s
torch ops (the tests hold the two equal), one sequence at a time on torch's threads.

They run where :func:`library` finds the kernel built and torch's ``sgemm_`` / ``dgemm_`` (checked
on one product before it is trusted); elsewhere, and with ``NLDSL_NATIVE=0``, cms.py runs its
torch ops.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nldsl.runtime import _native as native

__all__ = ["library", "read", "learn"]

_GEMMS = {torch.float32: "sgemm_", torch.float64: "dgemm_"}


def library(x: Tensor):
    """The built kernel for tensors like ``x`` (with the gemm set), or None."""
    if not native.runs(x):
        return None
    return _loaded(x.dtype)


@functools.cache
def _loaded(dtype: torch.dtype):
    lib = native.library("_cms_block", dtype)
    gemm = _symbol(_GEMMS[dtype])
    if lib is None or gemm is None:
        return None
    lib.set_gemm(ctypes.c_void_p(gemm), ctypes.c_void_p(_symbol("MKL_Set_Num_Threads_Local")))
    # the BLAS's calling convention (Fortran, 32-bit integers) checked on one product
    A, B = (torch.arange(1.0, 1 + r * c, dtype=dtype).reshape(r, c) for r, c in ((3, 5), (5, 4)))
    C = torch.empty(3, 4, dtype=dtype)
    lib.check_product(*native.longs((3, 4, 5)), native.pointer(A), native.pointer(B), native.pointer(C))
    return lib if torch.equal(C, A @ B) else None


def _symbol(name: str) -> Optional[int]:
    """The address of ``name`` in torch's CPU library (its BLAS's routines), or None."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            return ctypes.cast(getattr(ctypes.CDLL(str(path)), name), ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def _dims(x: Tensor, Wi: Tensor, Wo: Tensor) -> list[int]:
    """B, L, D, H and the weights' batch strides (0: shared by the batch)."""
    B, L, D = x.shape
    return [B, L, D, Wi.shape[-2], Wi.stride(0) if Wi.dim() == 3 else 0, Wo.stride(0) if Wo.dim() == 3 else 0]


def _weight(W: Tensor) -> Tensor:
    """``W`` with contiguous matrices (a batch stride of 0 is kept: the batch shares it)."""
    if W.dim() == 3 and W.stride(0) == 0:
        return W if W[0].is_contiguous() else W[0].contiguous().expand_as(W)
    return W.contiguous()


class _Read(torch.autograd.Function):
    """``(y, s, r, a, d)`` of a block on ``x`` (see ``_cms_block.c``); the outer gradient of its
    weights goes to ``root_in`` / ``root_out`` (a detached chain's straight-through link: the
    weights the stream started from, ``[H, D]`` shared by the batch or ``[B, H, D]``; None: no
    gradient), from the values ``Wi`` / ``Wo`` it was read with."""

    @staticmethod
    def forward(ctx, x, Wi, Wo, root_in, root_out, lib, prenorm: bool, residual: bool, act: int):
        x, Wi, Wo = x.contiguous(), _weight(Wi), _weight(Wo)
        B, L, D, H = _dims(x, Wi, Wo)[:4]
        y, a, d = torch.empty_like(x), x.new_empty(B, L, H), x.new_empty(B, L, H)
        s, r = (torch.empty_like(x), x.new_empty(B, L, 1)) if prenorm else (None, None)
        native.check("_cms_block", lib.block_forward(
            native.longs(_dims(x, Wi, Wo) + [prenorm, residual, act]), native.pointers([x, Wi, Wo]),
            native.pointers([y, s, r, a, d])))
        ctx.mark_non_differentiable(*(t for t in (s, r, a, d) if t is not None))
        ctx.save_for_backward(x if s is None else s, r, a, d, Wi, Wo)
        ctx.lib, ctx.flags = lib, [prenorm, residual]
        ctx.roots = [None if R is None else R.dim() for R in (root_in, root_out)]
        return y, s, r, a, d

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, *_):
        s, r, a, d, Wi, Wo = ctx.saved_tensors
        need = ctx.needs_input_grad
        gy = gy.contiguous()
        B, L, D, H = _dims(gy, Wi, Wo)[:4]
        dx = torch.empty_like(gy) if need[0] else None
        shapes = ((H, D), (D, H))
        # where each weight gradient goes: 0 none, 1 per sequence, 2 one sum over the batch
        where = [0 if not need[3 + i] else 2 if ctx.roots[i] == 2 else 1 for i in range(2)]
        dW = [None if w == 0 else gy.new_empty(shape if w == 2 else (B, *shape)) for w, shape in zip(where, shapes)]
        gh = gy.new_empty(B, L, H)
        native.check("_cms_block", ctx.lib.block_backward(
            native.longs(_dims(gy, Wi, Wo) + ctx.flags + where), native.pointers([gy, s, r, a, d, Wi, Wo]),
            native.pointers([dx, dW[0], dW[1], gh])))
        return dx, None, None, dW[0], dW[1], None, None, None, None


def read(lib, ws, x: Tensor, prenorm: bool, residual: bool, act: int):
    """A two-layer block's read, as :func:`nldsl.runtime.cms._block_forward` returns it: ``(y,
    [act'(h)], [s, act(h)], 1 / rms(x) or None)``. ``ws``: the two weights, each a tensor (no
    outer gradient: a detached chain's weights that need none) or a ``_Link`` (value, root)."""
    values = [getattr(W, "value", W) for W in ws]
    roots = [getattr(W, "root", None) for W in ws]
    y, s, r, a, d = _Read.apply(x, *values, *roots, lib, prenorm, residual, act)
    return y, [d], [x if s is None else s, a], r


def learn(lib, ws, fw, delta: Tensor, coefs, starts, targets, prenorm: bool, residual: bool):
    """A detached sequential chain's writes of a piece (``_cms_block.c``'s ``chain_learn``): block
    l's summed gradient (``[B, H, D]``, ``[B, D, H]``) times ``coefs[l][i]`` added to
    ``starts[l][i]`` (None: zero) into ``targets[l][i]`` (contiguous; a start may be its target).
    ``fw``: the blocks' forwards (:func:`read`'s), ``ws``: the weights they were read with,
    ``delta``: the surprise at the chain's output."""
    x = fw[0][2][0]
    B, L, D = x.shape
    cfg, inputs = [len(ws), B, L, D, prenorm, residual], [delta.contiguous()]
    for lw, (_, hs, ins, r), start in zip(ws, fw, starts):
        Wi, Wo = (_weight(W) for W in lw)
        start = [None if F is None else _weight(F) for F in start]
        cfg += _dims(x, Wi, Wo)[3:] + [0 if F is None or F.dim() == 2 else F.stride(0) for F in start]
        inputs += [ins[0].contiguous(), r, ins[1], hs[0], Wi, Wo, *start]
    c = (ctypes.c_double * (2 * len(ws)))(*(float(v) for pair in coefs for v in pair))
    native.check("_cms_block", lib.chain_learn(native.longs(cfg), c, native.pointers(inputs),
                                               native.pointers([T for pair in targets for T in pair])))
