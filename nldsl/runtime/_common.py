"""Shared plumbing for the runtime memory ops: argument checks, impl dispatch, chunk layout.

Everything here is op-independent. The maths of each op lives in its own module.

Layout conventions (flash-linear-attention's):

* ``q, k``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; per-token gates: ``[B, T, H]``.
* the recurrent state of one head is a ``[K, V]`` matrix ``S``; the op reads
  ``o_t = scale * S_t^T q_t`` (a row vector ``q_t S_t``).
* internally the chunked paths work on ``[B, H, N, C, ...]`` (N chunks of C tokens).

Precision: states are kept in ``promote(input dtypes, float32)``: bf16/fp16 inputs get a float32
state, float64 stays float64. Outputs are cast back to ``q.dtype``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MemoryOutput",
    "dispatch",
    "check_qkv",
    "check_gate",
    "check_state",
    "compute_dtype",
    "resolve_scale",
    "check_chunk_size",
    "to_chunks",
    "from_chunks",
    "to_chunk_major",
    "chunk_major_rows",
    "segment_products",
    "segment_products_log",
    "ut_apply",
    "objective_gradient",
    "output_error",
    "check_objective",
    "OBJECTIVES",
]


class MemoryOutput(NamedTuple):
    """What every runtime op returns: ``(o, final_state)``.

    ``o`` has the shape of ``v`` (``[B, T, H, V]``) and ``q``'s dtype. ``final_state`` is None
    unless ``output_final_state=True``; its type is op-specific (a ``[B, H, K, V]`` tensor for
    the plain linear memories, a small NamedTuple where more than the matrix must be carried for
    an exact continuation of the stream).
    """

    o: Tensor
    final_state: Any


# --------------------------------------------------------------------------------------------
# impl dispatch (no silent fallback)
# --------------------------------------------------------------------------------------------

@functools.cache  # one wrapper per implementation, not one per call of an op
def without_autocast(fn: Callable) -> Callable:
    """``fn`` run with autocast off. The ops compute in the dtype they choose (:func:`compute_dtype`:
    the state's, float32 at least) and return outputs in their input's dtype; under a caller's
    autocast (mixed-precision training) their products would come out in bfloat16 behind their
    back and meet float32 states in in-place sums, which torch refuses."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not active:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            return fn(*args, **kwargs)
    return run


def dispatch(op: str, impl: str, impls: Mapping[str, Callable[..., MemoryOutput]]):
    """Return the implementation ``impls[impl]`` of ``op`` (run with autocast off, see
    :func:`without_autocast`), or raise a ValueError that names the valid choices. ``"triton"``
    gets its own message for ops that have no Triton kernel yet: we never fall back to another
    implementation behind the caller's back."""
    if impl in impls:
        return without_autocast(impls[impl])
    valid = ", ".join(repr(name) for name in impls)
    if impl == "triton":
        raise ValueError(
            f"{op}: no Triton kernel exists yet for this op (valid impl values: {valid}); "
            "pass one of those explicitly"
        )
    raise ValueError(f"{op}: unknown impl {impl!r}; valid impl values: {valid}")


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """Check ``q, k: [B, T, H, K]`` and ``v: [B, T, H, V]``; return ``(B, T, H, K, V)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {_describe(x)}")
        if x.dim() != 4:
            raise ValueError(
                f"{op}: {name} must have shape [B, T, H, D] (4 dims), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(
            f"{op}: q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and "
            f"{tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v must have shape [B, T, H, V] with the B, T, H of q {tuple(q.shape[:3])}, "
            f"got {tuple(v.shape)}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError(f"{op}: the sequence must hold at least one token (T={T})")
    return B, T, H, K, v.shape[-1]


def check_gate(op: str, name: str, x: Any, B: int, T: int, H: int, like: Tensor) -> Tensor:
    """A per-token, per-head scalar (``[B, T, H]``). A Python number is accepted as a constant and
    broadcast (no gradient flows to it)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        # at least float32, so a constant like 0.3 is not rounded to bf16 on its way in
        dt = torch.promote_types(like.dtype, torch.float32)
        return torch.full((B, T, H), float(x), dtype=dt, device=like.device)
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor of shape [B, T, H] or a number, got {_describe(x)}")
    if tuple(x.shape) != (B, T, H):
        raise ValueError(f"{op}: {name} must have shape [B, T, H] = {(B, T, H)}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{op}: {name} is on {x.device} but q is on {like.device}")
    return x


def check_state(op: str, name: str, x: Any, shape: Sequence[int], like: Tensor) -> Tensor:
    """A state tensor of an exact shape, on ``like``'s device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor of shape {tuple(shape)}, got {_describe(x)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{op}: {name} is on {x.device} but q is on {like.device}")
    return x


def contiguous(*tensors):
    """The tensors made contiguous (None stays None): the kernels compute row offsets from shapes."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def compute_dtype(*xs: Any) -> torch.dtype:
    """The dtype the state is kept in: the promotion of the inputs' dtypes with float32."""
    dt = torch.float32
    for x in xs:
        if isinstance(x, Tensor):
            dt = torch.promote_types(dt, x.dtype)
    return dt


def resolve_scale(op: str, scale: float | None, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a number or None (= K ** -0.5), got {_describe(scale)}")
    return float(scale)


def check_chunk_size(op: str, chunk_size: Any, name: str = "chunk_size") -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {chunk_size!r}")
    return chunk_size


# --------------------------------------------------------------------------------------------
# chunk layout
# --------------------------------------------------------------------------------------------

def to_chunks(x: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """``[B, T, H, *rest]`` -> ``[B, H, N, C, *rest]`` in ``dtype``, zero-padding T up to N*C.

    Zero padding is only used where a padded token is an exact no-op for the op at hand (the
    callers say why); it never changes the real tokens' outputs because every op is causal.
    """
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    N = -(-T // C)
    pad = N * C - T
    x = x.to(dtype)
    if pad:
        x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad))  # pad dim 1 (T) only
    x = x.reshape(B, N, C, H, *rest)
    # [B, N, C, H, *rest] -> [B, H, N, C, *rest]
    return x.permute(0, 3, 1, 2, *range(4, 4 + len(rest))).contiguous()


def from_chunks(x: Tensor, T: int) -> Tensor:
    """``[B, H, N, C, *rest]`` -> ``[B, T, H, *rest]`` (drops the padding)."""
    B, H, N, C = x.shape[:4]
    rest = x.shape[4:]
    x = x.permute(0, 2, 3, 1, *range(4, 4 + len(rest))).reshape(B, N * C, H, *rest)
    return x[:, :T]


def to_chunk_major(x: Tensor, C: int, dtype: torch.dtype, scale: float | None = None) -> Tensor:
    """``[B, T, H, *rest]`` -> ``[N, B*H, C, *rest]`` in ``dtype``, zero-padding T up to N*C, in
    one copy (times ``scale`` if given).

    Chunk-major: ``out[n]`` holds chunk n of every (batch, head) as one contiguous block, so the
    ops that walk the chunks in order (the delta rule's chunked path) read each chunk's operands
    as plain 3-D batched matrices.
    """
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, N * C - T))  # pad dim 1 (T) only
    x = x.reshape(B, N, C, H, *rest).permute(1, 0, 3, 2, *range(4, 4 + len(rest)))
    out = torch.empty((N, B, H, C, *rest), dtype=dtype, device=x.device)
    if scale is None:
        out.copy_(x)
    else:
        torch.mul(x, scale, out=out)
    return out.view(N, B * H, C, *rest)


def chunk_major_rows(x: Tensor, C: int, chunks: slice) -> Tensor:
    """The chunks ``chunks`` of a ``[B, N*C, H, D]`` tensor as a ``[m, B, H, C, D]`` view, the
    layout of ``to_chunk_major``'s chunks ``[m, B*H, C, D]``: results computed chunk-major are
    written into a ``[B, T, H, D]`` output through it, without a chunk-major copy of the whole."""
    B, TC, H, D = x.shape
    return x.view(B, TC // C, C, H, D)[:, chunks].permute(1, 0, 3, 2, 4)


def segment_products(a: Tensor) -> Tensor:
    """Products of a multiplicative gate over every segment of a chunk.

    ``a``: ``[..., C]`` (the gates of steps 1..C). Returns ``P``: ``[..., C+1, C+1]`` with
    ``P[t, j] = prod_{l=j+1}^{t} a_l`` for ``0 <= j <= t <= C`` (so ``P[t, t] = 1``; index 0 is the
    chunk start, ``P[t, 0]`` the product from the chunk start to step t) and 0 above the
    diagonal. Computed with a cumulative product, not through logarithms, so gates that are
    exactly 0 (a momentum switched off, a memory wiped) are exact and differentiable.
    """
    C = a.shape[-1]
    a_ext = F.pad(a, (1, 0), value=1.0)  # a_ext[0] = 1: the chunk start is not a step
    later, keep, one = _segment_masks(C, a.device, a.dtype)
    E = torch.where(later, a_ext.unsqueeze(-2), one)
    R = torch.cumprod(E, dim=-1)  # R[j, t] = prod_{l=j+1}^{t} a_l (t >= j), 1 for t < j
    return R.transpose(-1, -2) * keep  # keep P[t, j] for j <= t


@functools.lru_cache(maxsize=256)
def _segment_masks(C: int, device: torch.device, dtype: torch.dtype):
    """Constants of :func:`segment_products` for a chunk of C steps (built once, never written):
    ``later[j, t] = t > j``, its complement as ``dtype``, and a scalar one."""
    idx = torch.arange(C + 1, device=device)
    later = idx[None, :] > idx[:, None]  # [j, t]: t > j
    return later, (~later).to(dtype), torch.ones((), dtype=dtype, device=device)


def segment_products_log(g: Tensor) -> Tensor:
    """As :func:`segment_products` for a gate given in log space (``a = exp(g)``, fla's ``g``):
    ``P[t, j] = exp(sum_{l=j+1}^{t} g_l)``, computed as ``exp(b_t - b_j)`` of the chunk-local
    cumulative sums, masked *before* the exponential so the upper triangle cannot overflow."""
    b = F.pad(g.cumsum(-1), (1, 0))  # b_0 = 0 at the chunk start
    C1 = b.shape[-1]
    idx = torch.arange(C1, device=g.device)
    lower = idx[:, None] >= idx[None, :]  # [t, j]
    diff = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~lower, float("-inf"))
    return diff.exp()


class _UTApply(torch.autograd.Function):
    """``X = (I + strict_lower(A))^{-1} R``: the UT transform applied to right-hand sides ``R``.

    Forward: the inverse ``T`` by one batched triangular solve against the identity, then one
    matmul. Backward in closed form from the saved ``T`` and ``X`` (``dR = T^T dX``,
    ``dA = -strict_lower(dR X^T)``): two matmuls, where differentiating an inverse and then a
    product would take four, and differentiating a solve needs another (slow) solve.
    """

    @staticmethod
    def forward(ctx, A: Tensor, R: Tensor) -> Tensor:
        C = A.shape[-1]
        eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(A.shape)
        T = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        X = T @ R
        ctx.save_for_backward(T, X)
        return X

    @staticmethod
    def backward(ctx, grad_X: Tensor):
        T, X = ctx.saved_tensors
        grad_R = T.transpose(-1, -2) @ grad_X
        grad_A = -(grad_R @ X.transpose(-1, -2)).tril(-1)
        return grad_A, grad_R


def ut_apply(A: Tensor, R: Tensor) -> Tensor:
    """``(I + strict_lower(A))^{-1} R`` batched over leading dims, differentiable in ``A`` and
    ``R`` (see :class:`_UTApply`); only ``A``'s strict lower triangle is read. The UT transform
    of the delta-rule family's chunked paths."""
    return _UTApply.apply(A, R)


def _power_at_nonzero(r: Tensor, e: float) -> Tensor:
    """``|r|^e`` with every derivative taken as 0 where ``r == 0``. For ``lp`` with ``p < 2`` the
    gradient's own derivative is infinite there (an exactly zero residual happens: a memory whose
    output and self-generated target both start at 0), and the outer gradient through the write
    would be NaN; 0 is the convention torch takes for ``abs`` at 0. The zeros are replaced before
    the power, so its backward never sees them."""
    zero = r == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, r).abs().pow(e))


def objective_gradient(objective: str, diff: Tensor, *, p: float | None = None,
                       delta: float | None = None) -> Tensor:
    """dL/d(prediction) for ``diff = prediction - target`` (``dot`` is handled apart): ``l2``
    ``1/2 ||d||^2``, ``l1`` ``||d||_1``, ``lp`` ``1/p ||d||_p^p``, ``huber`` (threshold ``delta``,
    default 1): the robust objectives of the Miras family (paper section 5)."""
    if objective == "l2":
        return diff
    if objective == "l1":
        return torch.sign(diff)
    if objective == "lp":
        if p is None:
            raise ValueError("objective lp needs its exponent p")
        return _power_at_nonzero(diff, p - 1) * torch.sign(diff)
    if objective == "huber":
        d = 1.0 if delta is None else delta
        return diff.clamp(-d, d)
    raise ValueError(f"objective {objective!r} has no residual gradient")


def output_error(y: Tensor | None, target: Tensor, objective: str, p: float | None = None,
                 delta: float | None = None) -> Tensor:
    """The objective's gradient at the memory's output ``y``: ``-target`` for dot (``y`` unused,
    may be None), else :func:`objective_gradient` of the residual ``y - target``."""
    if objective == "dot":
        return -target
    return objective_gradient(objective, y - target, p=p, delta=delta)


#: the objectives of :func:`objective_gradient` (and of the memories that take more than l2 and dot)
OBJECTIVES = ("dot", "l2", "l1", "lp", "huber")


def objective_loss(objective: str, y: Tensor, target: Tensor, p: float | None = None,
                   delta: float | None = None) -> Tensor:
    """The objective as written, summed over the output (what the reference paths differentiate
    with torch.func; the chunked paths use its derivative, :func:`output_error`)."""
    if objective == "dot":
        return -(y * target).sum()
    r = y - target
    if objective == "l2":
        return 0.5 * (r ** 2).sum()
    if objective == "l1":
        return r.abs().sum()
    if objective == "lp":
        return _power_at_nonzero(r, p).sum() / p
    d = 1.0 if delta is None else delta  # huber
    return torch.where(r.abs() <= d, 0.5 * r ** 2, d * (r.abs() - 0.5 * d)).sum()


def check_read(op: str, read: str) -> None:
    """A memory's read mode: ``"running"`` (after the token's write) or ``"anchor"`` (the chunk's
    anchor state; at a period of one token, before the write)."""
    if read not in ("running", "anchor"):
        raise ValueError(f"{op}: read must be 'running' or 'anchor', got {read!r}")


def check_kernel_objective(op: str, impl: str, objective: str) -> None:
    """The MLP Triton kernel computes the l2 and dot objectives' errors; the others are chunked only."""
    if impl == "triton" and objective not in ("l2", "dot"):
        raise ValueError(f"{op}: the Triton kernel takes the l2 or dot objective; use impl='chunked' for "
                         f"{objective!r}")


def check_objective(op: str, objective: str, p: float | None, delta: float | None) -> None:
    """An objective of :data:`OBJECTIVES` with its parameter: ``lp``'s exponent ``p >= 1`` (required),
    ``huber``'s threshold ``delta > 0`` (optional, default 1); no parameter for the others."""
    if objective not in OBJECTIVES:
        raise ValueError(f"{op}: objective must be one of {OBJECTIVES}, got {objective!r}")
    if (p is not None) != (objective == "lp") or (p is not None and not p >= 1):
        raise ValueError(f"{op}: objective 'lp' takes an exponent p >= 1 (and only it), got p={p!r}")
    if delta is not None and (objective != "huber" or not delta > 0):
        raise ValueError(f"{op}: delta is the threshold of objective 'huber', a number > 0, got {delta!r}")
