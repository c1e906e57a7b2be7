"""Plumbing shared by the generated Triton kernels (``kernels.py``): op registration, dtype
choices, device checks, and :class:`LinearKernel`, the callable a generated linear memory's
kernels are wrapped in.

The kernels themselves are rendered from ``codegen_templates/kernels/`` by
:mod:`nldsl.codegen.kernels`, specialised by a spec (rule, retention, gates, chunk size, head
sizes). This module holds what does not depend on the specialisation, so it is written and
tested once: choosing the chunkwise kernels or the token-by-token one, carrying DGD's anchor
across calls, and refusing (never silently replacing) what the kernels cannot run.

Nothing here imports triton at module import time; the generated file does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from nldsl.runtime._common import MemoryOutput, check_gate, check_qkv, check_state, resolve_scale

__all__ = ["LinearKernel", "acc_dtype", "contiguous", "define_op", "dot_precision", "is_interpreted", "require_triton",
           "register_kernel_source", "runtime_kernel", "spec_kernels", "DECODE_MAX_TOKENS"]

#: calls of at most this many tokens that need no gradient run the token-by-token kernel
DECODE_MAX_TOKENS = 64

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS: dict[str, Any] = {}


def require_triton(what: str) -> None:
    """Raise a clear error when triton cannot be imported (impl='triton' never falls back)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"{what}: impl='triton' needs the triton package, which cannot be imported ({e}); "
            "install it (pip install 'nldsl[triton]') or choose impl='chunked'"
        ) from None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and accumulators are kept in: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 products use TF32 only where torch's own float32
    matmuls are allowed to (``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def contiguous(*tensors):
    """The tensors made contiguous (None stays None): the kernels compute row offsets from shapes."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def is_interpreted(kernel: Any) -> bool:
    """Whether a ``@triton.jit`` kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when it was defined)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def define_op(namespace: str, name: str, fn: Callable, *, backward: Callable | None = None,
              setup_context: Callable | None = None):
    """``torch.library.triton_op(namespace::name)`` (so ``torch.compile`` traces into the kernels),
    with its autograd formula. The namespace is a hash of the kernels' source, so a second
    definition of the same name is the same op: it is returned instead of registered twice."""
    qualname = f"{namespace}::{name}"
    if qualname in _OPS:
        return _OPS[qualname]
    op = torch.library.triton_op(qualname, fn, mutates_args=())
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    _OPS[qualname] = op
    return op


# --------------------------------------------------------------------------------------------
# the generated linear memories' kernels
# --------------------------------------------------------------------------------------------

class LinearKernel:
    """One linear memory's generated kernels: a chunkwise-parallel op (with its backward) and a
    token-by-token op for decoding, behind the runtime ops' calling convention.

    ``spec`` is the specialisation (:class:`nldsl.codegen.kernels.LinearKernelSpec` as a dict):
    ``rule`` (``hebbian``, ``delta`` or ``dgd``), ``lr`` and ``decay`` (``none``, ``const``:
    baked in; ``gate``: a logit, passed through sigmoid / logsigmoid inside the kernels;
    ``tensor``: the value itself, ``decay`` in log space), ``qk_l2norm`` (q and k are
    L2-normalised inside the kernels), ``head_k``, ``head_v``, ``chunk``, and for DGD ``period``
    (tokens between anchors) and ``read``.
    """

    def __init__(self, spec: Mapping[str, Any], *, chunk: Callable, step: Callable, interpreted: bool):
        self.spec = dict(spec)
        self.name = self.spec["name"]
        self.rule = self.spec["rule"]
        self.head_k, self.head_v = self.spec["head_k"], self.spec["head_v"]
        self.chunk_op, self.step_op, self.interpreted = chunk, step, interpreted

    def __repr__(self) -> str:
        s = self.spec
        extra = f", period={s['period']}, read={s['read']!r}" if self.rule == "dgd" else ""
        return (f"LinearKernel({self.name!r}, rule={self.rule!r}, lr={s['lr']!r}, decay={s['decay']!r}, "
                f"qk_l2norm={s['qk_l2norm']}, K={self.head_k}, V={self.head_v}, chunk={s['chunk']}{extra})")

    # Kernels are immutable: copies share them, and a pickle rebuilds them from the specialisation.
    def __deepcopy__(self, memo) -> "LinearKernel":
        return self

    def __reduce__(self):
        return _rebuild, (self.spec,)

    def for_heads(self, head_k: int, head_v: int) -> "LinearKernel":
        """These kernels, or the same specialisation rendered for other head sizes (a model built
        with other ``dim`` / ``heads`` than its spec's)."""
        if (head_k, head_v) == (self.head_k, self.head_v):
            return self
        from nldsl.codegen.kernels import LinearKernelSpec, linear_kernel

        return linear_kernel(LinearKernelSpec(**{**self.spec, "head_k": head_k, "head_v": head_v}))

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, lr: Tensor | None = None, g: Tensor | None = None, *,
                 scale: float | None = None, initial_state=None, output_final_state: bool = False) -> MemoryOutput:
        """``MemoryOutput(o, final_state)`` for ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, the
        learning rate ``lr`` and log retention ``g`` (``[B, T, H]``, or their logits for gates;
        None where the spec bakes a constant in). ``initial_state``: ``[B, H, K, V]`` (or, for
        DGD, a :class:`~nldsl.runtime.DGDState`)."""
        op = f"{self.name} (impl='triton')"
        B, T, H, K, V = check_qkv(op, q, k, v)
        if (K, V) != (self.head_k, self.head_v):
            raise ValueError(f"{op}: these kernels are specialised to head sizes K={self.head_k}, V={self.head_v}; "
                             f"got K={K}, V={V} (LinearKernel.for_heads renders them for other sizes)")
        if q.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{op}: q has dtype {q.dtype}; the kernels take float16, bfloat16, float32 or float64")
        if not self.interpreted and q.device.type != "cuda":
            raise RuntimeError(
                f"{op}: the Triton kernels run on CUDA tensors, got {q.device.type} tensors. "
                "On a machine without a GPU, set TRITON_INTERPRET=1 before triton is imported to run them "
                "in Triton's interpreter (slow; for tests), or choose impl='chunked'"
            )
        lr = self._gate_arg(op, "lr", self.spec["lr"], lr, B, T, H, q)
        g = self._gate_arg(op, "g", self.spec["decay"], g, B, T, H, q)
        scale = resolve_scale(op, scale, K)
        k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        q = q.contiguous()
        if self.rule == "dgd":
            return self._dgd(op, q, k, v, lr, g, scale, initial_state, output_final_state)
        if initial_state is not None:
            initial_state = check_state(op, "initial_state", initial_state, (B, H, K, V), q).contiguous()
        if self._decoding(T, q, k, v, lr, g, initial_state):
            o, S, _ = self.step_op(q, k, v, lr, g, initial_state, None, scale, 0)
        else:
            o, S = self.chunk_op(q, k, v, lr, g, initial_state, scale)
        return MemoryOutput(o, S if output_final_state else None)

    @staticmethod
    def _gate_arg(op, name, kind, x, B, T, H, q):
        if kind in ("gate", "tensor"):
            if x is None:
                what = "logit" if kind == "gate" else "value"
                raise ValueError(f"{op}: `{name}` ({what}, [B, T, H]) is required by these kernels")
            return check_gate(op, name, x, B, T, H, q).contiguous()
        if x is not None:
            raise ValueError(f"{op}: these kernels bake `{name}` in ({kind}); pass {name}=None")
        return None

    @staticmethod
    def _decoding(T, *tensors) -> bool:
        """Short calls that need no gradient run token by token (no backward exists for it)."""
        if T > DECODE_MAX_TOKENS:
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))

    # -- DGD: the anchor period need not start with the call ---------------------------------
    def _dgd(self, op, q, k, v, lr, g, scale, initial_state, output_final_state):
        from nldsl.runtime.dgd import DGDState

        B, T, H, K, V = *q.shape, v.shape[-1]
        P = self.spec["period"]
        if isinstance(initial_state, DGDState):
            S0 = check_state(op, "initial_state.memory", initial_state.memory, (B, H, K, V), q)
            A0 = check_state(op, "initial_state.anchor", initial_state.anchor, (B, H, K, V), q)
            off = initial_state.offset
            if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < P:
                raise ValueError(f"{op}: initial_state.offset must be an int in [0, {P}), got {off!r} "
                                 "(was the state produced with another period?)")
        elif initial_state is None or isinstance(initial_state, Tensor):
            S0 = None if initial_state is None else check_state(op, "initial_state", initial_state, (B, H, K, V), q)
            A0, off = None, 0
        else:
            raise TypeError(f"{op}: initial_state must be None, a [B, H, K, V] tensor or a DGDState")
        S0 = None if S0 is None else S0.contiguous()
        A0 = None if A0 is None else A0.contiguous()
        if self._decoding(T, q, k, v, lr, g, S0, A0):
            o, S, A = self.step_op(q, k, v, lr, g, S0, A0 if off else None, scale, off)
            off_new = (off + T) % P
            return MemoryOutput(o, DGDState(S, A if off_new else S, off_new) if output_final_state else None)
        # Chunkwise: the kernels start each call at an anchor boundary. A call that begins inside a
        # period (off > 0) first finishes it with its own call, where the anchor is the carried A0,
        # not the call's start state S: the gradient at the anchor enters as the values
        # v - (A0 - S)^T k, and an anchor read adds q (A0 - S). A trailing partial period gets its
        # own call too, so that its start state is the anchor the final state carries.
        pieces, S, piece_start = [], S0, S0
        head = min((P - off) % P, T)
        body = (T - head) // P * P
        start = 0
        for length in (head, body, T - head - body):
            if length == 0:
                continue
            sl = slice(start, start + length)
            qs, ks, vs = (t[:, sl].contiguous() for t in (q, k, v))  # the kernels index contiguous rows
            shift = None
            if start == 0 and off:
                shift = A0 if S is None else A0 - S.to(A0.dtype)
                kn = F.normalize(ks, dim=-1) if self.spec["qk_l2norm"] else ks
                vs = (vs - torch.einsum("bthk,bhkv->bthv", kn.to(shift.dtype), shift).to(vs.dtype)).contiguous()
            o, S_next = self.chunk_op(qs, ks, vs, None if lr is None else lr[:, sl].contiguous(),
                                      None if g is None else g[:, sl].contiguous(), S, scale)
            if shift is not None and self.spec["read"] == "anchor":
                qn = F.normalize(qs, dim=-1) if self.spec["qk_l2norm"] else qs
                o = o + (scale * torch.einsum("bthk,bhkv->bthv", qn.to(shift.dtype), shift)).to(o.dtype)
            pieces.append(o)
            piece_start, S, start = S, S_next, start + length
        o = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if not output_final_state:
            return MemoryOutput(o, None)
        off_new = (off + T) % P
        if off_new == 0:
            A = S
        elif head == T:
            A = A0  # the whole call stayed inside the carried period
        else:  # the last piece is a partial period: its start state is the anchor
            A = piece_start if piece_start is not None else torch.zeros_like(S)
        return MemoryOutput(o, DGDState(S, A, off_new))


def _rebuild(spec: Mapping[str, Any]) -> LinearKernel:
    from nldsl.codegen.kernels import LinearKernelSpec, linear_kernel

    return linear_kernel(LinearKernelSpec(**spec))


def runtime_kernel(op: str, rule: str, *, lr: str, decay: str, head_k: int, head_v: int, chunk_size: int,
                   period: int = 1, read: str = "running") -> LinearKernel:
    """The kernels behind ``impl='triton'`` of :mod:`nldsl.runtime`'s linear memories: the gates
    come as tensors (``lr`` the step size, ``decay`` the log retention), nothing is fused.
    Rendered and imported once per specialisation and process."""
    require_triton(op)
    from nldsl.codegen.kernels import CHUNK_SIZES, LinearKernelSpec, linear_kernel

    if rule == "dgd":
        if chunk_size & (chunk_size - 1) or chunk_size > 64:
            raise ValueError(f"{op}: impl='triton' takes chunk_size (the anchor period) a power of two up to 64, "
                             f"got {chunk_size}; impl='chunked' takes any")
        chunk = 64
    elif chunk_size in CHUNK_SIZES:
        chunk = chunk_size
    else:
        raise ValueError(f"{op}: impl='triton' takes chunk_size in {CHUNK_SIZES} (the kernels' tiles are powers "
                         f"of two >= 16), got {chunk_size}")
    return linear_kernel(LinearKernelSpec(name=op, rule=rule, head_k=head_k, head_v=head_v, lr=lr, decay=decay,
                                          chunk=chunk, period=period, read=read))


# --------------------------------------------------------------------------------------------
# finding a generated module's kernels
# --------------------------------------------------------------------------------------------

_SOURCES: dict[str, tuple[str, str]] = {}
_LOADED: dict[str, Any] = {}


def register_kernel_source(module_name: str, source: str, filename: str) -> None:
    """Called by :func:`nldsl.compile` for a spec with kernels: the generated module named
    ``module_name`` finds its kernels here (imported on first use, so a model that never asks for
    ``impl='triton'`` never imports triton)."""
    _SOURCES[module_name] = (source, filename)


def spec_kernels(module_name: str, module_file: str | None, spec_sha256: str):
    """The kernels module of a generated model module: registered in process by
    :func:`nldsl.compile`, or ``kernels.py`` beside the module file that ``nldsl compile`` wrote."""
    from nldsl.codegen.loader import load_module

    require_triton(module_name)
    key = module_name + "_kernels"
    if key not in _LOADED:
        if module_name in _SOURCES:
            source, filename = _SOURCES[module_name]
        else:
            path = Path(module_file).with_name("kernels.py") if module_file and os.path.isfile(module_file) else None
            if path is None or not path.is_file():
                where = f"no kernels.py beside {module_file}" if path is not None else "none generated"
                raise RuntimeError(
                    f"impl='triton': no Triton kernels for {module_name} ({where}): kernels are generated for "
                    "specs with linear memories under the Hebbian, delta, gated delta or DGD rule "
                    "(`nldsl compile` writes them to kernels.py next to module.py)"
                )
            source, filename = path.read_text(encoding="utf-8"), str(path)
        _LOADED[key] = load_module(source, key, filename=filename)
    module = _LOADED[key]
    if getattr(module, "SPEC_SHA256", None) != spec_sha256:
        raise RuntimeError(f"impl='triton': the kernels found for {module_name} were generated from another "
                           "version of the spec (its sha256 differs); compile the spec again")
    return module
