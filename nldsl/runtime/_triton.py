"""Plumbing shared by the generated Triton kernels (``kernels.py``): op registration, dtype
choices, device checks, and the callables generated kernels are wrapped in:
:class:`LinearKernel` (a linear memory's) and :class:`MlpKernel` (the fused per-chunk gradient
of a two-layer MLP memory, used by the deep memories and CMS chains).

The kernels themselves are rendered from ``codegen_templates/kernels/`` by
:mod:`nldsl.codegen.kernels`, specialised by a spec (rule, retention, gates, chunk size, head
sizes). This module holds what does not depend on the specialisation, so it is written and
tested once: choosing the chunkwise kernels or the token-by-token one, carrying DGD's anchor
across calls, and refusing (never silently replacing) what the kernels cannot run.

Nothing here imports triton at module import time; the generated file does.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# contiguous: re-exported, the generated kernels import it from here
from nldsl.runtime._common import MemoryOutput, check_gate, check_qkv, check_state, contiguous, resolve_scale

__all__ = ["LinearKernel", "MlpGrads", "MlpKernel", "acc_dtype", "contiguous", "define_op", "dot_precision",
           "is_interpreted", "launch", "mlp_chunk_reference", "require_triton", "register_kernel_source",
           "runtime_kernel", "runtime_mlp_kernel", "spec_kernels", "DECODE_MAX_TOKENS"]

#: calls of at most this many tokens that need no gradient run the token-by-token kernel
DECODE_MAX_TOKENS = 64

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS: dict[str, Any] = {}


def _check_device(op: str, x: Tensor, interpreted: bool) -> None:
    """Kernels run on CUDA tensors, or on any under Triton's interpreter: never a silent fallback."""
    if not interpreted and x.device.type != "cuda":
        raise RuntimeError(
            f"{op}: the Triton kernels run on CUDA tensors, got {x.device.type} tensors. "
            "On a machine without a GPU, set TRITON_INTERPRET=1 before triton is imported to run them "
            "in Triton's interpreter (slow; for tests), or choose impl='chunked'"
        )


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


def is_interpreted(kernel: Any) -> bool:
    """Whether a ``@triton.jit`` kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when it was defined)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


#: (kernel, device, its specialisation) -> the software-pipelining depth whose shared memory fits
_STAGES: dict = {}
#: launch options by kernel stage (the generated name's last part: ``solve``, ``wu``, ``states``,
#: ``chunk_grads``...; ``*`` for every kernel), put over the call's own in eager launches:
#: benchmarks/diagnose_kernels.py sets them to find the launch configurations a compiler gets wrong
LAUNCH_OVERRIDES: dict[str, dict] = {}
#: Triton's default depth on CUDA
_DEFAULT_STAGES = 3


def launch(kernel: Any, grid: tuple, *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``, launched again with shallower software
    pipelining (``num_stages`` 2, then 1) when the device lacks the shared memory a block needs at
    the default depth: an sm_80 block has 163 KiB (sm_86/89: 99, sm_90: 227), and a float32 CMS
    level of hidden size 512 needs 176 KiB at 3 stages, 112 at 2 and 96 at 1; the float32 backward of
    a gated delta rule with 128-dimensional heads 257 KiB at 3 on any GPU. The depth that fits is
    remembered per kernel, device and specialisation (argument dtypes and constexprs). Under
    torch.compile the kernel goes to inductor as it is."""
    from torch.library import wrap_triton

    if torch.compiler.is_compiling():
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    from triton.runtime.errors import OutOfResources

    if LAUNCH_OVERRIDES:
        kwargs = {**kwargs, **_overrides(kernel)}
    tensors = [a for a in args if isinstance(a, Tensor)]
    key = (kernel, tensors[0].device if tensors else None, tuple(t.dtype for t in tensors), tuple(kwargs.items()))
    while True:
        stages = _STAGES.get(key)
        try:
            wrap_triton(kernel)[grid](*args, **({**kwargs, "num_stages": stages} if stages is not None else kwargs))
            return
        except OutOfResources as e:
            if e.name != "shared memory" or stages == 1:
                raise
            _STAGES[key] = (_DEFAULT_STAGES if stages is None else stages) - 1


@contextlib.contextmanager
def launch_overrides(config: str):
    """LAUNCH_OVERRIDES set from ``config`` for the block, restored after it. ``config`` is
    ``default`` (none) or ``STAGE:OPTIONS[;STAGE:OPTIONS...]``: STAGE a kernel name's last part or
    ``*``, OPTIONS ``wN`` (num_warps) and ``sN`` (num_stages), comma-separated, e.g.
    ``'*:w2;solve:w4,s1'``."""
    found: dict[str, dict] = {}
    if config != "default":
        names = {"w": "num_warps", "s": "num_stages"}
        for part in config.split(";"):
            stage, colon, options = part.partition(":")
            try:
                if not (colon and stage):
                    raise ValueError
                found[stage] = {names[o[0]]: int(o[1:]) for o in options.split(",") if o}
            except (KeyError, ValueError, IndexError):
                raise ValueError(f"launch configuration {part!r}: expected STAGE:OPTIONS with STAGE a kernel "
                                 "name's last part or '*' and OPTIONS like w2 or w4,s1") from None
    before = dict(LAUNCH_OVERRIDES)
    LAUNCH_OVERRIDES.clear()
    LAUNCH_OVERRIDES.update(found)
    try:
        yield found
    finally:
        LAUNCH_OVERRIDES.clear()
        LAUNCH_OVERRIDES.update(before)


def _overrides(kernel: Any) -> dict:
    name = getattr(kernel, "__name__", "")
    found = dict(LAUNCH_OVERRIDES.get("*", {}))
    for stage, options in LAUNCH_OVERRIDES.items():
        if stage != "*" and name.endswith("_" + stage):
            found.update(options)
    return found


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
        from nldsl.codegen.kernels import LinearKernelSpec, padded_pow2, linear_kernel

        block_v = self.spec.get("block_v")
        if block_v is not None and block_v > padded_pow2(head_v):
            block_v = None  # wider than the new heads' padded values: the default for them
        return linear_kernel(LinearKernelSpec(**{**self.spec, "head_k": head_k, "head_v": head_v, "block_v": block_v}))

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
        _check_device(op, q, self.interpreted)
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
            o, S, _ = self.chunk_op(q, k, v, lr, g, initial_state, scale)
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
            o, S_next, _ = self.chunk_op(qs, ks, vs, None if lr is None else lr[:, sl].contiguous(),
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
# the generated MLP memories' kernel
# --------------------------------------------------------------------------------------------

class MlpGrads(NamedTuple):
    """What :meth:`MlpKernel.__call__` returns for rows ``x [N, L, K]`` (None where not asked for).

    y: ``M(x)`` ``[N, L, V]``. hidden: the hidden activations ``a [N, L, H]`` (the input of
    ``W_out``). errors: ``(e [N, L, H], eps [N, L, V])``, the loss gradients at the hidden
    pre-activations and at the output: token t's layer gradients are the rank-1 ``e_t x_t^T``
    and ``eps_t a_t^T``. sums: ``(sum_t eta_t e_t x_t^T [N, H, K], sum_t eta_t eps_t a_t^T [N, V, H])``
    over the L tokens (float32, or float64 for float64 inputs). input_error: ``dL/dx [N, L, K]``.
    """

    y: Optional[Tensor]
    hidden: Optional[Tensor]
    errors: Optional[tuple]
    sums: Optional[tuple]
    input_error: Optional[Tensor]


#: the kernel's OBJECTIVE constant: the error at the output is y - target, -target, or given
_OBJECTIVES = {"l2": 0, "dot": 1, "given": 2}
MLP_OUTPUTS = ("y", "factors", "sums", "input_error")


class MlpKernel:
    """One MLP memory's generated kernel: the per-chunk gradient of ``M(z) = z + W_out act(W_in z)``
    (the residual where the spec has it) fused into one launch, behind a calling convention shared
    by :func:`nldsl.runtime.deep_memory.chunk_step` (per-token factors) and the CMS levels (chunk
    sums). ``spec`` is its :class:`nldsl.codegen.kernels.MlpKernelSpec` as a dict.

    The backward (outer gradients through the inner gradient, the differentiable-writes case) is
    the PyTorch closed form of :mod:`nldsl.runtime.deep_memory`, recomputed and differentiated by
    autograd (:meth:`vjp`); the kernel computes the values.
    """

    def __init__(self, spec: Mapping[str, Any], *, grads: Callable, interpreted: bool):
        self.spec = dict(spec)
        self.name = self.spec["name"]
        self.dims = (self.spec["d_in"], self.spec["d_hidden"], self.spec["d_out"])
        self.grads_op, self.interpreted = grads, interpreted

    def __repr__(self) -> str:
        s = self.spec
        return (f"MlpKernel({self.name!r}, K={s['d_in']}, hidden={s['d_hidden']}, V={s['d_out']}, "
                f"activation={s['activation']!r}, residual={s['residual']}, hidden_norm={s['hidden_norm']!r}, "
                f"chunk={s['chunk']})")

    # Kernels are immutable: copies share them, and a pickle rebuilds them from the specialisation.
    def __deepcopy__(self, memo) -> "MlpKernel":
        return self

    def __reduce__(self):
        return _rebuild_mlp, (self.spec,)

    def for_dims(self, d_in: int, d_hidden: int, d_out: int) -> "MlpKernel":
        """This kernel, or the same specialisation rendered for other dims (a model built with
        other ``dim`` / ``heads`` than its spec's)."""
        if (d_in, d_hidden, d_out) == self.dims:
            return self
        from nldsl.codegen.kernels import MlpKernelSpec, mlp_kernel

        return mlp_kernel(MlpKernelSpec(**{**self.spec, "d_in": d_in, "d_hidden": d_hidden, "d_out": d_out}))

    def require(self, op: str, *, activation: str, hidden_norm: str, residual: bool) -> None:
        """Raise naming every part of a memory's configuration this kernel does not implement."""
        want = {"activation": activation, "hidden_norm": hidden_norm, "residual": residual}
        wrong = {k: (self.spec[k], v) for k, v in want.items() if self.spec[k] != v}
        if wrong:
            raise ValueError(f"{op}: its Triton kernel {self.name!r} does not implement this memory ("
                             + ", ".join(f"{k}: kernel {a!r}, memory {b!r}" for k, (a, b) in wrong.items())
                             + "); generate it from the memory's spec or choose impl='chunked'")

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, weights, x: Tensor, target: Tensor | None = None, eta: Tensor | None = None, *,
                 objective: str = "l2", self_target: bool = False, residual: bool | Tensor | None = None,
                 outputs: tuple[str, ...] = ("factors",)) -> MlpGrads:
        """The kernel on rows ``x [N, L, K]`` at ``weights = (W_in [N, H, K], W_out [N, V, H])``.

        ``objective``: ``"l2"`` (the error at the output is ``M(x) - target``), ``"dot"``
        (``-target``) or ``"given"`` (``target`` is the error itself, e.g. a local surprise);
        ``self_target``: the target is ``M(target)`` at the same weights (``target [N, L, K]``).
        ``eta [N, L]`` weights the sums (None: 1). ``residual``: None (the spec's), the spec's
        bool, or a 0/1 ``[N]`` mask of the rows that add their input (needs a residual spec).
        ``outputs``: any of ``y``, ``factors`` (hidden and errors), ``sums``, ``input_error``.
        """
        op = f"{self.name} (impl='triton')"
        K, Hd, V = self.dims
        unknown = set(outputs) - set(MLP_OUTPUTS)
        if unknown or not outputs:
            raise ValueError(f"{op}: outputs must be a non-empty subset of {MLP_OUTPUTS}, got {tuple(outputs)}")
        if objective not in _OBJECTIVES:
            raise ValueError(f"{op}: objective must be one of {tuple(_OBJECTIVES)}, got {objective!r}")
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != K or x.shape[1] == 0:
            raise ValueError(f"{op}: x must be a [N, L >= 1, K={K}] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        N, L = x.shape[:2]
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{op}: x has dtype {x.dtype}; the kernel takes float16, bfloat16, float32 or float64")
        _check_device(op, x, self.interpreted)
        if not isinstance(weights, (list, tuple)) or len(weights) != 2:
            raise ValueError(f"{op}: the kernel takes a two-layer MLP's weights (W_in, W_out)")
        w_in = _rows(op, "W_in", weights[0], (N, Hd, K), x)
        w_out = _rows(op, "W_out", weights[1], (N, V, Hd), x)
        if self_target and objective == "given":
            raise ValueError(f"{op}: a given error has no target to generate (self_target with objective='given')")
        if set(outputs) - {"y"}:
            if target is None:
                raise ValueError(f"{op}: the gradients need target (the values, the error, or the memory's input)")
            width = K if self_target else V
            target = _rows(op, "target", target, (N, L, width), x)
        else:
            target = None
        if eta is not None:
            eta = _rows(op, "eta", eta, (N, L), x)
        rows = None
        if isinstance(residual, Tensor):
            if not self.spec["residual"]:
                raise ValueError(f"{op}: a per-row residual mask needs a kernel specialised with residual=True")
            rows = _rows(op, "residual", residual, (N,), x)
        elif residual is not None and residual != self.spec["residual"]:
            raise ValueError(f"{op}: the kernel is specialised to residual={self.spec['residual']}, got {residual}")
        y, a, e, eps, g_in, g_out, dx = self.grads_op(
            x, target, eta, w_in, w_out, rows, _OBJECTIVES[objective], bool(self_target), "y" in outputs,
            "factors" in outputs, "sums" in outputs, "input_error" in outputs)
        return MlpGrads(y if "y" in outputs else None,
                        a if "factors" in outputs else None,
                        (e, eps) if "factors" in outputs else None,
                        (g_in, g_out) if "sums" in outputs else None,
                        dx if "input_error" in outputs else None)

    # -- the backward -----------------------------------------------------------------------
    def vjp(self, saved, flags, grads) -> tuple:
        """Gradients of the kernel op's tensor inputs ``(x, target, eta, W_in, W_out, residual rows)``
        for the output gradients ``grads``, by autograd through :func:`mlp_chunk_reference`."""
        x, target, eta, w_in, w_out, rows = saved
        objective, self_target, store_y, factors, sums, input_error = flags
        wanted = (store_y, factors, factors, factors, sums, sums, input_error)
        inputs = [x, target, eta, w_in, w_out]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
            outs = mlp_chunk_reference(
                *leaves, rows, activation=self.spec["activation"], hidden_norm=self.spec["hidden_norm"],
                residual=self.spec["residual"], objective={v: k for k, v in _OBJECTIVES.items()}[objective],
                self_target=self_target)
            pairs = [(o, g.to(o.dtype)) for o, g, w in zip(outs, grads, wanted) if w and g is not None]
            used = [t for t in leaves if t is not None]
            found = torch.autograd.grad([o for o, _ in pairs], used, [g for _, g in pairs], allow_unused=True)
        found = iter(found)
        out = [None if t is None else next(found) for t in leaves]
        return tuple(out) + (None,)  # no gradient for the residual mask


def _rows(op: str, name: str, t, shape: tuple, like: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {got}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, x on {like.device}")
    return t.to(like.dtype)


def mlp_chunk_reference(x, target, eta, w_in, w_out, residual_rows=None, *, activation: str, hidden_norm: str,
                        residual: bool, objective: str, self_target: bool):
    """The kernel's outputs ``(y, a, e, eps, sum eta e x^T, sum eta eps a^T, dL/dx)`` by the PyTorch
    closed form of :mod:`nldsl.runtime.deep_memory` (``mlp_forward`` + ``mlp_backward``): the
    kernel's backward, and what it is tested against. Without a target, only ``y``."""
    from nldsl.runtime.deep_memory import hidden_act, mlp_backward, mlp_forward, output_error

    act = hidden_act(hidden_norm, activation)
    res = residual_rows if residual_rows is not None else residual
    ws = [w_in, w_out]
    y, hs, ins = mlp_forward(ws, x, act, res)
    if target is None:  # the forward only
        return (y,) + (None,) * 6
    if objective == "given":
        eps = target
    else:
        tgt = mlp_forward(ws, target, act, res)[0] if self_target else target
        eps = output_error(y, tgt, objective)
    e, eps = mlp_backward(ws, hs, eps, act)
    a = ins[1]
    w = 1 if eta is None else eta.unsqueeze(-1)
    dx = e @ w_in
    if residual_rows is not None:
        dx = dx + residual_rows.view(-1, 1, 1) * eps
    elif residual:
        dx = dx + eps
    return y, a, e, eps, (w * e).transpose(-1, -2) @ x, (w * eps).transpose(-1, -2) @ a, dx


def _rebuild_mlp(spec: Mapping[str, Any]) -> MlpKernel:
    from nldsl.codegen.kernels import MlpKernelSpec, mlp_kernel

    return mlp_kernel(MlpKernelSpec(**spec))


def runtime_mlp_kernel(op: str, kernel: MlpKernel | None, *, depth: int, d_in: int, d_hidden: int, d_out: int,
                       activation: str, hidden_norm: str, residual: bool, chunk: int) -> MlpKernel:
    """The MLP kernel an ``impl='triton'`` call of a deep-memory op runs: ``kernel`` (a compiled
    spec's, for these dims) or, when None, one rendered in process for the call's configuration.
    Raises (never falls back) naming what the kernel does not cover."""
    if depth != 2:
        raise ValueError(f"{op}: impl='triton' runs two-layer MLP memories (the fused kernel's); this one has "
                         f"{depth} layer{'s' if depth != 1 else ''}; choose impl='chunked'")
    if kernel is None:
        require_triton(op)
        from nldsl.codegen.kernels import MlpKernelSpec, mlp_kernel, mlp_tile

        return mlp_kernel(MlpKernelSpec(name=op, d_in=d_in, d_hidden=d_hidden, d_out=d_out, activation=activation,
                                        residual=bool(residual), hidden_norm=hidden_norm, chunk=mlp_tile(chunk)))
    if not isinstance(kernel, MlpKernel):
        raise TypeError(f"{op}: kernel must be an MlpKernel (a generated MLP memory's), got {type(kernel).__name__}")
    kernel = kernel.for_dims(d_in, d_hidden, d_out)
    kernel.require(op, activation=activation, hidden_norm=hidden_norm, residual=bool(residual))
    return kernel


# --------------------------------------------------------------------------------------------
# finding a generated module's kernels
# --------------------------------------------------------------------------------------------

_SOURCES: dict[str, tuple[str, str]] = {}
_GAPS: dict[str, dict[str, str]] = {}
_LOADED: dict[str, Any] = {}


def register_kernel_source(module_name: str, source: str, filename: str) -> None:
    """Called by :func:`nldsl.compile` for a spec with kernels: the generated module named
    ``module_name`` finds its kernels here (imported on first use, so a model that never asks for
    ``impl='triton'`` never imports triton)."""
    _SOURCES[module_name] = (source, filename)


def register_kernel_gaps(module_name: str, gaps: dict[str, str]) -> None:
    """Called by :func:`nldsl.compile` for a spec none of whose memories has kernels: why, per
    memory (``{"Model.memory": reason}``), for the error a model built with ``impl='triton'`` raises."""
    _GAPS[module_name] = dict(gaps)


def _written_gaps(kernels_path: Path) -> dict | None:
    """The reasons ``nldsl compile`` wrote into ``manifest.json`` for a spec without kernels."""
    try:
        return json.loads(kernels_path.with_name("manifest.json").read_text(encoding="utf-8")).get("no_kernels")
    except (OSError, ValueError, AttributeError):
        return None


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
                gaps = _GAPS.get(module_name) or (_written_gaps(path) if path is not None else None)
                if gaps:
                    where = "none generated: " + "; ".join(f"`{n}`: {why}" for n, why in gaps.items())
                raise RuntimeError(
                    f"impl='triton': no Triton kernels for {module_name} ({where}): kernels are generated for "
                    "specs with linear memories under the Hebbian, delta, gated delta or DGD rule, two-layer "
                    "MLP memories and CMS chains (`nldsl compile` writes them to kernels.py next to module.py)"
                )
            source, filename = path.read_text(encoding="utf-8"), str(path)
        _LOADED[key] = load_module(source, key, filename=filename)
    module = _LOADED[key]
    if getattr(module, "SPEC_SHA256", None) != spec_sha256:
        raise RuntimeError(f"impl='triton': the kernels found for {module_name} were generated from another "
                           "version of the spec (its sha256 differs); compile the spec again")
    return module
