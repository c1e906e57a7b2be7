"""Deep memories as layers: a Titans MLP memory, self-modifying Titans, and the CMS chain.

The slow parts (projections, gate projections, the memories' meta-learned initial weights)
are Parameters of the outer level; the fast weights live in the state returned by
``forward(x, state) -> (y, state)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nldsl.nn.layers import ShortConv
from nldsl.nn.memories import _Gate, _heads, _logit
from nldsl.runtime.cms import CmsState, _cms_chain, batch_view, zero_sum
from nldsl.runtime.deep_memory import mlp_memory
from nldsl.runtime.self_modifying import self_modifying_titans


def _mlp_weights(heads: int, d_in: int, hidden: int, d_out: int, depth: int, residual: bool):
    """Initial MLP weights in application order, ``[heads, d_out, d_in]`` each; with a residual
    the last layer starts at zero so the memory starts as the identity map."""
    dims = [d_in] + [hidden] * (depth - 1) + [d_out]
    ws = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        w = torch.randn(heads, b, a) * a ** -0.5
        if residual and i == len(dims) - 2:
            w.zero_()
        ws.append(nn.Parameter(w))
    return nn.ParameterList(ws)


def _mlp_kernel(op: str, impl: str, kernel, **config):
    """impl='triton': the memory's fused MLP gradient kernel (the spec's ``kernel``, rendered for
    these dims, or one rendered for this configuration when None), checked against the memory:
    anything it does not implement raises here, never falls back. Otherwise None."""
    if impl != "triton":
        if kernel is not None:
            raise ValueError(f"{op}: kernel= is used with impl='triton' only (impl={impl!r})")
        return None
    from nldsl.runtime._triton import runtime_mlp_kernel

    return runtime_mlp_kernel(op, kernel, **config)


class DeepMemory(nn.Module):
    """An MLP memory trained in context (Titans' long-term memory, paper section 8.1). ``p`` and
    ``delta`` are the ``lp`` and ``huber`` objectives' parameters; ``window`` the Omega rule's
    (``rule="omega"``)."""

    def __init__(self, dim: int, heads: int, *, depth: int = 2, expansion: float = 4.0,
                 residual: bool = True, activation: str = "gelu", objective: str = "l2",
                 p: float | None = None, delta: float | None = None,
                 rule: str = "gd", window: int = 1, lr="gate", retention=None, momentum=None, chunk_size: int = 1,
                 read: str = "anchor", qk_norm: str = "none", conv: int = 0, detach: bool = False,
                 init: str = "meta", scope: str = "sequence", v_norm: str = "none",
                 hidden_norm: str = "none", impl: str = "chunked", kernel=None, init_value: float | None = None,
                 precondition: tuple | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if precondition is not None and impl == "triton":
            raise ValueError("DeepMemory: the Triton kernel computes plain steps, not Newton-Schulz ones "
                             "(precondition); use impl='chunked'")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.precondition = precondition  # (steps, (a, b, c)): Muon as the inner optimizer
        self.objective, self.rule, self.lr, self.retention, self.momentum = objective, rule, lr, retention, momentum
        self.window = window
        self.chunk_size, self.read, self.qk_norm, self.detach = chunk_size, read, qk_norm, detach
        self.scope, self.impl, self.activation, self.residual = scope, impl, activation, residual
        self.v_norm, self.hidden_norm, self.p, self.delta = v_norm, hidden_norm, p, delta
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.conv = nn.ModuleList([ShortConv(dim, conv) for _ in range(3)]) if conv else None
        # a chunk applies up to chunk_size steps taken at one anchor, each token's gradient up to
        # window times: a gated step is bounded by 1 / (chunk_size window) (the chunk's steps sum
        # to at most 1) and starts at half that
        self.lr_max = 1.0 / (chunk_size * window)
        self.lr_gate = _Gate(dim, heads, 0.0) if lr == "gate" else None
        self.retention_gate = _Gate(dim, heads, _logit(0.99)) if retention == "gate" else None
        self.momentum_gate = _Gate(dim, heads, _logit(0.5)) if momentum == "gate" else None
        hidden = max(1, int(self.head_dim * expansion))
        self.weights = _mlp_weights(heads, self.head_dim, hidden, self.head_dim, depth, residual)
        if init != "meta":  # a fixed start (random, zeros or a constant): not learned by the outer level
            self.weights.requires_grad_(False)
            if init in ("zeros", "constant"):
                with torch.no_grad():
                    for w in self.weights:
                        w.fill_(0.0 if init == "zeros" else float(init_value))
        self.kernel = _mlp_kernel("DeepMemory", impl, kernel, depth=depth, d_in=self.head_dim, d_hidden=hidden,
                                  d_out=self.head_dim, activation=activation, hidden_norm=hidden_norm,
                                  residual=residual, chunk=chunk_size)

    def _rate(self, gate, const, x):
        if gate is not None:
            return torch.sigmoid(gate(x))
        return None if const is None else float(const)

    def forward(self, x: Tensor, state=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.conv is not None:
            prev = (None, None, None) if state is None else state["conv"]
            outs = [c(t, s) for c, t, s in zip(self.conv, (q, k, v), prev)]
            (q, cq), (k, ck), (v, cv) = outs
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
            conv_state = (cq, ck, cv)
        q, k, v = _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads)
        if self.qk_norm == "l2":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.v_norm == "l2":
            v = F.normalize(v, dim=-1)
        lr = self._rate(self.lr_gate, self.lr, x)
        if self.lr_gate is not None:
            lr = lr * self.lr_max
        o, mem_state = mlp_memory(
            q, k, v, lr, self._rate(self.retention_gate, self.retention, x),
            self._rate(self.momentum_gate, self.momentum, x), params=list(self.weights),
            chunk_size=self.chunk_size, read=self.read, objective=self.objective, p=self.p, delta=self.delta,
            rule=self.rule, window=self.window, activation=self.activation, hidden_norm=self.hidden_norm,
            residual=self.residual, detach=self.detach, initial_state=None if state is None else state["memory"],
            output_final_state=True, impl=self.impl, kernel=self.kernel, precondition=self.precondition)
        y = self.o_proj(o.reshape(B, T, self.dim))
        return y, {"memory": mem_state, "conv": conv_state}

    def new_sequence(self, state):
        return state if self.scope == "carry" else None

    def extra_repr(self) -> str:
        rule = f"omega(window={self.window})" if self.rule == "omega" else self.rule
        pre = "" if self.precondition is None else f", newton_schulz(steps={self.precondition[0]})"
        return (f"heads={self.heads}, objective={self.objective}, rule={rule}{pre}, chunk={self.chunk_size}, "
                f"read={self.read}, scope={self.scope}")


class SelfModifyingTitans(nn.Module):
    """Self-modifying (deep self-referential) Titans, paper Eq. 86-91 (and Hope, Eq. 94-96).

    ``generated`` lists the inputs produced by memories updated in context (k, v, q, eta,
    alpha); the others come from static projections of the outer level. Each generating memory
    reads its own projection of x (Fig. 5's q/k/v linears before the block): with one shared
    input, k, v and q would all start as functions of the same vector. ``lr`` / ``retention``
    given as numbers (eta / alpha not generated) are constant rates instead of gates of x;
    ``signal="values"`` makes every memory learn v itself instead of its own M(v) (Eq. 87).
    """

    def __init__(self, dim: int, heads: int, *, generated: tuple[str, ...], chunk_size: int,
                 gen_chunk_size: int, depth: int = 2, expansion: float = 1.0, residual: bool = True,
                 activation: str = "gelu", objective: str = "l2", rule: str = "dgd", momentum=None,
                 retention: bool | float = True, lr: float | None = None, read: str = "anchor",
                 signal: str = "self", qk_norm: str = "l2", conv: int = 4,
                 detach: bool = False, scope: str = "sequence", v_norm: str = "none",
                 hidden_norm: str = "none", eta_max: float | None = None, impl: str = "chunked",
                 kernel=None, init: str = "meta", p: float | None = None, delta: float | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        # constant rates (numbers) replace the gates of x; nothing generates them
        self.lr_value = None if lr is None else float(lr)
        self.retention_value = None if isinstance(retention, bool) else float(retention)
        for name, c, source in (("lr", self.lr_value, "eta"), ("retention", self.retention_value, "alpha")):
            if c is not None and source in generated:
                raise ValueError(f"a constant {name} excludes a generated {source}")
        retention = bool(retention) if isinstance(retention, bool) else True
        # without retention alpha is fixed at 1: nothing generates it
        self.generated = tuple(g for g in generated if g != "alpha" or retention)
        self.chunk_size, self.gen_chunk_size = chunk_size, gen_chunk_size
        self.objective, self.rule, self.momentum, self.retention = objective, rule, momentum, retention
        self.read, self.qk_norm, self.detach, self.scope, self.impl = read, qk_norm, detach, scope, impl
        self.activation, self.residual, self.p, self.delta, self.signal = activation, residual, p, delta, signal
        D = self.head_dim
        hidden = max(1, int(D * expansion))
        # one input per generating memory (the runtime's [B, T, G, H, D] form)
        self.in_proj = nn.Linear(dim, dim * max(1, len(self.generated)), bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.memories = nn.ModuleDict({"memory": _mlp_weights(heads, D, hidden, D, depth, residual)})
        if init == "random":  # the main memory's start is fixed, not learned by the outer level
            self.memories["memory"].requires_grad_(False)
        for name in self.generated:
            # residual M_k, M_v, M_q start as the identity, like M_memory (each reads its own input,
            # so k, v, q differ from the start); M_eta, M_alpha start at 0: constant gates at first
            scalar = name in ("eta", "alpha")
            self.memories[name] = _mlp_weights(heads, D, hidden, 1 if scalar else D, depth, residual or scalar)
        for name in ("q", "k", "v"):
            if name not in self.generated:
                self.add_module(f"{name}_proj", nn.Linear(dim, dim, bias=False))
        # static q, k, v pass a convolution of their own, as generated ones do inside the op (a
        # static k could not otherwise bind a key to the next token's value)
        static = [n for n in ("q", "k", "v") if n not in self.generated]
        self.static_conv = nn.ModuleDict({n: ShortConv(dim, conv) for n in static}) if conv and static else None
        # linear gates of x: the static eta / alpha, or, when generated, the scalar memories' skip
        # path (a d -> 1 memory cannot add its input as the vector ones do; a linear read of x takes
        # that role, so the gates can become data-dependent as fast as Titans' linear gates)
        self.eta_gate = _Gate(dim, heads, 0.0) if self.lr_value is None else None
        self.alpha_gate = _Gate(dim, heads, 0.0) if retention and self.retention_value is None else None
        self.momentum_gate = _Gate(dim, heads, 0.0) if momentum == "gate" else None
        # learnable squashing of the generated rates: eta = eta_max * sigmoid(. + eta_bias), with
        # eta_max = 1 / chunk_size by default, so that the steps a chunk takes at one anchor sum to
        # at most 1 (starting at half that); retention starts at 0.99 per token, as Titans' gate
        # does (at 0.982, sigmoid(4), a pair written at the start of a 64-token sequence kept a
        # third of its weight by the end, and Hope left MQAR's plateau within the demo's budget
        # for two seeds of four instead of four of four)
        self.v_norm, self.hidden_norm = v_norm, hidden_norm
        self.eta_max = 1.0 / chunk_size if eta_max is None else eta_max
        self.eta_bias = nn.Parameter(torch.tensor(0.0)) if self.lr_value is None else None
        self.alpha_bias = nn.Parameter(torch.tensor(_logit(0.99))) if self.alpha_gate is not None else None
        self.conv_weight = nn.Parameter(self._conv_init(len(self.generated), heads, D, conv)) if conv else None
        self.kernel = _mlp_kernel("SelfModifyingTitans", impl, kernel, depth=depth, d_in=D, d_hidden=hidden, d_out=D,
                                  activation=activation, hidden_norm=hidden_norm, residual=residual,
                                  chunk=min(chunk_size, gen_chunk_size))

    @staticmethod
    def _conv_init(inputs, heads, D, width):
        w = torch.randn(*((inputs,) if inputs else ()), heads, D, width) * 0.02
        w[..., -1] += 1.0  # starts near the identity
        return w

    def forward(self, x: Tensor, state=None):
        B, T, _ = x.shape
        h = self.in_proj(x)
        h = h.view(B, T, len(self.generated), self.heads, self.head_dim) if self.generated else _heads(h, self.heads)
        static, convs = {}, {}
        prev = {} if state is None else state["conv"]
        for name in ("q", "k", "v"):
            if name not in self.generated:
                t = getattr(self, f"{name}_proj")(x)
                if self.static_conv is not None:
                    t, convs[name] = self.static_conv[name](t, prev.get(name))
                static[name] = _heads(t, self.heads)
        beta = None
        if self.momentum_gate is not None:
            beta = torch.sigmoid(self.momentum_gate(x))
        elif isinstance(self.momentum, (int, float)) and not isinstance(self.momentum, bool):
            beta = float(self.momentum)
        params = {name: list(ws) for name, ws in self.memories.items()}
        y, new = self_modifying_titans(
            h, params=params, chunk_size=self.chunk_size, gen_chunk_size=self.gen_chunk_size,
            eta_logits=None if self.eta_gate is None else self.eta_gate(x),
            alpha_logits=None if self.alpha_gate is None else self.alpha_gate(x),
            eta=self.lr_value, alpha=self.retention_value,
            beta_momentum=beta, eta_max=self.eta_max, eta_bias=0.0 if self.eta_bias is None else self.eta_bias,
            alpha_bias=0.0 if self.alpha_bias is None else self.alpha_bias,
            retention=self.retention, conv_weight=self.conv_weight, qk_norm=self.qk_norm == "l2",
            v_norm=self.v_norm == "l2", hidden_norm=self.hidden_norm,
            rule=self.rule, objective=self.objective, p=self.p, delta=self.delta, read=self.read, signal=self.signal,
            activation=self.activation, residual=self.residual, detach=self.detach,
            initial_state=None if state is None else state["memory"],
            output_final_state=True, impl=self.impl, kernel=self.kernel, **static)
        return self.o_proj(y.reshape(B, T, self.dim)), {"memory": new, "conv": convs}

    def new_sequence(self, state):
        return state if self.scope == "carry" else None

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={value}" for name, value in (
            ("lr", self.lr_value), ("retention", self.retention_value),
            ("signal", None if self.signal == "self" else self.signal)) if value is not None)
        return (f"heads={self.heads}, generated={self.generated}, chunk={self.chunk_size}, "
                f"gen_chunk={self.gen_chunk_size}, rule={self.rule}, read={self.read}{extra}")


def load_pretrained_mlps(path: str, spec_dir: str | None, levels: tuple[str, ...],
                         shapes: list[list[tuple[int, ...]]]) -> list[list[Tensor]]:
    """The initial weights of CMS levels from a safetensors file (``init pretrained("file")``).

    The file holds each level's MLP in application order as ``"<level>.<i>"`` (``[d_out, d_in]``,
    ``i = 0`` the input-side matrix: the paper's ``W_2`` in ``x + W_1 act(W_2 x)``), or one MLP
    for every level as ``"<i>"``. A relative path is relative to the spec's directory.
    """
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_absolute() and spec_dir is not None:
        file = Path(spec_dir) / file
    if not file.is_file():
        where = f" (relative to the spec's directory {spec_dir})" if spec_dir and not Path(path).is_absolute() else ""
        raise FileNotFoundError(f"init pretrained: no weights file {path!r}{where}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"init pretrained: {path!r} is not a readable safetensors file ({e})") from None
    out = []
    for level, level_shapes in zip(levels, shapes):
        weights = []
        for i, shape in enumerate(level_shapes):
            key = f"{level}.{i}" if f"{level}.{i}" in tensors else str(i)
            if key not in tensors:
                raise ValueError(f"init pretrained: {path!r} has no weight {level}.{i} (or {i}, shared by "
                                 f"every level) for CMS level `{level}`; it holds {sorted(tensors)}")
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise ValueError(f"init pretrained: {path!r}: weight {key} has shape {tuple(t.shape)}, the "
                                 f"level's MLP needs {shape} ([d_out, d_in], application order)")
            weights.append(t)
        out.append(weights)
    return out


class CmsChain(nn.Module):
    """The Continuum Memory System (paper section 7.1): MLP blocks at periods C_1 | C_2 | ...

    With ``signal="surprise"`` the blocks learn from the outer objective's local surprise
    ``delta = dL/dy`` at their output: :meth:`forward` reads (anchor weights) and
    :meth:`learn` writes, given the surprise the model computed for the segment.
    """

    surprise = True
    #: read the blocks' weights outside forward (the writes of a surprise segment, the initial
    #: weights of a new sequence): FSDP gathers the weights for them too
    fsdp_methods = ("learn", "new_sequence")

    def __init__(self, dim: int, *, periods: tuple[int, ...], scopes: tuple[str, ...],
                 variant: str = "sequential", expansion: float = 4.0, depth: int = 2,
                 residual: bool = True, activation: str = "gelu", lr: float = 0.01,
                 momentum: float | None = None, retention: float | None = None, signal: str = "surprise",
                 objective: str = "l2", detach: bool = True,
                 hidden_norm: str = "none", prenorm: str = "none", levels: tuple[str, ...] | None = None,
                 pretrained: str | None = None, spec_dir: str | None = None, impl: str = "chunked",
                 kernel=None, p: float | None = None, huber_delta: float | None = None):
        super().__init__()
        self.dim, self.periods, self.scopes, self.variant = dim, tuple(periods), tuple(scopes), variant
        self.activation, self.residual, self.lr, self.signal = activation, residual, lr, signal
        self.momentum, self.retention = momentum, retention  # each block's optimizer (Eq. 71)
        self.objective, self.detach, self.impl, self.hidden_norm = objective, detach, impl, hidden_norm
        self.prenorm, self.p, self.huber_delta = prenorm, p, huber_delta  # the lp / huber objective's
        self.surprise = signal == "surprise"
        hidden = int(dim * expansion)
        self.blocks = nn.ModuleList(
            [_mlp_weights(1, dim, hidden, dim, depth, residual) for _ in periods])
        for ws in self.blocks:  # a residual MLP block: starts near the identity, not at it
            with torch.no_grad():
                ws[-1].normal_(0.0, hidden ** -0.5 * 0.1)
        if pretrained is not None:  # ad-hoc level stacking (section 7.3): start from a trained MLP
            names = tuple(levels) if levels is not None else tuple(f"level{i}" for i in range(len(periods)))
            shapes = [[tuple(w.shape[1:]) for w in ws] for ws in self.blocks]  # [d_out, d_in] each
            for ws, weights in zip(self.blocks, load_pretrained_mlps(pretrained, spec_dir, names, shapes)):
                with torch.no_grad():
                    for w, t in zip(ws, weights):
                        w[0].copy_(t)
        self.agg = nn.Parameter(torch.ones(len(periods)) / len(periods)) if variant == "independent" else None
        from nldsl.codegen.kernels import kernel_residual  # lazily, as the runtime reaches codegen

        self.kernel = _mlp_kernel("CmsChain", impl, kernel, depth=depth, d_in=dim, d_hidden=hidden, d_out=dim,
                                  activation=activation, hidden_norm=hidden_norm,
                                  residual=kernel_residual(residual, prenorm), chunk=min(periods))
        self.tape: list | None = None  # set by the model while it collects surprise signals
        self._read_pass = None  # (x, state, forwards) of the last taped read, for learn to reuse

    def _params(self):
        return [[w[0] for w in ws] for ws in self.blocks]

    def _run(self, x, state, delta, target=None, lr=None, record=None, reuse=None, donate=False, final=True):
        return _cms_chain(x, self._params(), periods=self.periods, lr=self.lr if lr is None else lr,
                          variant=self.variant, signal=self.signal, delta=delta, target=target,
                          objective=self.objective, p=self.p, huber_delta=self.huber_delta,
                          agg_weights=self.agg, momentum=self.momentum, retention=self.retention,
                          activation=self.activation,
                          hidden_norm=self.hidden_norm, prenorm=self.prenorm, residual=self.residual,
                          detach=self.detach,
                          initial_state=state, output_final_state=final, impl=self.impl, kernel=self.kernel,
                          record=record, reuse=reuse, donate=donate)

    def forward(self, x: Tensor, state=None):
        """Reads with the blocks' chunk-start weights. A surprise-driven chain writes nothing
        here (zero surprise: the chunk grid still advances); the model calls :meth:`learn`
        with the surprise of the segment when it has labels, and the state learn returns takes
        the place of this read's (None while the model collects surprise)."""
        if self.signal == "surprise":  # lr 0: the same result as zero surprise, without the errors
            # while the model collects surprise, keep this read's forward (detached writes: values
            # only) so that learn, which starts from the same state and input, need not redo it
            record = [] if self.tape is not None and self.detach and self.impl != "triton" else None
            y, new, _ = self._run(x, state, torch.zeros_like(x), lr=0.0, record=record, final=self.tape is None)
            if self.tape is not None:
                self.tape.append((self, x, y, state))
                self._read_pass = None if record is None else (x, state, record)
            return y, new
        y, new, _ = self._run(x, state, None, target=x)
        return y, new

    def learn(self, x: Tensor, state, delta: Tensor, donate: bool = False):
        """The state after writing a segment whose output surprise is ``delta``. ``donate``: the
        caller made ``state`` (an earlier :meth:`learn` of the same stream) and drops it, so its
        gradient sums may be accumulated in place."""
        read, self._read_pass = self._read_pass, None
        reuse = read[2] if read is not None and read[0] is x and read[1] is state else None
        return self._run(x, state, delta.detach(), reuse=reuse, donate=donate)[1]

    def new_sequence(self, state):
        """Blocks of sequence-scoped levels restart from their initial weights; blocks of
        ``carry`` levels keep what they learned."""
        if state is None or all(s == "sequence" for s in self.scopes):
            return None
        weights, sums, offsets = list(state.weights), list(state.grad_sum), list(state.offset)
        moms = None if state.momentum is None else list(state.momentum)
        for i, scope in enumerate(self.scopes):
            if scope == "sequence":
                like = weights[i]
                weights[i] = tuple(batch_view(w[0].to(c.dtype), c.shape[0]) for w, c in zip(self.blocks[i], like))
                sums[i] = tuple(zero_sum(g, g.shape[0]) for g in sums[i])
                offsets[i] = 0
                if moms is not None:
                    moms[i] = tuple(zero_sum(m, m.shape[0]) for m in moms[i])
        return CmsState(tuple(weights), tuple(sums), tuple(offsets), None if moms is None else tuple(moms))

    def extra_repr(self) -> str:
        opt = "".join(f", {n}={v}" for n, v in (("momentum", self.momentum), ("retention", self.retention))
                      if v is not None)
        return f"variant={self.variant}, periods={self.periods}, signal={self.signal}, lr={self.lr}{opt}"
