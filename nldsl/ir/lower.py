"""Syntax tree -> IR: resolves names, parameters and defaults; reports what it cannot lower.

Lowering never stops at the first problem: a bad value is reported and replaced by its
default so that later checks still run, and every diagnostic of the file comes out at once.
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from typing import Callable

from nldsl.diagnostics import Diagnostic, suggest
from nldsl.ir import models as M
from nldsl.ir.values import NotConstant, calls_in, fold, names_in, to_value
from nldsl.syntax import ast as A

MODEL_PARAMS = {  # name -> (required, default, description)
    "vocab": (True, None, "vocabulary size"),
    "dim": (True, None, "model width"),
    "heads": (False, 1, "attention/memory heads"),
    "layers": (True, None, "number of blocks"),
    "context": (True, None, "training context length in tokens"),
}
PARTIAL_POLICIES = ("strict", "carry", "flush")
TRANSFER_KINDS = ("condition", "context", "backprop", "init", "generate")
CLOCKS = ("tokens", "steps")
READ_MODES = ("anchor", "running")
SCOPES = ("carry", "reset")
STRUCTURES = ("linear", "mlp", "attention", "elementwise", "vector")
#: a CMS chain's blocks when its `structure` is not given (or is not an mlp: NL202)
CMS_BLOCK = M.Structure(kind="mlp", depth=2, expansion=4.0, residual=True, activation="gelu", norm="none",
                        prenorm="none")
ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
OBJECTIVES = ("dot", "l2", "l1", "lp", "huber")
RULES = ("gd", "dgd", "omega")
MOMENTA = ("none", "constant", "gate", "delta", "deep")
PRECONDITIONERS = ("none", "newton_schulz")
RETENTIONS = ("none", "constant", "gate")
LRS = ("constant", "gate")
SOURCES = ("static", "generated")
SIGNALS = ("values", "self", "surprise")
WRITES = ("differentiable", "detached")
INITS = ("zeros", "random", "meta", "pretrained", "constant", "first")
CMS_VARIANTS = ("sequential", "nested", "independent")
AGGREGATES = ("sum", "weighted")
INPUT_NAMES = ("k", "v", "q", "eta", "alpha")
NS_DEFAULT = (3.4445, -4.775, 2.0315)
MAX_INT = 2**31 - 1

# Builtin names usable in a block and in optimizer expressions.
BLOCK_BUILTINS = ("norm", "rmsnorm", "layernorm", "mlp", "swiglu", "identity")
BLOCK_COMBINATORS = ("residual", "sum", "gate")
OPT_BUILTINS = ("grad", "param", "step", "rows", "cols")
#: the functions optimizer expressions call: (fewest, most positional arguments, keywords)
OPT_SIGNATURES = {
    "sqrt": (1, 1, ()), "abs": (1, 1, ()), "sign": (1, 1, ()),
    "newton_schulz": (1, 1, ("steps", "coefficients", "eps")),
    "max": (2, 2, ()), "min": (2, 2, ()), "clamp": (1, 3, ("min", "max")), "where": (3, 3, ()),
}
OPT_FUNCTIONS = tuple(OPT_SIGNATURES)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class Ctx:
    """What lowering one file needs: its path, diagnostics, and the span of each IR path."""

    file: str
    diags: list[Diagnostic] = field(default_factory=list)
    spans: dict[tuple, A.Span] = field(default_factory=dict)

    def error(self, code: str, msg: str, span: A.Span | None, help: str | None = None, **kw):
        self.diags.append(Diagnostic.at(code, msg, span, help=help, file=self.file, **kw))

    def warn(self, code: str, msg: str, span: A.Span | None, help: str | None = None):
        self.diags.append(Diagnostic.at(code, msg, span, help=help, file=self.file))


# ---- small value readers: each returns a value or None after reporting why -----------------


def check_name(ctx: Ctx, name: str, span: A.Span | None, what: str) -> None:
    if name.startswith("_"):
        ctx.error("NL009", f"{what} name `{name}` starts with an underscore", span,
                  help="names that start with `_` are reserved; rename it without the underscore")
    elif keyword.iskeyword(name):
        ctx.error("NL009", f"{what} name `{name}` is a Python keyword", span,
                  help=f"rename it (for example `{name}_`); names become Python identifiers")


def read_choice(ctx: Ctx, e: A.Expr, choices, what: str, aliases: dict | None = None) -> str | None:
    aliases = aliases or {}
    if isinstance(e, A.Name) and (e.id in choices or e.id in aliases):
        return aliases.get(e.id, e.id)
    shown = e.id if isinstance(e, A.Name) else None
    ctx.error("NL006", f"`{shown}` is not a valid {what}" if shown else f"expected a {what} name here",
              e.span, help=suggest(shown or "", list(choices) + list(aliases), what + "s"))
    return None


def read_number(ctx: Ctx, e: A.Expr, env: dict, what: str, *, integer=False, positive=False,
                minimum=None, code="NL006") -> int | float | None:
    if isinstance(e, A.Number) and isinstance(e.value, float) and not math.isfinite(e.value):
        return None  # a literal that overflows is reported once, by Lowerer.file
    try:
        v = fold(e, env)
    except NotConstant as nc:
        if nc.name is not None:
            ctx.error("NL006", f"{what} uses `{nc.name}`, which is not a number defined here", e.span,
                      help=suggest(nc.name, [k for k, x in env.items() if _is_num(x)], "parameters"))
        else:
            ctx.error("NL008", f"{what} is not a finite number", e.span,
                      help="use a plain number such as `16` or `1e-3`")
        return None
    if not _is_num(v):
        ctx.error("NL006", f"{what} must be a number", e.span)
        return None
    if isinstance(v, float) and not math.isfinite(v) or abs(v) > 1e300:
        ctx.error("NL008", f"{what} `{v}` is out of range", e.span, help="use a finite number")
        return None
    if integer:
        if isinstance(v, float):
            if not v.is_integer():
                ctx.error(code, f"{what} must be a whole number, got `{v:g}`", e.span,
                          help="write an integer such as `16`")
                return None
            v = int(v)
        if abs(v) > MAX_INT:
            ctx.error("NL008", f"{what} `{v}` is too large (at most {MAX_INT})", e.span)
            return None
    if positive and v <= 0:
        ctx.error(code, f"{what} must be positive, got `{v}`", e.span)
        return None
    if minimum is not None and v < minimum:
        ctx.error(code, f"{what} must be at least {minimum}, got `{v}`", e.span)
        return None
    return v


def read_bool(ctx: Ctx, e: A.Expr, what: str) -> bool | None:
    if isinstance(e, A.Bool):
        return e.value
    ctx.error("NL006", f"{what} must be `true` or `false`", e.span)
    return None


def call_parts(e: A.Expr) -> tuple[str | None, tuple, dict[str, A.KwArg]]:
    if isinstance(e, A.Name):
        return e.id, (), {}
    if isinstance(e, A.Call):
        return e.func, e.args, {k.name: k for k in e.kwargs}
    return None, (), {}


def check_kwargs(ctx: Ctx, kwargs: dict[str, A.KwArg], allowed, owner: str) -> None:
    for k, kw in kwargs.items():
        if k not in allowed:
            ctx.error("NL005", f"`{owner}` has no argument `{k}`", kw.span,
                      help=suggest(k, allowed, f"arguments of `{owner}`"))


def check_no_args(ctx: Ctx, args: tuple, owner: str, span) -> None:
    if args:
        ctx.error("NL006", f"`{owner}` takes keyword arguments only", args[0].span or span,
                  help=f"name the argument, for example `{owner}(window=4)`")


# ---- the lowerer -------------------------------------------------------------------------


class Lowerer:
    def __init__(self, ctx: Ctx, known_optimizers: dict[str, str] | None = None):
        self.ctx = ctx
        self.known_optimizers = {} if known_optimizers is None else known_optimizers  # name -> file
        self.file_doc: tuple[str, str] | None = None  # (first block, the file's header comments)

    # -- files --
    def file(self, f: A.File, includes: tuple[str, ...]) -> M.SpecIR:
        for n in _numbers(f):  # a literal that overflows to inf is not a number (NL008)
            if isinstance(n.value, float) and not math.isfinite(n.value):
                self.ctx.error("NL008", f"`{n.text}` is too large to be a number", n.span,
                               help="use a finite number")
        models, optimizers, ablations = [], [], []
        seen: dict[str, A.Span] = {}
        for item in f.items:
            if isinstance(item, (A.Model, A.Optimizer)):
                span = item.spans.get("name")
                check_name(self.ctx, item.name, span, "model" if isinstance(item, A.Model) else "optimizer")
                if item.name in seen:
                    self.ctx.error("NL004", f"`{item.name}` is defined twice", span,
                                   help=f"the first definition is at line {seen[item.name].line}; rename one")
                    continue
                seen[item.name] = span
        # the file's header comments document its first model or optimizer
        first = next((it for it in f.items if isinstance(it, (A.Model, A.Optimizer))), None)
        self.file_doc = (first.name, _doc(f.items[0].trivia)) if first is not None and f.items else None
        local_opts = [it.name for it in f.items if isinstance(it, A.Optimizer)]
        for name in local_opts:
            self.known_optimizers.setdefault(name, self.ctx.file)
        done: set[str] = set()
        for item in f.items:
            if isinstance(item, (A.Model, A.Optimizer)):
                if item.name in done:
                    continue
                done.add(item.name)
            if isinstance(item, A.Model):
                models.append(self.model(item))
            elif isinstance(item, A.Optimizer):
                optimizers.append(self.optimizer(item))
        targets = [m.name for m in models] + [o.name for o in optimizers]
        ab_seen: dict[str, A.Span] = {}
        for item in f.items:
            if isinstance(item, A.Ablation):
                span = item.spans.get("name")
                check_name(self.ctx, item.name, span, "ablation")
                if item.name in ab_seen:
                    self.ctx.error("NL004", f"ablation `{item.name}` is defined twice", span,
                                   help=f"the first definition is at line {ab_seen[item.name].line}")
                    continue
                ab_seen[item.name] = span
                if len(targets) != 1:
                    self.ctx.error("NL305", f"ablation `{item.name}` needs exactly one model or optimizer "
                                   f"in its file, found {len(targets)}", span,
                                   help="keep one model (or one optimizer) per file that has ablations")
                    continue
                edits = tuple(self.edit(e) for e in item.edits)
                ablations.append(M.Ablation(name=item.name, target=targets[0], edits=edits))
                self.ctx.spans[("ablation", item.name)] = span
        return M.SpecIR(file=self.ctx.file, models=tuple(models), optimizers=tuple(optimizers),
                        ablations=tuple(ablations), includes=includes)

    def edit(self, e) -> M.Edit:
        if isinstance(e, A.SetEdit):
            return M.Edit(op="set", path=e.path.parts, value=to_value(e.value))
        if isinstance(e, A.AddEdit):
            return M.Edit(op="add", path=e.path.parts, value=to_value(e.value))
        return M.Edit(op="remove", path=e.path.parts)

    # -- parameters --
    def params(self, owner: str, stmts, typed: dict) -> tuple[dict, list[tuple[str, M.Value]]]:
        """Lowers ``name = value`` lines; returns (numeric env, ordered IR params)."""
        env: dict[str, object] = {}
        out: list[tuple[str, M.Value]] = []
        seen: dict[str, A.Span] = {}
        for s in stmts:
            if not isinstance(s, A.Param):
                continue
            span = s.spans.get("name")
            check_name(self.ctx, s.name, span, "parameter")
            if s.name in seen:
                self.ctx.error("NL007", f"parameter `{s.name}` is set twice", span,
                               help=f"it is first set at line {seen[s.name].line}; keep one")
                continue
            seen[s.name] = span
            self.ctx.spans[(owner, "param", s.name)] = s.spans.get("value") or span
            self._call_spans((owner, "param", s.name), s.value)
            if s.name == "partial":
                v = read_choice(self.ctx, s.value, PARTIAL_POLICIES, "partial-chunk policy")
                out.append((s.name, M.Ref(name=v or "strict")))
                continue
            if s.name in typed:
                v = read_number(self.ctx, s.value, env, f"`{s.name}`", integer=True, positive=True)
                if v is not None:
                    env[s.name] = v
                    out.append((s.name, v))
                continue
            try:
                env[s.name] = fold(s.value, env)
            except NotConstant:
                pass
            except RecursionError:
                pass
            out.append((s.name, to_value(s.value)))
        return env, out

    # -- levels --
    def level(self, owner: str, s: A.Level, env: dict) -> M.Level | None:
        check_name(self.ctx, s.name, s.spans.get("name"), "level")
        clock = s.clock
        if clock not in CLOCKS:
            self.ctx.error("NL103", f"unknown clock `{clock}` for level `{s.name}`", s.spans.get("clock"),
                           help=suggest(clock, CLOCKS, "clocks"))
            clock = "tokens"
        period = read_number(self.ctx, s.period, env, f"the period of level `{s.name}`", integer=True,
                             positive=True, code="NL102")
        read = s.read
        if read is not None and read not in READ_MODES:
            self.ctx.error("NL006", f"`{read}` is not a read mode", s.spans.get("read"),
                           help=suggest(read, READ_MODES, "read modes"))
            read = None
        if "duplicate" in s.spans:
            self.ctx.error("NL007", f"level `{s.name}` sets its scope or read mode twice", s.spans["duplicate"],
                           help="keep one of `carry`/`reset` and at most one `read`")
        for key in ("name", "clock", "period", "read", "scope"):
            if key in s.spans:
                self.ctx.spans[(owner, "level", s.name, key)] = s.spans[key]
        self.ctx.spans[(owner, "level", s.name)] = s.spans.get("name")
        if s.scope is not None and s.scope not in SCOPES:
            self.ctx.error("NL006", f"`{s.scope}` is not a level scope", s.spans.get("scope") or s.spans.get("name"),
                           help=suggest(s.scope, SCOPES, "scopes"))
        scope = "carry" if s.scope == "carry" else "sequence"
        return M.Level(name=s.name, clock=clock, period=period or 1, scope=scope,
                       read=read or "anchor")

    def levels(self, owner: str, stmts, env) -> dict[str, M.Level]:
        out: dict[str, M.Level] = {}
        for s in stmts:
            if isinstance(s, A.Level):
                if s.name in out:
                    first = self.ctx.spans.get((owner, "level", s.name))
                    self.ctx.error("NL004", f"level `{s.name}` is defined twice", s.spans.get("name"),
                                   help=f"the first definition is at line {first.line}" if first else None)
                    continue
                lv = self.level(owner, s, env)
                if lv:
                    out[s.name] = lv
        return out

    # -- memories --
    def structure(self, e: A.Expr, span_key: tuple, env: dict, *, cms: bool = False) -> M.Structure:
        """A memory's structure; ``cms``: a CMS chain's blocks (which may take ``prenorm``)."""
        kind, args, kwargs = call_parts(e)
        self.ctx.spans[span_key] = e.span
        if kind not in STRUCTURES:
            self.ctx.error("NL006", f"`{kind}` is not a memory structure" if kind else
                           "expected a memory structure here", e.span,
                           help=suggest(kind or "", STRUCTURES, "structures"))
            return M.Structure(kind="linear")
        check_no_args(self.ctx, args, kind, e.span)
        if kind == "vector":
            kind = "elementwise"
        if kind == "mlp":
            if "prenorm" in kwargs and not cms:
                self.ctx.error("NL201", "`prenorm` applies to the blocks of a CMS chain only", kwargs["prenorm"].span,
                               help="remove it; a memory's keys are normalised by `qk_norm l2`")
                kwargs = {k: v for k, v in kwargs.items() if k != "prenorm"}
            check_kwargs(self.ctx, kwargs, ("depth", "expansion", "residual", "activation", "norm", "prenorm"), "mlp")
            # the hidden norm's default depends on the memory (see `memory`): None until then
            depth, expansion, residual, act, norm = 2, 4.0, True, "gelu", ("none" if cms else None)
            prenorm = "none" if cms else None
            if "depth" in kwargs:
                depth = read_number(self.ctx, kwargs["depth"].value, env, "`depth`", integer=True,
                                    minimum=1, code="NL204") or 2
            if "expansion" in kwargs:
                expansion = read_number(self.ctx, kwargs["expansion"].value, env, "`expansion`",
                                        positive=True, code="NL204") or 4.0
            if "residual" in kwargs:
                r = read_bool(self.ctx, kwargs["residual"].value, "`residual`")
                residual = True if r is None else r
            if "activation" in kwargs:
                act = read_choice(self.ctx, kwargs["activation"].value, ACTIVATIONS, "activation") or "gelu"
            if "norm" in kwargs:
                norm = read_choice(self.ctx, kwargs["norm"].value, ("none", "l2"), "hidden normalisation") or norm
            if "prenorm" in kwargs:
                prenorm = read_choice(self.ctx, kwargs["prenorm"].value, ("none", "rms"), "block input normalisation") \
                    or "none"
            return M.Structure(kind="mlp", depth=depth, expansion=float(expansion), residual=residual,
                               activation=act, norm=norm, prenorm=prenorm)
        if kind == "attention":
            check_kwargs(self.ctx, kwargs, ("window",), "attention")
            window = None
            if "window" in kwargs:
                window = read_number(self.ctx, kwargs["window"].value, env, "`window`", integer=True,
                                     minimum=1, code="NL204")
            return M.Structure(kind="attention", window=window)
        check_kwargs(self.ctx, kwargs, (), kind)
        return M.Structure(kind=kind)

    def memory(self, owner: str, s, *, in_optimizer: bool, env: dict, model_heads: int | None,
               init_targets: set[str], name: str | None = None, level: str | None = None,
               structure: M.Structure | None = None, props=(), key=None, is_cms=False,
               levels: dict[str, M.Level]) -> M.Memory:
        """Lowers one memory (``s`` is a Memory statement, or None for a CMS member)."""
        name = name or s.name
        level = level or s.level
        key = key or (owner, "memory", name)
        if s is not None:
            check_name(self.ctx, name, s.spans.get("name"), "memory")
            self.ctx.spans[key] = s.spans.get("name")
            self.ctx.spans[key + ("level",)] = s.spans.get("level")
            structure = self.structure(s.structure, key + ("structure",), env)
            props = s.body.props if s.body else ()
        lv = levels.get(level)
        fields: dict[str, object] = {}
        seen: dict[str, A.Span] = {}
        handlers = self._memory_props(in_optimizer, is_cms)
        for p in props:
            pspan = p.spans.get("name")
            if p.name in seen:
                self.ctx.error("NL007", f"`{p.name}` is set twice in `{name}`", pspan,
                               help=f"it is first set at line {seen[p.name].line}; keep one")
                continue
            seen[p.name] = pspan
            self.ctx.spans[key + (p.name,)] = pspan
            handler = handlers.get(p.name)
            if handler is None:
                self.ctx.error("NL005", f"unknown property `{p.name}` for memory `{name}`", pspan,
                               help=suggest(p.name, handlers, "properties"))
                continue
            value = handler(p, env, name)
            if value is not None:
                fields[p.name] = value
        objective = fields.get("objective", M.Objective(kind="l2"))
        rule = fields.get("rule", M.Rule(kind="gd"))
        # a model's in-context memories whose steps move M(k) along the key normalise their keys,
        # and an MLP its hidden layers (its later layers' keys), by default
        stabilise = not (in_optimizer or is_cms) and M.moves_along_key(objective.kind, rule.kind, structure.kind)
        if structure.kind == "mlp" and structure.norm is None:
            structure = structure.model_copy(update={"norm": "l2" if stabilise else "none"})
        if structure.kind == "attention":
            for p in props:
                if p.name in fields and p.name not in ("heads", "qk_norm", "conv", "read"):
                    self.ctx.error("NL201", f"`{p.name}` does not apply to `{name}`: attention is a "
                                   "non-parametric memory (it keeps the context, it does not learn it)",
                                   p.spans.get("name"),
                                   help="remove it, or use `linear`/`mlp` for a memory that learns in context")
            return M.Memory(name=name, level=level, structure=structure,
                            read=None, heads=fields.get("heads", model_heads or 1),
                            qk_norm=fields.get("qk_norm", "none"), conv=fields.get("conv", 0),
                            inputs=M.Inputs())
        if in_optimizer:
            return M.Memory(
                name=name, level=level, structure=structure,
                objective=fields.get("objective", M.Objective(kind="l2")),
                rule=fields.get("rule", M.Rule(kind="gd")),
                momentum=fields.get("momentum", M.Momentum(kind="none")),
                precondition=fields.get("precondition", M.Precondition(kind="none")),
                retention=fields.get("retention", M.Retention(kind="none")),
                lr=fields.get("lr", M.LearningRate(kind="constant", value=1.0)),
                input=fields.get("input", M.Ref(name="grad")),
                key=fields.get("key"),
                bias_correction=fields.get("bias_correction", False),
                init=fields.get("init", M.Init(kind="zeros")),
            )
        inputs = fields.get("inputs", M.Inputs())
        generated = inputs.generated()
        generators = fields.get("generators", level if generated else None)
        default_init = "meta" if (name in init_targets or level in init_targets or is_cms) else "zeros"
        if (structure.kind == "mlp" or generated) and default_init == "zeros" and not is_cms:
            default_init = "random"  # a zero MLP, or zero generating memories, would never move
        return M.Memory(
            name=name, level=level, structure=structure,
            objective=objective,
            rule=rule,
            momentum=fields.get("momentum", M.Momentum(kind="none")),
            precondition=fields.get("precondition", M.Precondition(kind="none")),
            retention=fields.get("retention", M.Retention(kind="none")),
            lr=fields.get("lr", M.LearningRate(kind="constant", value=0.01) if is_cms
                          else M.LearningRate(kind="gate")),
            read=fields.get("read", lv.read if lv else "anchor"),
            inputs=inputs,
            generators=generators,
            signal=fields.get("signal", "surprise" if is_cms else "values"),
            writes=fields.get("writes", "detached" if is_cms else "differentiable"),
            init=fields.get("init", M.Init(kind=default_init)),
            heads=fields.get("heads", 1 if is_cms else (model_heads or 1)),
            qk_norm=fields.get("qk_norm", "l2" if stabilise else "none"),
            v_norm=fields.get("v_norm", "none"),
            conv=fields.get("conv", 0),
        )

    # Property handlers: (prop, env, memory name) -> IR value or None (after reporting).
    def _memory_props(self, in_optimizer: bool, is_cms: bool) -> dict[str, Callable]:
        h: dict[str, Callable] = {
            "objective": self._p_objective, "rule": self._p_rule, "momentum": self._p_momentum,
            "precondition": self._p_precondition, "retention": self._p_retention, "lr": self._p_lr,
            "init": self._p_init,
        }
        if in_optimizer:
            h.update({"input": self._p_input, "key": self._p_input, "bias_correction": self._p_bool})
        else:
            h.update({"read": self._p_read, "signal": self._p_signal, "writes": self._p_writes})
            if not is_cms:
                h.update({"inputs": self._p_inputs, "generators": self._p_generators,
                          "heads": self._p_heads, "qk_norm": self._p_qk_norm, "v_norm": self._p_v_norm,
                          "conv": self._p_conv})
        return h

    def _one(self, p: A.Prop) -> A.Expr | None:
        if p.kwargs or len(p.values) != 1:
            self.ctx.error("NL006", f"`{p.name}` takes one value", p.spans.get("name"),
                           help=f"write `{p.name} VALUE`")
            return None
        return p.values[0]

    def _p_objective(self, p, env, name):
        e = self._one(p)
        if e is None:
            return None
        kind, args, kwargs = call_parts(e)
        if kind not in OBJECTIVES:
            read_choice(self.ctx, e if isinstance(e, A.Name) else A.Name(kind or "", span=e.span),
                        OBJECTIVES, "objective")
            return None
        check_no_args(self.ctx, args, kind, e.span)
        if kind == "lp":
            check_kwargs(self.ctx, kwargs, ("p",), "lp")
            if "p" not in kwargs:
                self.ctx.error("NL006", "`lp` needs its exponent", e.span, help="write `lp(p=3)`")
                return None
            pv = read_number(self.ctx, kwargs["p"].value, env, "`p`", minimum=1)
            return M.Objective(kind="lp", p=float(pv)) if pv is not None else None
        if kind == "huber":
            check_kwargs(self.ctx, kwargs, ("delta",), "huber")
            d = 1.0
            if "delta" in kwargs:
                d = read_number(self.ctx, kwargs["delta"].value, env, "`delta`", positive=True)
            return M.Objective(kind="huber", delta=float(d)) if d is not None else None
        check_kwargs(self.ctx, kwargs, (), kind)
        return M.Objective(kind=kind)

    def _p_rule(self, p, env, name):
        e = self._one(p)
        if e is None:
            return None
        kind, args, kwargs = call_parts(e)
        if kind not in RULES:
            hint = " (momentum and newton_schulz have their own properties)" if kind in (
                "momentum", "newton_schulz", "delta_momentum") else ""
            from nldsl.syntax.printer import expr as printed

            self.ctx.error("NL006", f"`{kind or printed(e)}` is not a learning rule{hint}", e.span,
                           help=suggest(kind or "", RULES, "rules"))
            return None
        check_no_args(self.ctx, args, kind, e.span)
        if kind == "omega":
            check_kwargs(self.ctx, kwargs, ("window",), "omega")
            if "window" not in kwargs:
                self.ctx.error("NL006", "`omega` needs its window of cached inputs", e.span,
                               help="write `omega(window=4)`")
                return None
            w = read_number(self.ctx, kwargs["window"].value, env, "`window`", integer=True, minimum=1,
                            code="NL204")
            return M.Rule(kind="omega", window=w) if w else None
        check_kwargs(self.ctx, kwargs, (), kind)
        return M.Rule(kind=kind)

    def _constant_like(self, p, env, kinds, build):
        """``none`` | ``gate`` | ``constant(x)`` | a plain number or expression (a constant)."""
        e = self._one(p)
        if e is None:
            return None
        kind, args, kwargs = call_parts(e)
        if isinstance(e, A.Name) and e.id in kinds and e.id != "constant":
            return build(e.id, None)
        if kind == "constant":
            if len(args) != 1 or kwargs:
                self.ctx.error("NL006", "`constant` takes one value", e.span, help="write `constant(0.9)`")
                return None
            return self._constant_value(args[0], env, build)
        if isinstance(e, A.Call) and kind in kinds:
            self.ctx.error("NL006", f"`{kind}` takes no arguments", e.span)
            return None
        if isinstance(e, A.Name) and e.id not in env and kinds:
            self.ctx.error("NL006", f"`{e.id}` is neither a {p.name} kind nor a parameter", e.span,
                           help=suggest(e.id, list(kinds) + [k for k in env], f"{p.name} kinds"))
            return None
        call = next(calls_in(e), None)  # no call folds to a number
        if call is not None and call.func in kinds:
            self.ctx.error("NL006", f"`{call.func}(...)` cannot be part of an expression", call.span,
                           help=f"write the whole value as its argument, e.g. `{call.func}(2 * 0.5)`")
            return None
        if call is not None:
            self.ctx.error("NL006", f"`{call.func}` is not a {p.name} kind", call.span,
                           help=suggest(call.func, kinds, f"{p.name} kinds"))
            return None
        return self._constant_value(e, env, build)

    def _constant_value(self, e, env, build):
        try:
            v = fold(e, env)
            if not _is_num(v):
                raise NotConstant()
            if isinstance(v, float) and not math.isfinite(v):
                raise NotConstant()
            return build("constant", v)
        except NotConstant:
            names = [n.id for n in names_in(e)]
            missing = [n for n in names if n not in env]
            if missing:
                self.ctx.error("NL006", f"`{missing[0]}` is not a parameter defined here", e.span,
                               help=suggest(missing[0], env, "parameters"))
                return None
            return build("constant", to_value(e))

    def _p_momentum(self, p, env, name):
        return self._constant_like(p, env, MOMENTA,
                                   lambda k, v: M.Momentum(kind=k, beta=v if k == "constant" else None))

    def _p_retention(self, p, env, name):
        return self._constant_like(p, env, RETENTIONS,
                                   lambda k, v: M.Retention(kind=k, value=v if k == "constant" else None))

    def _p_lr(self, p, env, name):
        return self._constant_like(p, env, LRS,
                                   lambda k, v: M.LearningRate(kind=k, value=v if k == "constant" else None))

    def _p_precondition(self, p, env, name):
        e = self._one(p)
        if e is None:
            return None
        kind, args, kwargs = call_parts(e)
        if kind not in PRECONDITIONERS:
            self.ctx.error("NL006", f"`{kind}` is not a preconditioner", e.span,
                           help=suggest(kind or "", PRECONDITIONERS, "preconditioners"))
            return None
        check_no_args(self.ctx, args, kind, e.span)
        if kind == "none":
            return M.Precondition(kind="none")
        check_kwargs(self.ctx, kwargs, ("steps", "coefficients"), kind)
        steps = 5
        if "steps" in kwargs:
            steps = read_number(self.ctx, kwargs["steps"].value, env, "`steps`", integer=True, minimum=1)
            if steps is None:
                return None
        coeffs = NS_DEFAULT
        if "coefficients" in kwargs:
            try:
                c = fold(kwargs["coefficients"].value, env)
            except NotConstant:
                c = None
            if not (isinstance(c, tuple) and len(c) == 3 and all(_is_num(x) for x in c)):
                self.ctx.error("NL006", "`coefficients` must be three numbers `(a, b, c)`",
                               kwargs["coefficients"].value.span, help="for example `(3.4445, -4.775, 2.0315)`")
                return None
            coeffs = tuple(float(x) for x in c)
        return M.Precondition(kind="newton_schulz", steps=steps, coefficients=coeffs)

    def _p_init(self, p, env, name):
        e = self._one(p)
        if e is None:
            return None
        kind, args, kwargs = call_parts(e)
        if kind not in INITS:
            self.ctx.error("NL006", f"`{kind}` is not an initial state", e.span,
                           help=suggest(kind or "", INITS, "initial states"))
            return None
        if kind == "pretrained":
            if len(args) != 1 or not isinstance(args[0], A.String) or kwargs:
                self.ctx.error("NL006", "`pretrained` takes the path of a weights file", e.span,
                               help='write `pretrained("mlp.safetensors")`')
                return None
            return M.Init(kind="pretrained", path=args[0].value)
        if kind == "constant":
            if len(args) != 1 or kwargs:
                self.ctx.error("NL006", "`constant` takes one value", e.span, help="write `init constant(0.0)`")
                return None
            return self._constant_value(args[0], env, lambda k, v: M.Init(kind="constant", value=v))
        if isinstance(e, A.Call):
            self.ctx.error("NL006", f"`{kind}` takes no arguments", e.span)
            return None
        return M.Init(kind=kind)

    def _p_read(self, p, env, name):
        e = self._one(p)
        return read_choice(self.ctx, e, READ_MODES, "read mode") if e is not None else None

    def _p_signal(self, p, env, name):
        e = self._one(p)
        return read_choice(self.ctx, e, SIGNALS, "signal source") if e is not None else None

    def _p_writes(self, p, env, name):
        e = self._one(p)
        return read_choice(self.ctx, e, WRITES, "write mode") if e is not None else None

    def _p_qk_norm(self, p, env, name):
        e = self._one(p)
        return read_choice(self.ctx, e, ("l2", "none"), "q/k normalisation") if e is not None else None

    def _p_v_norm(self, p, env, name):
        e = self._one(p)
        return read_choice(self.ctx, e, ("l2", "none"), "value normalisation") if e is not None else None

    def _p_generators(self, p, env, name):
        e = self._one(p)
        if e is None:
            return None
        if not isinstance(e, A.Name):
            self.ctx.error("NL006", "`generators` names a level", e.span, help="write `generators fast`")
            return None
        return e.id

    def _p_heads(self, p, env, name):
        e = self._one(p)
        return read_number(self.ctx, e, env, "`heads`", integer=True, minimum=1, code="NL204") if e else None

    def _p_conv(self, p, env, name):
        e = self._one(p)
        return read_number(self.ctx, e, env, "`conv`", integer=True, minimum=0, code="NL204") if e else None

    def _p_bool(self, p, env, name):
        e = self._one(p)
        return read_bool(self.ctx, e, f"`{p.name}`") if e is not None else None

    def _p_input(self, p, env, name):
        e = self._one(p)
        return to_value(e) if e is not None else None

    def _p_inputs(self, p, env, name):
        if p.values:
            self.ctx.error("NL006", "`inputs` lists sources by name", p.values[0].span,
                           help="write `inputs k=generated, v=generated, q=static`")
            return None
        out: dict[str, str] = {}
        for kw in p.kwargs:
            if kw.name not in INPUT_NAMES:
                self.ctx.error("NL005", f"`{kw.name}` is not an input of a memory", kw.span,
                               help=suggest(kw.name, INPUT_NAMES, "inputs"))
                continue
            if kw.name in out:
                self.ctx.error("NL007", f"input `{kw.name}` is given twice", kw.span)
                continue
            v = read_choice(self.ctx, kw.value, SOURCES, "input source")
            if v:
                out[kw.name] = v
        return M.Inputs(**out)

    # -- cms --
    def cms(self, owner: str, s: A.Cms, env, levels, model_heads, init_targets) -> M.Cms | None:
        key = (owner, "cms", s.name)
        check_name(self.ctx, s.name, s.spans.get("name"), "cms")
        self.ctx.spans[key] = s.spans.get("name")
        self.ctx.spans[key + ("variant",)] = s.spans.get("variant")
        variant = s.variant
        if variant not in CMS_VARIANTS:
            self.ctx.error("NL006", f"`{variant}` is not a CMS variant", s.spans.get("variant"),
                           help=suggest(variant, CMS_VARIANTS, "variants"))
            variant = "sequential"
        props = s.body.props if s.body else ()
        level_names: list[str] = []
        structure = CMS_BLOCK
        aggregate = "weighted" if variant == "independent" else None
        member_props = []
        for p in props:
            if p.name == "levels":
                self.ctx.spans[key + ("levels",)] = p.spans.get("name")
                for i, v in enumerate(p.values):
                    if isinstance(v, A.Name):
                        level_names.append(v.id)
                        self.ctx.spans[key + ("levels", v.id)] = v.span
                    else:
                        self.ctx.error("NL006", "`levels` lists level names", v.span)
                if p.kwargs:
                    self.ctx.error("NL006", "`levels` lists level names", p.kwargs[0].span)
            elif p.name == "structure":
                e = self._one(p)
                if e is not None:
                    structure = self.structure(e, key + ("structure",), env, cms=True)
                    if structure.kind != "mlp":
                        self.ctx.error("NL202", f"a CMS chain is built from `mlp` blocks, not `{structure.kind}`",
                                       e.span, help="write `structure mlp(depth=2, expansion=4)`")
                        structure = CMS_BLOCK
            elif p.name == "aggregate":
                e = self._one(p)
                if e is not None:
                    agg = read_choice(self.ctx, e, AGGREGATES, "aggregation")
                    if agg and variant != "independent":
                        self.ctx.error("NL201", "`aggregate` applies to the `independent` CMS variant only",
                                       p.spans.get("name"), help="remove it, or make the chain `independent`")
                    aggregate = agg or aggregate
            else:
                member_props.append(p)
        if not level_names:
            self.ctx.error("NL006", f"CMS `{s.name}` lists no levels", s.spans.get("name"),
                           help="add `levels fast, mid, slow` (fastest first) to its body")
        seen = set()
        members = []
        for ln in level_names:
            if ln in seen:
                self.ctx.error("NL004", f"level `{ln}` appears twice in CMS `{s.name}`",
                               self.ctx.spans.get(key + ("levels", ln)))
                continue
            seen.add(ln)
            members.append(self.memory(owner, None, in_optimizer=False, env=env, model_heads=model_heads,
                                       init_targets=init_targets, name=f"{s.name}_{ln}", level=ln,
                                       structure=structure, props=member_props, key=key, is_cms=True,
                                       levels=levels))
            # members share the chain's property spans
        return M.Cms(name=s.name, variant=variant, levels=tuple(dict.fromkeys(level_names)),
                     memories=tuple(members), aggregate=aggregate)

    # -- transfers --
    def transfer(self, owner: str, s: A.Transfer, index: int) -> M.Transfer | None:
        key = (owner, "transfer", index)
        for k in ("source", "target", "kind"):
            self.ctx.spans[key + (k,)] = s.spans.get(k)
        self.ctx.spans[key] = s.span
        kind, args, kwargs = call_parts(s.kind)
        if kind not in TRANSFER_KINDS:
            self.ctx.error("NL006", f"`{kind}` is not a kind of transfer" if kind else
                           "expected a transfer kind", s.kind.span,
                           help=suggest(kind or "", TRANSFER_KINDS, "transfer kinds"))
            return None
        check_no_args(self.ctx, args, kind, s.kind.span)
        selfref = False
        if kind == "generate":
            check_kwargs(self.ctx, kwargs, ("self",), "generate")
            if "self" in kwargs:
                selfref = bool(read_bool(self.ctx, kwargs["self"].value, "`self`"))
        else:
            check_kwargs(self.ctx, kwargs, (), kind)
        return M.Transfer(source=s.source, target=s.target, kind=kind, self_referential=selfref)

    # -- models --
    def model(self, m: A.Model) -> M.Model:
        owner = m.name
        self.ctx.spans[(owner,)] = m.spans.get("name")
        env, params = self.params(owner, m.stmts, {k for k in MODEL_PARAMS})
        model_heads = env.get("heads") if isinstance(env.get("heads"), int) else None
        levels = self.levels(owner, m.stmts, env)
        init_targets = {s.target for s in m.stmts if isinstance(s, A.Transfer) and
                        call_parts(s.kind)[0] == "init"}
        memories, cms_list, names = [], [], {}
        for s in m.stmts:
            if isinstance(s, (A.Memory, A.Cms)):
                span = s.spans.get("name")
                if s.name in names:
                    self.ctx.error("NL004", f"`{s.name}` is defined twice in model `{m.name}`", span,
                                   help=f"the first definition is at line {names[s.name].line}; rename one")
                    continue
                names[s.name] = span
                if isinstance(s, A.Memory):
                    memories.append(self.memory(owner, s, in_optimizer=False, env=env, model_heads=model_heads,
                                                init_targets=init_targets, levels=levels))
                else:
                    c = self.cms(owner, s, env, levels, model_heads, init_targets)
                    if c:
                        cms_list.append(c)
        transfers = []
        for i, s in enumerate(x for x in m.stmts if isinstance(x, A.Transfer)):
            t = self.transfer(owner, s, i)
            if t:
                transfers.append(t)
        block = None
        optimizer = None
        for s in m.stmts:
            if isinstance(s, A.Block):
                if block is not None:
                    self.ctx.error("NL007", f"model `{m.name}` has two blocks", s.span, help="keep one `block = ...`")
                    continue
                block = to_value(s.expr)
                self.ctx.spans[(owner, "block")] = s.spans.get("expr")
                self._block_spans(owner, s.expr)
            elif isinstance(s, A.UseOptimizer):
                if optimizer is not None:
                    self.ctx.error("NL007", f"model `{m.name}` names two optimizers", s.span)
                    continue
                self.ctx.spans[(owner, "optimizer")] = s.spans.get("expr")
                optimizer = self._optimizer_ref(s.expr)
        # Known parameters: required ones must be written, defaults are made visible.
        written = {s.name for s in m.stmts if isinstance(s, A.Param)}
        for pname, (required, default, desc) in MODEL_PARAMS.items():
            if pname in written:
                continue
            if required:
                self.ctx.error("NL303", f"model `{m.name}` does not set `{pname}` ({desc})",
                               m.spans.get("name"), help=f"add `{pname} = ...` to the model")
            else:
                params.append((pname, default))
        if "partial" not in written:
            params.append(("partial", M.Ref(name="strict")))
        if block is None:
            self.ctx.error("NL303", f"model `{m.name}` has no `block`", m.spans.get("name"),
                           help="add `block = ...`, for example "
                                "`block = residual(norm -> attn) -> residual(norm -> mlp)`")
        order = list(MODEL_PARAMS) + ["partial"]
        params.sort(key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order)))
        return M.Model(name=m.name, doc=self._doc_of(m), params=tuple(params),
                       levels=tuple(levels.values()), memories=tuple(memories), cms=tuple(cms_list),
                       transfers=tuple(transfers), block=block, optimizer=optimizer)

    def _doc_of(self, block) -> str:
        own = _doc(block.trivia)
        file_doc = self.file_doc
        if file_doc and file_doc[0] == block.name and (not own or own == file_doc[1]):
            return file_doc[1]
        return own

    def _block_spans(self, owner: str, e: A.Expr) -> None:
        for n in names_in(e):
            self.ctx.spans.setdefault((owner, "block", n.id), n.span)
        self._call_spans((owner, "block"), e)

    def _call_spans(self, key: tuple, e: A.Expr) -> None:
        """Where each call of ``e`` (the first of a name) and its keyword arguments are written."""
        for c in calls_in(e):
            self.ctx.spans.setdefault(key + ("call", c.func), c.span)
            for kw in c.kwargs:
                self.ctx.spans.setdefault(key + ("call", c.func, kw.name), kw.span)

    def _optimizer_ref(self, e: A.Expr) -> str | None:
        if isinstance(e, A.String):
            return "file:" + e.value
        if isinstance(e, A.Name):
            return e.id
        self.ctx.error("NL304", "`optimizer` names an optimizer or a spec file", e.span,
                       help='write `optimizer = Adam` or `optimizer = "adam.nl"`')
        return None

    # -- optimizers --
    def optimizer(self, o: A.Optimizer) -> M.Optimizer:
        owner = o.name
        self.ctx.spans[(owner,)] = o.spans.get("name")
        env, params = self.params(owner, o.stmts, set())
        levels = self.levels(owner, o.stmts, env)
        memories, names = [], {}
        for s in o.stmts:
            if isinstance(s, A.Memory):
                if s.name in names:
                    self.ctx.error("NL004", f"`{s.name}` is defined twice in optimizer `{o.name}`",
                                   s.spans.get("name"))
                    continue
                names[s.name] = s.spans.get("name")
                memories.append(self.memory(owner, s, in_optimizer=True, env=env, model_heads=None,
                                            init_targets=set(), levels=levels))
        update = None
        for s in o.stmts:
            if isinstance(s, A.Update):
                if update is not None:
                    self.ctx.error("NL007", f"optimizer `{o.name}` has two updates", s.span)
                    continue
                update = to_value(s.expr)
                self.ctx.spans[(owner, "update")] = s.spans.get("expr")
                for n in names_in(s.expr):
                    self.ctx.spans.setdefault((owner, "update", n.id), n.span)
                self._call_spans((owner, "update"), s.expr)  # `m(grad)`, `sqrt(v)`, ...
        for s in o.stmts:
            if isinstance(s, A.Memory) and s.body:
                for p in s.body.props:
                    for v in p.values:
                        for n in names_in(v):
                            self.ctx.spans.setdefault((owner, "memory", s.name, "ref", n.id), n.span)
                        self._call_spans((owner, "memory", s.name, "ref"), v)
        if update is None:
            self.ctx.error("NL303", f"optimizer `{o.name}` has no `update`", o.spans.get("name"),
                           help="add `update = ...`, for example `update = m / (sqrt(v) + eps)`")
        return M.Optimizer(name=o.name, doc=self._doc_of(o), params=tuple(params),
                           levels=tuple(levels.values()), memories=tuple(memories), update=update)


def _numbers(node):
    """Every number literal of a syntax tree (positions and comments skipped)."""
    import dataclasses

    if isinstance(node, A.Number):
        yield node
    elif isinstance(node, tuple):
        for x in node:
            yield from _numbers(x)
    elif dataclasses.is_dataclass(node) and not isinstance(node, (A.Span, A.Trivia)):
        for fld in dataclasses.fields(node):
            if fld.compare:
                yield from _numbers(getattr(node, fld.name))


def _doc(trivia: A.Trivia) -> str:
    """The comments above a block as its documentation: ``#`` and one space dropped from each
    line, so that indented continuation lines (a list item's) keep their indentation."""
    lines = [c[1:].removeprefix(" ").rstrip() if c.startswith("#") else c for c in trivia.comments]
    return "\n".join(lines).strip("\n")
