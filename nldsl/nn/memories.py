"""In-context memories as layers: projections and gates around the runtime ops.

Each layer maps ``x [B, T, D] -> y [B, T, D]`` and carries its fast state in a dict of tensors
(never Parameters): ``forward(x, state) -> (y, new_state)``. The slow parts (projections,
gate projections, meta-learned initial states) are Parameters of the outer level.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nldsl import runtime
from nldsl.nn.layers import ShortConv, rotary
from nldsl.runtime.deep_memory import DeepMemoryState, mlp_memory


def _heads(x: Tensor, heads: int) -> Tensor:
    B, T, D = x.shape
    return x.view(B, T, heads, D // heads)


class _Gate(nn.Module):
    """A per-head scalar gate in (0, 1): sigmoid of a projection of the input (eta_t, alpha_t)."""

    def __init__(self, dim: int, heads: int, bias: float):
        super().__init__()
        self.proj = nn.Linear(dim, heads)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, x: Tensor) -> Tensor:  # the logit; callers choose sigmoid or logsigmoid
        return self.proj(x)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class AttentionMemory(nn.Module):
    """Softmax attention as a non-parametric memory (paper Eq. 62-63): the KV cache is its state.

    Causal, optional sliding ``window``, rotary positions counted along the stream, so a
    stream split across calls gives the same outputs as one call.
    """

    def __init__(self, dim: int, heads: int, *, window: int | None = None, qk_norm: str = "none",
                 scope: str = "sequence", impl: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.window = dim, heads, window
        self.qk_norm, self.scope, self.impl = qk_norm, scope, impl
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, state: dict | None = None, return_kv: bool = False):
        """``(y, state)``, or ``(y, state, (k, v))`` with the projected keys and values (before
        rotary positions) for a memory conditioned on this attention's context (Eq. 21, 27)."""
        B, T, _ = x.shape
        pos0 = 0 if state is None else state["position"]
        positions = torch.arange(pos0, pos0 + T, device=x.device)
        q, k, v = (_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        shared = (k, v)
        q, k = rotary(q, positions), rotary(k, positions)
        cache = None if state is None else state["cache"]
        o, cache = runtime.softmax_attention(q, k, v, window=self.window, kv_cache=cache,
                                             output_final_state=True, impl=self.impl)
        y = self.o_proj(o.reshape(B, T, self.dim))
        new = {"cache": cache, "position": pos0 + T}
        return (y, new, shared) if return_kv else (y, new)

    def new_sequence(self, state):
        return state if self.scope == "carry" else None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, window={self.window}, scope={self.scope}"


class LinearMemory(nn.Module):
    """A matrix memory that learns in context: the linear-memory family of the paper.

    ``op`` is the runtime op the compiler chose from the spec's objective, rule, momentum and
    retention: ``linear_attention`` (dot objective, Hebbian), ``delta_rule`` / ``gated_delta_rule``
    (L2 objective, per-token GD), ``titans_linear`` (L2 with momentum or mini-batch chunks),
    ``dgd`` (delta gradient descent), ``omega_rule`` (sliding window of cached inputs), and
    ``mlp_memory`` for the Omega rule where ``omega_rule`` stops (momentum, mini-batch anchors,
    anchor reads, the robust objectives) and for self-generated targets (``signal="self"``, the
    target ``M_a(v)``, Eq. 87; any ``rule``): the memory as a one-layer MLP without a residual,
    ``M(k) = W k`` with ``W = S^T``, whose state is then a ``DeepMemoryState``. ``v_norm="l2"``
    normalises the values (every op).
    ``objective`` (``titans_linear``, ``dgd``, ``omega_rule``, ``mlp_memory``): ``"l2"``; ``"dot"`` (a
    Hebbian write); with ``titans_linear`` and ``mlp_memory`` also ``"l1"``, ``"lp"`` (exponent
    ``p``), ``"huber"`` (threshold ``delta``).

    ``lr`` / ``retention`` / ``momentum``: ``"gate"`` (a per-token, per-head gate from a
    projection of the input), a float (a constant), or ``None`` (absent).
    """

    def __init__(self, dim: int, heads: int, *, op: str, lr, retention=None, momentum=None, objective: str = "l2",
                 p: float | None = None, delta: float | None = None, chunk_size: int = 1, qk_norm: str = "none",
                 conv: int = 0, init: str = "zeros", detach: bool = False, window: int | None = None,
                 scope: str = "sequence", read: str = "running", shared_kv: bool = False, impl: str = "chunked",
                 kernel=None, rule: str = "gd", signal: str = "values", v_norm: str = "none",
                 init_value: float | None = None, precondition: tuple | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.op, self.lr, self.retention, self.momentum = op, lr, retention, momentum
        self.objective, self.p, self.delta = objective, p, delta
        self.chunk_size, self.qk_norm, self.detach, self.window = chunk_size, qk_norm, detach, window
        self.scope, self.impl, self.init, self.read = scope, impl, init, read
        self.rule, self.signal, self.v_norm = rule, signal, v_norm  # rule, signal: op mlp_memory's
        self.precondition = precondition  # op mlp_memory's: (steps, (a, b, c)), Newton-Schulz steps
        if precondition is not None and op != "mlp_memory":
            raise ValueError(f"LinearMemory(op={op!r}): precondition runs on op 'mlp_memory' only")
        # shared_kv: keys and values come from another memory's context (AdaTransformer, Eq. 21)
        # and the input itself is the query: y = M_t x, with no projections of its own
        self.shared_kv = shared_kv
        if not shared_kv:
            self.q_proj = nn.Linear(dim, dim, bias=False)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=False)
            self.o_proj = nn.Linear(dim, dim, bias=False)
        self.conv = nn.ModuleList([ShortConv(dim, conv) for _ in range(3)]) if conv else None
        # gates start at moderate values: learning rate ~0.5, retention ~0.95, momentum ~0.5
        self.lr_gate = _Gate(dim, heads, 0.0) if lr == "gate" else None
        self.retention_gate = _Gate(dim, heads, _logit(0.95)) if retention == "gate" else None
        self.momentum_gate = _Gate(dim, heads, 0.0) if momentum == "gate" else None
        # impl='triton': the spec's generated kernels (a nldsl.runtime._triton.LinearKernel), which
        # fuse the q/k normalisation and the gates' sigmoid / logsigmoid
        self.kernel = None
        if impl == "triton":
            if kernel is None:
                raise ValueError(f"LinearMemory(op={op!r}): impl='triton' needs the memory's generated kernels "
                                 "(kernel=...)")
            self.kernel = kernel.for_heads(self.head_dim, self.head_dim)
            self._check_kernel()
        elif kernel is not None:
            raise ValueError(f"LinearMemory: kernel= is used with impl='triton' only (impl={impl!r})")
        shape = (heads, self.head_dim, self.head_dim)
        if init == "meta":  # the outer level meta-learns the initial state (paper Eq. 28)
            # starts like a linear layer's weight when it is the whole map (shared_kv), else at 0
            self.initial_state = nn.Parameter(torch.randn(shape) * self.head_dim ** -0.5 if shared_kv
                                              else torch.zeros(shape))
        elif init == "random":
            self.register_buffer("initial_state", torch.randn(shape) * self.head_dim ** -0.5)
        elif init == "constant":  # every entry of the state
            self.register_buffer("initial_state", torch.full(shape, float(init_value)))
        else:
            self.initial_state = None

    def _check_kernel(self) -> None:
        """The kernels must implement this memory exactly (they come from the same spec)."""
        spec = self.kernel.spec
        rule = {"linear_attention": "hebbian", "delta_rule": "delta", "gated_delta_rule": "delta", "dgd": "dgd"}
        want = {"rule": rule.get(self.op), "lr": self._kind(self.lr), "decay": self._kind(self.retention),
                "qk_l2norm": self.qk_norm == "l2"}
        if self.lr not in (None, "gate"):
            want["lr_value"] = float(self.lr)
        if self.retention not in (None, "gate"):
            want["decay_value"] = float(self.retention)
        if self.op == "dgd":
            want.update(period=self.chunk_size, read=self.read)
        wrong = {k: (spec[k], v) for k, v in want.items() if spec[k] != v}
        if wrong:
            raise ValueError(f"LinearMemory(op={self.op!r}): its Triton kernels do not match it ("
                             + ", ".join(f"{k}: kernels {a!r}, memory {b!r}" for k, (a, b) in wrong.items()) + ")")

    @staticmethod
    def _kind(rate) -> str:
        return "none" if rate is None else "gate" if rate == "gate" else "const"

    def _run_kernel(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, S0, scale):
        """The generated kernels on the raw q, k (normalised inside them) and the gates' logits."""
        spec = self.kernel.spec
        lr = self.lr_gate(x) if spec["lr"] == "gate" else None
        g = self.retention_gate(x) if spec["decay"] == "gate" else None
        return self.kernel(q, k, v, lr, g, scale=scale, initial_state=S0, output_final_state=True)

    # -- gates -------------------------------------------------------------------------------
    def _rate(self, gate: _Gate | None, const, x: Tensor, log: bool = False):
        if gate is not None:
            logit = gate(x)
            return F.logsigmoid(logit) if log else torch.sigmoid(logit)
        if const is None:
            return None
        B, T, _ = x.shape
        value = torch.full((B, T, self.heads), float(const), dtype=x.dtype, device=x.device)
        return value.clamp_min(1e-30).log() if log else value

    def forward(self, x: Tensor, state: dict | None = None,
                kv: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict]:
        B, T, _ = x.shape
        if self.shared_kv:
            if kv is None:
                raise ValueError("this memory reads another memory's keys and values: pass kv=(k, v)")
            q, k, v = x, kv[0].reshape(B, T, self.dim), kv[1].reshape(B, T, self.dim)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new: dict = {}
        if self.conv is not None:
            conv_state = (None, None, None) if state is None else state["conv"]
            outs = [c(t, s) for c, t, s in zip(self.conv, (q, k, v), conv_state)]
            (q, cq), (k, ck), (v, cv) = outs
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
            new["conv"] = (cq, ck, cv)
        q, k, v = _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads)
        if self.qk_norm == "l2" and self.kernel is None:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.v_norm == "l2":
            v = F.normalize(v, dim=-1)
        if state is not None:
            S0 = state["S"]
        elif self.initial_state is not None:
            S0 = self.initial_state.unsqueeze(0).expand(B, *self.initial_state.shape).to(x.dtype)
        else:
            S0 = None
        write_k, write_v = (k.detach(), v.detach()) if self.detach else (k, v)
        common = dict(initial_state=S0, output_final_state=True, impl=self.impl)
        if self.shared_kv:
            common["scale"] = 1.0  # y = M x exactly, as the MLP it replaces
        if self.kernel is not None:
            o, S = self._run_kernel(x, q, write_k, write_v, S0, common.get("scale"))
            new["S"] = S
            y = o.reshape(B, T, self.dim)
            return (y if self.shared_kv else self.o_proj(y)), new
        lr = self._rate(self.lr_gate, self.lr, x)
        if self.op == "linear_attention":
            g = self._rate(self.retention_gate, self.retention, x, log=True)
            vv = write_v * lr.unsqueeze(-1) if lr is not None else write_v
            o, S = runtime.linear_attention(q, write_k, vv, g=g, read=self.read, **common)
        elif self.op == "delta_rule":
            o, S = runtime.delta_rule(q, write_k, write_v, lr, **common)
        elif self.op == "gated_delta_rule":
            g = self._rate(self.retention_gate, self.retention, x, log=True)
            o, S = runtime.gated_delta_rule(q, write_k, write_v, lr, g, **common)
        elif self.op == "titans_linear":  # Titans' symbols: alpha forgets (1 - retention)
            keep = self._rate(self.retention_gate, self.retention, x)
            forget = 0.0 if keep is None else 1 - keep
            mom = self._rate(self.momentum_gate, self.momentum, x)
            o, S = runtime.titans_linear(q, write_k, write_v, lr, 0.0 if mom is None else mom, forget,
                                         chunk_size=self.chunk_size, read=self.read, objective=self.objective,
                                         p=self.p, delta=self.delta, **common)
        elif self.op == "dgd":
            keep = self._rate(self.retention_gate, self.retention, x)
            o, S = runtime.dgd(q, write_k, write_v, lr, 1.0 if keep is None else keep,
                               chunk_size=self.chunk_size, read=self.read, objective=self.objective, **common)
        elif self.op == "omega_rule":
            keep = self._rate(self.retention_gate, self.retention, x)
            o, S = runtime.omega_rule(q, write_k, write_v, lr, 1.0 if keep is None else keep, window=self.window,
                                      objective=self.objective, read=self.read, **common)
        elif self.op == "mlp_memory":  # W = S^T; the linear ops' query scale
            keep = self._rate(self.retention_gate, self.retention, x)
            mom = self._rate(self.momentum_gate, self.momentum, x)
            carried = isinstance(S0, DeepMemoryState)
            W0 = S0.transpose(-1, -2) if isinstance(S0, Tensor) else q.new_zeros(self.heads, self.head_dim,
                                                                                 self.head_dim)
            o, S = mlp_memory(q, write_k, write_v, lr, keep, mom, params=None if carried else [W0],
                              initial_state=S0 if carried else None, chunk_size=self.chunk_size,
                              read=self.read, objective=self.objective, p=self.p, delta=self.delta,
                              rule=self.rule, window=self.window if self.rule == "omega" else 1,
                              signal=self.signal, activation="identity", residual=False,
                              scale=common.get("scale", self.head_dim ** -0.5), output_final_state=True,
                              impl=self.impl, precondition=self.precondition)
        else:
            raise ValueError(f"LinearMemory: unknown op {self.op!r}")
        new["S"] = S
        y = o.reshape(B, T, self.dim)
        return (y if self.shared_kv else self.o_proj(y)), new

    def new_sequence(self, state):
        return state if self.scope == "carry" else None

    def extra_repr(self) -> str:
        return (f"op={self.op}, heads={self.heads}, lr={self.lr}, retention={self.retention}, "
                f"momentum={self.momentum}, chunk={self.chunk_size}, init={self.init}, scope={self.scope}")
