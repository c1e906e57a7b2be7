"""Model IR -> a planned codegen context where every decision is made.

The plan says which runtime layer implements each memory (and with which constants), which
modules each block owns, and the exact lines of the block's forward pass. The template only
prints it. A combination the checker accepts but the compiler cannot build yet is reported
here as a diagnostic at the spec's text (code NL401), never as an error inside torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nldsl.diagnostics import Diagnostic
from nldsl.graph import speed_key
from nldsl.ir import models as M


class Unsupported(Exception):
    def __init__(self, diagnostics: list[Diagnostic]):
        super().__init__("; ".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics


@dataclass
class Submodule:
    attr: str
    ctor: str  # Python source built only from identifiers and repr'd literals
    origin: str  # "file:line" of the spec text it comes from
    doc: str = ""


@dataclass
class BlockPlan:
    class_name: str
    expr: str  # the block expression, printed from the IR
    submodules: list[Submodule] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    stateful: list[str] = field(default_factory=list)
    #: how many of ``forward``'s lines come before the block's first memory that learns from the
    #: surprise (0: no such split); the first layer runs them over a whole call at once
    prefix: int = 0


@dataclass
class ModelPlan:
    class_name: str
    doc: str
    spec_file: str
    params: list[tuple[str, str]]  # (name, repr of default)
    levels: list[tuple[str, str, int, str, str, tuple[str, ...]]]  # name, clock, period, scope, read, holds
    block: BlockPlan
    origin: str
    optimizer: str | None = None


def _repr(v) -> str:
    """Literals reach generated code only through repr."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return repr(v)
    if isinstance(v, tuple):
        return repr(tuple(v))
    raise TypeError(f"not a literal: {v!r}")


def linear_op(mem: M.Memory, level: M.Level) -> str | None:
    """The runtime op of a linear in-context memory, from its objective, rule, momentum, retention,
    period and read mode (None: no op computes it)."""
    obj, rule, momentum = mem.objective.kind, mem.rule.kind, mem.momentum.kind
    period, read = level.period, mem.read
    if momentum in ("delta", "deep"):
        return None
    if mem.inputs.generated():  # self-modifying Titans, its memories one-layer MLPs
        return "self_modifying_titans"
    if mem.precondition.kind != "none":  # Newton-Schulz steps (Muon inner, Atlas): the one-layer MLP memory
        return "mlp_memory" if rule in ("gd", "omega") else None
    if mem.signal == "self":  # its own target M_a(v) (Eq. 87): the one-layer MLP memory takes it
        return "mlp_memory"
    if rule == "omega":  # on dot any period reads running: the Hebbian gradient does not depend on the state
        if momentum == "none" and (period == 1 and obj in ("l2", "dot") or obj == "dot" and read == "running"):
            return "omega_rule"
        return "mlp_memory"  # a one-layer MLP memory: momentum, mini-batch anchors, anchor reads, any objective
    if rule == "dgd":  # with momentum: the one-layer MLP memory's DGD, the same write
        return "dgd" if obj in ("l2", "dot") and momentum == "none" else "mlp_memory"
    if obj == "dot":  # the Hebbian gradient does not depend on the state: any period reads running
        plain = momentum == "none" and (read == "running" or period == 1)  # period 1 anchor: before the write
        return "linear_attention" if plain else "titans_linear"
    if obj in ("l1", "lp", "huber"):  # the robust objectives: a step on the anchor's residual
        return "titans_linear" if rule == "gd" else None
    if obj == "l2" and momentum == "none" and period == 1 and read == "running":
        return "gated_delta_rule" if mem.retention.kind != "none" else "delta_rule"
    if obj == "l2":
        return "titans_linear"  # momentum, mini-batch chunks (gradients at the anchor) or anchor reads
    return None


def _objective_parameter(objective: M.Objective, delta: str = "delta") -> str:
    """The keyword argument of the lp / huber objective's parameter (``p=3.0, ``), or nothing;
    ``delta``: the huber threshold's keyword."""
    if objective.kind == "lp":
        return f"p={_repr(float(objective.p))}, "
    if objective.kind == "huber" and objective.delta is not None:
        return f"{delta}={_repr(float(objective.delta))}, "
    return ""


class Planner:
    def __init__(self, model: M.Model, spans: dict, file: str, display_file: str):
        self.model = model
        self.spans = spans
        self.file = file
        self.display = display_file
        self.problems: list[Diagnostic] = []
        self.levels = {lv.name: lv for lv in model.levels}

    def origin(self, *key) -> str:
        span = self.spans.get(key)
        return f"{self.display}:{span.line}" if span else self.display

    def unsupported(self, message: str, key: tuple, help: str | None = None):
        # at the property the message is about, or, where the spec leaves it to its default, at what
        # holds it (the memory)
        span = next((self.spans[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.spans), None)
        self.problems.append(Diagnostic.at("NL401", message, span, help=help, file=self.file))

    # -- memories -------------------------------------------------------------------------------
    def heads_arg(self, mem: M.Memory) -> str:
        return "config.heads" if mem.heads == self.model.param("heads") else _repr(mem.heads)

    def memory_ctor(self, mem: M.Memory) -> str | None:
        key = (self.model.name, "memory", mem.name)
        level = self.levels.get(mem.level)
        if level is None:
            return None
        scope = level.scope
        if mem.structure.kind == "attention":
            return (f"AttentionMemory(config.dim, {self.heads_arg(mem)}, window={_repr(mem.structure.window)}, "
                    f"qk_norm={_repr(mem.qk_norm)}, scope={_repr(scope)})")
        if mem.structure.kind == "linear":
            return self.linear_ctor(mem, level, key)
        if mem.structure.kind == "mlp":
            return self.deep_ctor(mem, level, key)
        self.unsupported(f"the compiler cannot build `{mem.structure.kind}` memories in a model (`{mem.name}`)",
                         key + ("structure",))
        return None

    def _mlp_args(self, s: M.Structure) -> str:
        return (f"depth={_repr(s.depth)}, expansion={_repr(float(s.expansion))}, residual={_repr(s.residual)}, "
                f"activation={_repr(s.activation)}")

    def deep_ctor(self, mem: M.Memory, level: M.Level, key: tuple) -> str | None:
        """An MLP memory: Titans' deep memory, or self-modifying Titans when inputs are generated."""
        s = mem.structure
        if mem.inputs.generated():
            return self.self_modifying_ctor(mem, level, key, depth=s.depth, expansion=float(s.expansion),
                                            residual=s.residual, activation=s.activation, hidden_norm=s.norm)
        rule, period = mem.rule.kind, level.period
        problems = []
        if rule not in ("gd", "dgd", "omega"):
            problems.append(("rule", f"rule `{rule}`"))
        if mem.momentum.kind in ("delta", "deep"):
            problems.append(("momentum", f"`momentum {mem.momentum.kind}`"))
        if mem.precondition.kind != "none" and rule not in ("gd", "omega"):
            problems.append(("precondition", f"a preconditioner with rule `{rule}` (Newton-Schulz steps take gd or "
                                             "omega)"))
        init = self._init(mem)
        if init is None:
            problems.append(("init", f"initial state `{mem.init.kind}`"))
        for path, what in problems:
            self.unsupported(f"{what} in the deep memory `{mem.name}` is not compiled yet", key + (path,))
        if problems:
            return None
        if mem.signal != "values":
            self.unsupported(f"signal `{mem.signal}` of the deep memory `{mem.name}` without generated inputs "
                             "is not compiled yet", key + ("signal",))
            return None
        lr = self._rate(mem.lr.kind, mem.lr.value)
        ret = self._rate(mem.retention.kind, mem.retention.value)
        window = f"window={_repr(mem.rule.window)}, " if rule == "omega" else ""
        return (f"DeepMemory(config.dim, {self.heads_arg(mem)}, {self._mlp_args(s)}, lr={lr}, "
                f"retention={ret}, chunk_size={period!r}, {window}{self._precondition(mem)}{init}, "
                f"{self._deep_common(mem, level, s.norm)})")

    def self_modifying_ctor(self, mem: M.Memory, level: M.Level, key: tuple, *, depth: int, expansion: float,
                            residual: bool, activation: str, hidden_norm: str) -> str | None:
        """Self-modifying Titans (generated inputs): an MLP memory's, or a linear memory's as a
        one-layer MLP M(x) = W x (its generating memories one-layer too)."""
        rule, kind = mem.rule.kind, "deep" if mem.structure.kind == "mlp" else "linear"
        problems = []
        if rule not in ("gd", "dgd"):
            problems.append(("rule", f"rule `{rule}` (self-modifying memories take gd or dgd)"))
        if mem.momentum.kind in ("delta", "deep"):
            problems.append(("momentum", f"`momentum {mem.momentum.kind}`"))
        if mem.precondition.kind != "none":
            problems.append(("precondition", "a preconditioner on a self-modifying memory"))
        init = self._init(mem)
        if init is None or mem.init.kind not in ("meta", "random"):
            problems.append(("init", f"initial state `{mem.init.kind}`"))
        for path, what in problems:
            self.unsupported(f"{what} in the {kind} memory `{mem.name}` is not compiled yet", key + (path,))
        if problems:
            return None
        generated = mem.inputs.generated()
        scalar = [n for n in ("eta", "alpha") if n in generated]
        if mem.signal == "surprise" or mem.signal == "values" and scalar:
            why = ("the outer objective's surprise" if mem.signal == "surprise" else
                   f"v itself, which M_{scalar[0]} (one number per head) cannot output")
            self.unsupported(f"`{mem.name}` has generated inputs: it learns its own M(v) (`signal self`, Eq. 87) or, "
                             f"with `eta` and `alpha` static, v (`signal values`); not {why}", key + ("signal",))
            return None
        # constant rates stand in for a static eta / alpha's gate of x
        rates = {"lr": "", "retention": f"retention={mem.retention.kind != 'none'}, "}
        for prop, rate, source in (("lr", mem.lr, "eta"), ("retention", mem.retention, "alpha")):
            if rate.kind != "constant":
                continue
            value = self._rate(rate.kind, rate.value)
            if source in generated or value is None:
                why = (f"`{source}=generated`: M_{source} generates it per token" if source in generated
                       else "its value is not a number")
                self.unsupported(f"`{mem.name}`: a constant `{prop}` with {why}", key + (prop,),
                                 help=f"write `{prop} gate`, or make `{source}` static for a constant")
                return None
            rates[prop] = f"{prop}={value}, "
        gen_level = self.levels.get(mem.generators)
        return (f"SelfModifyingTitans(config.dim, {self.heads_arg(mem)}, generated={_repr(tuple(generated))}, "
                f"chunk_size={level.period!r}, gen_chunk_size={gen_level.period!r}, "
                f"depth={_repr(depth)}, expansion={_repr(expansion)}, residual={_repr(residual)}, "
                f"activation={_repr(activation)}, {rates['retention']}{rates['lr']}signal={_repr(mem.signal)}, {init}, "
                f"{self._deep_common(mem, level, hidden_norm)})")

    def _deep_common(self, mem: M.Memory, level: M.Level, hidden_norm: str) -> str:
        """The arguments DeepMemory and SelfModifyingTitans share."""
        mom = self._rate(mem.momentum.kind, mem.momentum.beta)
        return (f"objective={mem.objective.kind!r}, {_objective_parameter(mem.objective)}rule={mem.rule.kind!r}, "
                f"momentum={mom}, read={_repr(mem.read)}, "
                f"qk_norm={_repr(mem.qk_norm)}, v_norm={_repr(mem.v_norm)}, conv={_repr(mem.conv)}, "
                f"hidden_norm={_repr(hidden_norm)}, detach={_repr(mem.writes == 'detached')}, "
                f"scope={_repr(level.scope)}, impl=config.impl, "
                f"kernel=config.kernel({_repr(self.model.name + '.' + mem.name)})")

    @staticmethod
    def _precondition(mem: M.Memory) -> str:
        """The ``precondition=`` keyword of an in-context memory's Newton-Schulz steps (or nothing)."""
        pc = mem.precondition
        if pc.kind == "none":
            return ""
        return f"precondition=({_repr(pc.steps)}, {_repr(tuple(float(c) for c in pc.coefficients))}), "

    def cms_ctor(self, c: M.Cms) -> str | None:
        key = (self.model.name, "cms", c.name)
        first = c.memories[0] if c.memories else None
        if first is None:
            return None
        problems = []
        if first.lr.kind != "constant" or not isinstance(first.lr.value, (int, float)):
            problems.append(("lr", "a learning rate that is not a constant number", "write `lr constant(0.01)`"))
        if first.rule.kind != "gd":
            problems.append(("rule", f"rule `{first.rule.kind}` (a block steps by gd on its chunk's gradient)"))
        # the blocks' own optimizer: a constant momentum and weight decay, stepping once per chunk
        rates = {}
        for prop, kind, value, example in (("momentum", first.momentum.kind, first.momentum.beta, "0.9"),
                                           ("retention", first.retention.kind, first.retention.value, "0.999")):
            rates[prop] = self._rate(kind, value) if kind == "constant" else None
            if kind != "none" and rates[prop] is None:
                what = f"a {prop} that is not a number" if kind == "constant" else f"`{prop} {kind}`"
                problems.append((prop, what, f"write `{prop} constant({example})`"))
        if any(m.read != "anchor" for m in c.memories):
            problems.append(("read", "`read running` (a block's weights are constant inside its chunk, Eq. 71)"))
        if first.init.kind not in ("meta", "random", "pretrained"):
            problems.append(("init", f"initial state `{first.init.kind}`"))
        for path, what, *hint in problems:  # at the property, or at the chain where it is left to its default
            self.unsupported(f"CMS `{c.name}`: {what} is not compiled yet", key + (path,), *hint)
        if problems:
            return None
        periods = tuple(self.levels[n].period for n in c.levels)
        scopes = tuple(self.levels[n].scope for n in c.levels)
        s = first.structure
        return (f"CmsChain(config.dim, periods={periods!r}, scopes={scopes!r}, variant={c.variant!r}, "
                f"expansion={_repr(float(s.expansion))}, depth={_repr(s.depth)}, residual={_repr(s.residual)}, "
                f"activation={_repr(s.activation)}, hidden_norm={_repr(s.norm)}, prenorm={_repr(s.prenorm or 'none')}, "
                f"lr={_repr(float(first.lr.value))}, "
                + "".join(f"{name}={value}, " for name, value in rates.items() if value is not None) +
                f"signal={_repr(first.signal)}, "
                f"objective={_repr(first.objective.kind)}, {_objective_parameter(first.objective, 'huber_delta')}"
                f"detach={_repr(first.writes == 'detached')}, "
                + (f"levels={tuple(c.levels)!r}, pretrained={first.init.path!r}, spec_dir=config.spec_dir, "
                   if first.init.kind == "pretrained" else "") +
                f"impl=config.impl, kernel=config.kernel({_repr(self.model.name + '.' + c.name)}))")

    @staticmethod
    def _init(mem: M.Memory) -> str | None:
        """The ``init=`` keyword(s) of an in-context memory's initial state (None: not compiled)."""
        kind, value = mem.init.kind, mem.init.value
        if kind in ("zeros", "meta", "random"):
            return f"init={kind!r}"
        if kind == "constant" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"init='constant', init_value={_repr(float(value))}"
        return None

    def _rate(self, kind: str, value) -> str | None:
        if kind in ("none",):
            return "None"
        if kind == "gate":
            return "'gate'"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _repr(float(value))
        return None

    def linear_ctor(self, mem: M.Memory, level: M.Level, key: tuple) -> str | None:
        obj, rule = mem.objective.kind, mem.rule.kind
        momentum, retention = mem.momentum.kind, mem.retention.kind
        period, read = level.period, mem.read
        if level.clock != "tokens":
            self.unsupported(f"`{mem.name}` learns in context but its level `{level.name}` counts steps",
                             key + ("level",), help="put in-context memories in a `tokens` level")
            return None
        if mem.inputs.generated():  # self-modifying Titans with matrix memories: one-layer MLPs M(x) = W x
            return self.self_modifying_ctor(mem, level, key, depth=1, expansion=1.0, residual=False,
                                            activation="identity", hidden_norm="none")
        if mem.precondition.kind != "none" and rule not in ("gd", "omega"):
            self.unsupported(f"a preconditioned in-context memory with rule `{rule}` (`{mem.name}`) is not "
                             "compiled yet", key + ("precondition",), help="Newton-Schulz steps take `rule gd` or "
                             "`omega(window=N)`")
            return None
        if mem.signal == "surprise":
            self.unsupported(f"signal `surprise` for the linear memory `{mem.name}` is not compiled yet",
                             key + ("signal",), help="a CMS chain learns from the local surprise")
            return None
        if momentum in ("delta", "deep"):
            self.unsupported(f"`momentum {momentum}` in the in-context memory `{mem.name}` is not compiled yet",
                             key + ("momentum",))
            return None
        op = linear_op(mem, level)
        if op is None:
            self.unsupported(f"the linear memory `{mem.name}` (objective {obj}, rule {rule}, momentum "
                             f"{momentum}, period {period}, read {read}) has no compiled op yet", key,
                             help="compiled now: Hebbian (dot) memories, delta and gated delta rules, "
                             "Titans-linear (rule gd, any objective), DGD (l2 or dot) and Omega")
            return None
        lr = self._rate(mem.lr.kind, mem.lr.value)
        ret = self._rate(retention, mem.retention.value)
        mom = self._rate(momentum, mem.momentum.beta)
        if None in (lr, ret, mom):
            self.unsupported(f"`{mem.name}` uses a learning rate, retention or momentum that is not a number",
                             key + ("lr",))
            return None
        init = self._init(mem)
        if init is None:
            self.unsupported(f"initial state `{mem.init.kind}` of `{mem.name}` is not compiled yet", key + ("init",))
            return None
        shared = self.kv_source(mem)
        if shared is not None:
            src = next(m for m in self.model.memories if m.name == shared)
            if mem.heads != 1 and mem.heads != src.heads:
                self.unsupported(f"`{mem.name}` shares the keys and values of `{shared}`: give it "
                                 f"`heads 1` or the same heads as `{shared}` ({src.heads})", key + ("heads",))
                return None
        objective = ""
        if op in ("titans_linear", "dgd", "omega_rule", "mlp_memory"):  # the ops that take more than one objective
            objective = f"objective={obj!r}, {_objective_parameter(mem.objective)}"
        extra = (f"rule={rule!r}, signal={_repr(mem.signal)}, {self._precondition(mem)}" if op == "mlp_memory"
                 else "")  # its engine's choices
        if mem.v_norm == "l2":
            extra += "v_norm='l2', "
        return (f"LinearMemory(config.dim, {self.heads_arg(mem)}, op={op!r}, {objective}{extra}lr={lr}, "
                f"retention={ret}, momentum={mom}, chunk_size={period!r}, qk_norm={_repr(mem.qk_norm)}, "
                f"conv={_repr(mem.conv)}, {init}, detach={_repr(mem.writes == 'detached')}, "
                f"window={_repr(mem.rule.window)}, read={_repr(read)}, shared_kv={shared is not None}, "
                f"scope={_repr(level.scope)}, impl=config.impl, "
                f"kernel=config.kernel({_repr(self.model.name + '.' + mem.name)}))")

    def kv_source(self, mem: M.Memory) -> str | None:
        """The attention whose keys and values ``mem`` uses (`transfer attn -> mem : context`)."""
        attention = {m.name for m in self.model.memories if m.structure.kind == "attention"}
        sources = [t.source for t in self.model.transfers
                   if t.kind == "context" and t.target == mem.name and t.source in attention]
        return sources[0] if sources else None

    # -- the block --------------------------------------------------------------------------------
    def block(self) -> BlockPlan:
        from nldsl.ir.values import to_expr
        from nldsl.syntax.printer import expr as print_expr

        bp = BlockPlan(class_name=f"{self.model.name}Block", expr=print_expr(to_expr(self.model.block)))
        mems = {m.name: m for m in self.model.memories}
        cms = {c.name: c for c in self.model.cms}
        counters: dict[str, int] = {}
        used: set[str] = set()

        def fresh(prefix: str) -> str:
            n = counters.get(prefix, 0)
            counters[prefix] = n + 1
            return f"{prefix}_{n}"

        def emit(v, lines: list[str], depth: int):
            if isinstance(v, M.Ref):
                name = v.name
                if name in ("norm", "rmsnorm", "layernorm"):
                    attr = fresh("norm")
                    bp.submodules.append(Submodule(attr, f"make_norm({name!r}, config.dim)",
                                                   self.origin(self.model.name, "block")))
                    lines.append(f"h = self.{attr}(h)")
                elif name in ("swiglu", "mlp"):
                    attr = fresh(name)
                    ctor = "SwiGLU(config.dim)" if name == "swiglu" else "MLP(config.dim)"
                    bp.submodules.append(Submodule(attr, ctor, self.origin(self.model.name, "block")))
                    lines.append(f"h = self.{attr}(h)")
                elif name == "identity":
                    pass
                elif name in mems:
                    if name in used:
                        self.unsupported(f"`{name}` appears twice in the block; each memory keeps one state",
                                         (self.model.name, "block", name), help="define a second memory")
                        return
                    used.add(name)
                    ctor = self.memory_ctor(mems[name])
                    if ctor is None:
                        return
                    bp.submodules.append(Submodule(name, ctor, self.origin(self.model.name, "memory", name)))
                    bp.stateful.append(name)
                    source = self.kv_source(mems[name]) if mems[name].structure.kind == "linear" else None
                    if name in kv_providers:
                        lines.append(f"h, new[{name!r}], kv_{name} = self.{name}(h, state.get({name!r}), "
                                     "return_kv=True)")
                    elif source is not None:
                        if source not in used:
                            self.unsupported(f"`{name}` reads the keys and values of `{source}`, which the "
                                             "block applies later", (self.model.name, "block", name))
                            return
                        lines.append(f"h, new[{name!r}] = self.{name}(h, state.get({name!r}), kv=kv_{source})")
                    else:
                        lines.append(f"h, new[{name!r}] = self.{name}(h, state.get({name!r}))")
                elif name in cms:
                    if name in used:
                        self.unsupported(f"`{name}` appears twice in the block; each memory keeps one state",
                                         (self.model.name, "block", name))
                        return
                    used.add(name)
                    ctor = self.cms_ctor(cms[name])
                    if ctor is None:
                        return
                    bp.submodules.append(Submodule(name, ctor, self.origin(self.model.name, "cms", name)))
                    bp.stateful.append(name)
                    lines.append(f"h, new[{name!r}] = self.{name}(h, state.get({name!r}))")
                return
            if isinstance(v, M.Op) and v.op == "->":
                for a in v.args:
                    emit(a, lines, depth)
                return
            if isinstance(v, M.Call) and v.func == "residual":
                var = f"r{depth}"
                lines.append(f"{var} = h")
                for a in v.args:
                    emit(a, lines, depth + 1)
                lines.append(f"h = {var} + h")
                return
            if isinstance(v, M.Call) and v.func in ("sum", "gate"):
                src = f"x{depth}"
                lines.append(f"{src} = h")
                outs = []
                for i, a in enumerate(v.args):
                    lines.append(f"h = {src}")
                    emit(a, lines, depth + 1)
                    out = f"b{depth}_{i}"
                    lines.append(f"{out} = h")
                    outs.append(out)
                if v.func == "sum":
                    lines.append("h = " + " + ".join(outs))
                elif len(outs) == 2:
                    lines.append(f"h = {outs[0]} * torch.sigmoid({outs[1]})")
                else:
                    self.unsupported("`gate(a, b)` takes two branches", (self.model.name, "block"))
                return
            if isinstance(v, M.Call) and v.func in ("mlp", "swiglu"):
                attr = fresh(v.func)
                kwargs = {k: x for k, x in v.kwargs}
                exp = kwargs.get("expansion")
                args = "" if exp is None else f", expansion={_repr(float(exp))}"
                ctor = f"SwiGLU(config.dim{args})" if v.func == "swiglu" else f"MLP(config.dim{args})"
                bp.submodules.append(Submodule(attr, ctor, self.origin(self.model.name, "block")))
                lines.append(f"h = self.{attr}(h)")
                return
            self.unsupported("this part of the block is not compiled yet", (self.model.name, "block"))

        kv_providers = {self.kv_source(m) for m in self.model.memories if m.structure.kind == "linear"} - {None}
        learners = {c.name for c in self.model.cms if c.memories and c.memories[0].signal == "surprise"}
        top = self.model.block
        parts = list(top.args) if isinstance(top, M.Op) and top.op == "->" else [top]
        lines: list[str] = []
        split = None
        for part in parts:  # the top-level parts: only h, new and kv_* pass from one to the next
            start, before = len(lines), set(used)
            emit(part, lines, 0)
            if split is None and (used - before) & learners:
                split, in_prefix = start, before
        # a split needs the keys and values of the prefix's attention read inside it only
        readers = {m.name for m in self.model.memories
                   if m.structure.kind == "linear" and self.kv_source(m) in in_prefix} if split else set()
        if split and not readers - in_prefix:
            bp.prefix = split
        bp.forward = lines
        return bp

    def level_reads(self, lv) -> tuple[str, tuple[str, ...]]:
        """How a level's memories read (the level's ``read`` is only their default, which each may
        override: Hope's ``fast`` level defaults to anchor, its Titans memory reads running), and
        what it holds, each with its read: ``(read, holds)``; read is "mixed" where they differ."""
        holds, reads = [], []
        for m in self.model.all_memories():
            if m.level == lv.name:
                reads.append(m.read or lv.read)
                holds.append(f"{m.name} (read {reads[-1]})")
        for m in self.model.memories:
            if m.generators == lv.name:  # a self-modifying memory's generators read at their anchor
                reads.append("anchor")
                holds.append(f"the generating memories of {m.name} (read anchor)")
        read = lv.read if not reads else reads[0] if len(set(reads)) == 1 else "mixed"
        return read, tuple(holds)

    def plan(self) -> ModelPlan:
        block = self.block()
        if self.problems:
            raise Unsupported(self.problems)
        levels = sorted(self.model.levels, key=speed_key)
        params = [(k, _repr(v)) for k, v in self.model.params
                  if isinstance(v, (bool, int, float)) or isinstance(v, tuple)]
        return ModelPlan(
            class_name=self.model.name, doc=self.model.doc, spec_file=self.display, params=params,
            levels=[(lv.name, lv.clock, lv.period, lv.scope, *self.level_reads(lv)) for lv in levels], block=block,
            origin=self.origin(self.model.name), optimizer=self.model.optimizer)
