"""Optimizer blocks -> the context of ``optimizer.py.j2``, with every decision made here.

Semantics compiled (see ``specs/*.nl`` for the paper's optimizers written this way):

* A parameter whose value is a literal (number, bool, tuple) is a *hyperparameter*: a
  constructor keyword with that default, stored in each param group. A parameter computed
  from hyperparameters only is a *derived constant*, recomputed from the group each step (so
  it follows its inputs when they change). A parameter that uses ``grad``, ``param``,
  ``step``, ``rows``, ``cols`` or a memory is a per-step value.
* A memory writes once per update of its level: one gradient step on its objective
  (:mod:`nldsl.optim.memory`). Levels of period 1 write before the update reads them (the
  update depends on them, so by the paper's ordering they are faster). A level of period
  ``f > 1`` is slower than the update: its memories add each step's input to a chunk sum kept
  in the state and write once, after the ``f``-th step of the chunk; reads see the state of
  the last boundary (``anchor``).
* A function call of the update (or of a per-step value) that depends only on slow memories
  and constants - ``newton_schulz(M2)`` in M3 - is computed once per chunk, stored in the
  state, and read back every step (amortised).
* A memory with a ``key`` learns to map the key to its ``input`` (the value): an elementwise
  memory predicts ``m * key``, a linear one ``m key^T`` (the delta rule of Eq. 48-49), an
  ``mlp`` memory is one small MLP per coordinate (:class:`nldsl.optim.deep.CoordinateMLP`,
  deep momentum, Eq. 50). ``m(q)`` in an expression applies a memory to a query: ``m * q``
  for an elementwise memory, the MLP's output at ``q`` for an MLP memory, read after the
  memory's write of this step (Eq. 50 reads ``m_{i+1}(u_i)``).
* ``update`` is subtracted: ``param <- param - update``.

Anything the runtime does not implement is refused here with an ``NL401`` diagnostic at the
spec line, so a spec that compiles never fails inside torch for a reason the spec decides.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from nldsl.codegen.errors import CodegenError
from nldsl.codegen.naming import Namer
from nldsl.codegen.render import docstring, literal
from nldsl.ir import models as M
from nldsl.ir.lower import OPT_SIGNATURES
from nldsl.ir.values import to_expr, to_value, walk
from nldsl.syntax import ast as A
from nldsl.syntax import printer

BUILTINS = ("grad", "param", "step", "rows", "cols")
# Names the generated methods use for themselves; spec names that collide get a suffix.
RESERVED_LOCALS = frozenset({"self", "closure", "loss", "group", "params", "grads", "states", "torch", "rt",
                             "p", "state", "clock", "fresh", "refresh"}) | frozenset(BUILTINS)
# A hyperparameter is a constructor keyword, so it cannot be renamed: these would break it.
CONSTRUCTOR_RESERVED = frozenset({"self", "params", "super"})

ATOM, POW, NEG, MUL, ADD, COND = 100, 40, 30, 20, 10, 0
_BIN_PREC = {"+": ADD, "-": ADD, "*": MUL, "/": MUL}
_KIND_ORDER = {"const": 0, "scalars": 1, "tensor": 2}
_UNARY_FUNCS = {"sqrt": "rt.sqrt", "abs": "rt.abs", "sign": "rt.sign"}
_BINARY_FUNCS = {"max": "rt.maximum", "min": "rt.minimum"}
NS_KWARGS = OPT_SIGNATURES["newton_schulz"][2]


def _join(*kinds: str) -> str:
    return max(kinds, key=_KIND_ORDER.__getitem__)


@dataclass(frozen=True)
class Expr:
    """Generated Python for a spec expression, with what the planner needs to know about it."""

    code: str
    kind: str  # "const" (a Python value per group) | "scalars" (one per parameter) | "tensor"
    prec: int = ATOM

    def wrap(self, need: int) -> str:
        return self.code if self.prec >= need else f"({self.code})"


@dataclass
class Stmt:
    """Lines of a method body, with an optional comment pointing at the spec."""

    comment: str | None
    lines: list[str]


@dataclass
class Cache:
    """A value that changes only when slow levels write: computed once per chunk."""

    index: int
    key: str  # state key
    value: M.Value  # the spec expression (a call)
    levels: tuple[str, ...]
    method: str
    local: str
    comment: str
    body: list[Stmt] = field(default_factory=list)
    result: str = ""


@dataclass
class Node:
    key: tuple
    order: int
    deps: set = field(default_factory=set)
    stmt: Stmt | None = None


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def literal_value(v: M.Value):
    """The Python constant a parameter's value is, or raises ``ValueError`` if it is not one."""
    if isinstance(v, bool) or _is_num(v):
        return v
    if isinstance(v, M.Op) and v.op == "tuple":
        return tuple(literal_value(a) for a in v.args)
    if isinstance(v, M.Op) and v.op == "neg" and len(v.args) == 1 and _is_num(v.args[0]):
        return -v.args[0]
    raise ValueError("not a literal")


def _refs(v) -> list[str]:
    """Names ``v`` reads, including the function of a call (``m`` in ``m(grad)``)."""
    if isinstance(v, M.Ref):
        return [v.name]
    if isinstance(v, M.Call):
        out = [v.func]
        for a in v.args:
            out += _refs(a)
        for _, a in v.kwargs:
            out += _refs(a)
        return out
    if isinstance(v, M.Op):
        out = []
        for a in v.args:
            out += _refs(a)
        return out
    return []


def show(v: M.Value) -> str:
    """A spec expression printed canonically (from the IR: identifiers, numbers, operators)."""
    return printer.expr(to_expr(v))


class OptimizerPlanner:
    """Plans one optimizer block; :meth:`plan` returns the template context."""

    def __init__(self, opt: M.Optimizer, spec):
        self.opt = opt
        self.spec = spec  # nldsl.codegen.SpecContext
        self.file = spec.label
        self.levels = {lv.name: lv for lv in opt.levels}
        self.memories = {m.name: m for m in opt.memories}
        self.namer = Namer(RESERVED_LOCALS)
        self.hyper: dict[str, object] = {}
        self.derived: dict[str, M.Value] = {}
        self.caches: list[Cache] = []
        self.uses_ns = False
        self.uses_delta = False
        self.mlps: dict[str, str] = {}  # MLP memory -> the code building its structure
        self._kinds: dict[str, str] = {}
        self._visiting: set[str] = set()

    # ---- errors and source positions ----
    def span(self, *keys):
        for k in keys:
            s = self.spec.spans.get(k)
            if s is not None:
                return s
        return self.spec.spans.get((self.opt.name,))

    def fail(self, message: str, *keys, help: str | None = None):
        raise CodegenError(f"optimizer `{self.opt.name}`: {message}", self.span(*keys), file=self.spec.file,
                           help=help, sources=self.spec.sources)

    def where(self, *keys) -> str:
        s = self.span(*keys)
        return f"{self.file}:{s.line}" if s is not None else self.file

    # ---- what the spec wrote (the IR folds `constant(1 - betas[0])` to a number) ----
    def written(self, mem: M.Memory, prop: str, ir_value):
        """The expression of a memory property as written, so that overriding a
        hyperparameter (``betas``) changes what is computed from it."""
        if ir_value is None or not _is_num(ir_value):
            return ir_value
        node = self.spec.ast_memory(self.opt.name, mem.name)
        if node is None or node.body is None:
            return ir_value
        for p in node.body.props:
            if p.name == prop and len(p.values) == 1 and not p.kwargs:
                e = p.values[0]
                if isinstance(e, A.Call) and e.func == "constant" and len(e.args) == 1 and not e.kwargs:
                    e = e.args[0]
                if isinstance(e, A.Call):
                    return ir_value
                value = to_value(e)
                if _refs(value):
                    return value
        return ir_value

    # ---- classification ----
    def classify(self) -> None:
        o = self.opt
        for name, value in o.params:
            key = (o.name, "param", name)
            if name in BUILTINS:
                self.fail(f"`{name}` is a builtin of optimizer expressions and cannot be redefined", key,
                          help="rename the parameter")
            if name in self.memories:
                self.fail(f"`{name}` is both a parameter and a memory", key, help="rename one of them")
            if isinstance(value, M.Text) or any(isinstance(x, M.Text) for x in walk(value)):
                self.fail(f"parameter `{name}` is a string; optimizer values are numbers, booleans or "
                          "tuples", key)
            try:
                self.hyper[name] = literal_value(value)
            except ValueError:
                self.derived[name] = value
                continue
            if name in CONSTRUCTOR_RESERVED:
                self.fail(f"hyperparameter `{name}` would clash with the optimizer constructor's own "
                          f"`{name}`", key, help="rename it")
        for lv in o.levels:
            if lv.clock != "steps":
                self.fail(f"level `{lv.name}` counts {lv.clock}; optimizer levels count steps",
                          (o.name, "level", lv.name, "clock"))
            if lv.read == "running" and lv.period > 1:
                self.fail(f"level `{lv.name}` reads `running`, which optimizers do not support",
                          (o.name, "level", lv.name, "read"), help="remove `read running` (optimizer "
                          "levels read the state of their last boundary)")
        for mem in o.memories:
            self.check_memory(mem)
        if o.update is None:
            self.fail("has no `update`", (o.name,))

    def check_memory(self, mem: M.Memory) -> None:
        o = self.opt
        k = (o.name, "memory", mem.name)
        if mem.level not in self.levels:
            self.fail(f"memory `{mem.name}` is in level `{mem.level}`, which is not defined", k + ("level",))
        s = mem.structure.kind
        if s not in ("elementwise", "linear", "mlp"):
            self.fail(f"memory `{mem.name}` cannot be `{s}` in an optimizer", k + ("structure",), k)
        rule = mem.rule.kind if mem.rule else "gd"
        if mem.key is not None:
            self.check_keyed(mem, rule)
        elif s == "mlp":  # the checker reports it (NL205); a plan must never get this far
            self.fail(f"memory `{mem.name}` is an MLP memory without a `key`", k + ("structure",), k,
                      help="add `key grad`")
        if rule == "omega":
            self.fail(f"memory `{mem.name}`: rule `omega` is not supported in optimizers", k + ("rule",), k,
                      help="use `rule gd`, or a `linear` memory with a `key` (delta momentum)")
        if rule == "dgd":
            if s != "linear":
                self.fail(f"memory `{mem.name}`: rule `dgd` needs a `linear` memory", k + ("rule",), k)
            if mem.objective.kind not in ("l2", "dot"):
                self.fail(f"memory `{mem.name}`: rule `dgd` needs the `l2` or `dot` objective", k + ("rule",), k)
            if mem.key is None:
                self.fail(f"memory `{mem.name}`: rule `dgd` erases along the memory's key, and it has none",
                          k + ("rule",), k, help="add `key grad`")
        if mem.momentum is not None and mem.momentum.kind != "none":
            self.fail(f"memory `{mem.name}`: a momentum on an optimizer memory is not supported",
                      k + ("momentum",), k, help="write the momentum as a memory of its own")
        if mem.precondition is not None and mem.precondition.kind == "newton_schulz":
            if s != "linear":
                self.fail(f"memory `{mem.name}`: Newton-Schulz needs a `linear` memory", k + ("precondition",), k)
            self.uses_ns = True
        if mem.retention is not None and mem.retention.kind == "gate":
            self.fail(f"memory `{mem.name}`: a retention gate needs a gate input, which optimizers do not "
                      "have", k + ("retention",), k, help="use `retention constant(...)`")
        if mem.lr is not None and mem.lr.kind == "gate":
            self.fail(f"memory `{mem.name}`: a learning-rate gate needs a gate input, which optimizers do "
                      "not have", k + ("lr",), k, help="use `lr constant(...)`")
        init = mem.init.kind if mem.init else "zeros"
        if init not in ("zeros", "first", "constant"):
            self.fail(f"memory `{mem.name}`: initial state `{init}` is not supported in optimizers",
                      k + ("init",), k, help="use `init zeros`, `init first` or `init constant(x)`")
        if mem.bias_correction:
            if mem.objective.kind not in ("l2", "dot"):
                self.fail(f"memory `{mem.name}`: bias correction needs the `l2` or `dot` objective",
                          k + ("bias_correction",), k)
            if mem.objective.kind == "dot" and (mem.retention is None or mem.retention.kind == "none"):
                self.fail(f"memory `{mem.name}`: bias correction divides by 1 - decay^t, but a `dot` "
                          "memory without retention never decays", k + ("bias_correction",), k,
                          help="add `retention constant(beta)`, or remove `bias_correction`")
        level = self.levels[mem.level]
        if init == "first" and level.period > 1 and mem.bias_correction:
            self.fail(f"memory `{mem.name}`: `init first` with bias correction is not supported",
                      k + ("init",), k)

    def check_keyed(self, mem: M.Memory, rule: str) -> None:
        """What a memory with a key (or an MLP memory, which needs one) can be compiled with."""
        k = (self.opt.name, "memory", mem.name)
        s = mem.structure.kind
        if self.levels[mem.level].period > 1:
            self.fail(f"memory `{mem.name}` has a key but its level `{mem.level}` writes once per chunk; "
                      "a chunk sums its inputs, and a keyed objective needs each step's key with its value",
                      k + ("key",), k, help=f"put `{mem.name}` in a level of period 1")
        if mem.init is not None and mem.init.kind == "first":
            self.fail(f"memory `{mem.name}`: `init first` stores the first input, which a keyed memory "
                      "predicts rather than stores", k + ("init",), k, help="remove `init first`")
        if mem.bias_correction:
            self.fail(f"memory `{mem.name}`: bias correction is defined for memories without a key",
                      k + ("bias_correction",), k)
        if s == "linear" and mem.objective.kind not in ("l2", "dot"):
            self.fail(f"memory `{mem.name}`: a linear memory with a key needs the `l2` or `dot` objective",
                      k + ("objective",), k)
        if s == "linear":
            self.uses_delta = True
        if s != "mlp":
            return
        st = mem.structure
        if rule != "gd":
            self.fail(f"memory `{mem.name}`: rule `{rule}` on an MLP memory is not supported (the paper "
                      "does not say which weight delta gradient descent's erase multiplies)",
                      k + ("rule",), k, help="use `rule gd`")
        if mem.precondition is not None and mem.precondition.kind != "none":
            self.fail(f"memory `{mem.name}`: an MLP memory has no matrix state to precondition",
                      k + ("precondition",), k, help="apply `newton_schulz(...)` to its output in the update")
        init = mem.init.kind if mem.init else "zeros"
        if init != "zeros":
            self.fail(f"memory `{mem.name}`: an MLP memory starts from `init zeros` (its last layer zero, "
                      f"see nldsl.optim.deep), not `{init}`", k + ("init",), k, help="remove `init`")
        if st.norm == "l2":
            self.fail(f"memory `{mem.name}`: a per-coordinate MLP memory has no hidden vector to "
                      "normalise (`norm=l2`)", k + ("structure",), k, help="remove `norm=l2`")
        if not float(st.expansion).is_integer():
            self.fail(f"memory `{mem.name}`: the MLP acts on each coordinate (input width 1), so its "
                      f"`expansion` is its hidden width and must be a whole number, got {st.expansion:g}",
                      k + ("structure",), k)
        self.mlps[mem.name] = (f"rt.CoordinateMLP(depth={literal(st.depth)}, hidden={literal(int(st.expansion))}, "
                               f"residual={literal(bool(st.residual))}, activation={literal(st.activation)})")

    def mlp(self, name: str) -> str:
        """The code of an MLP memory's structure object (a class attribute)."""
        return f"self.mlp_memories[{literal(name)}]"

    # ---- kinds (pure: no code is emitted) ----
    def kind_of_name(self, name: str, key) -> str:
        if name in ("grad", "param"):
            return "tensor"
        if name in ("step", "rows", "cols"):
            return "scalars"
        if name in self.hyper:
            return "const"
        if name in self.memories:
            return "tensor"
        if name in self.derived:
            if name in self._kinds:
                return self._kinds[name]
            if name in self._visiting:
                self.fail(f"parameter `{name}` is defined in terms of itself", (self.opt.name, "param", name))
            self._visiting.add(name)
            k = self.kind_of(self.derived[name], (self.opt.name, "param", name))
            self._visiting.discard(name)
            self._kinds[name] = k
            return k
        self.fail(f"`{name}` is not a parameter, memory or builtin", key)

    def kind_of(self, v, key) -> str:
        if isinstance(v, bool) or _is_num(v):
            return "const"
        if isinstance(v, M.Ref):
            return self.kind_of_name(v.name, key)
        if isinstance(v, M.Op):
            return _join("const", *(self.kind_of(a, key) for a in v.args))
        if isinstance(v, M.Call):
            if v.func == "newton_schulz" or v.func in self.memories:
                return "tensor"
            if v.func == "where":
                return _join("const", *(self.kind_of(a, key) for a in v.args[1:]))
            return _join("const", *(self.kind_of(a, key) for a in v.args),
                         *(self.kind_of(a, key) for _, a in v.kwargs))
        return "const"

    def scan(self, v, key) -> tuple[set, bool]:
        """(memories read, whether a per-step value is read) for amortisation decisions."""
        mems, runtime = set(), False
        for name in _refs(v):
            if name in BUILTINS:
                runtime = True
            elif name in self.memories:
                mems.add(name)
            elif name in self.derived and self.kind_of_name(name, key) != "const":
                runtime = True
        return mems, runtime

    def is_slow(self, mem: str) -> bool:
        return self.levels[self.memories[mem].level].period > 1

    # ---- translation: spec expression -> Python ----
    def tr(self, v, key, res) -> Expr:
        """Translates ``v``; ``res`` resolves names (and records what the code needs)."""
        if isinstance(v, bool):
            return Expr(literal(v), "const")
        if _is_num(v):
            return Expr(literal(v), "const", NEG if v < 0 else ATOM)
        if isinstance(v, M.Text):
            self.fail("strings are not values of optimizer expressions", key)
        if isinstance(v, M.Ref):
            return res.name(v.name, key)
        if isinstance(v, M.Op):
            return self.tr_op(v, key, res)
        if isinstance(v, M.Call):
            cached = res.cached(v, key)
            if cached is not None:
                return cached
            return self.tr_call(v, key, res)
        self.fail(f"cannot compile the value {v!r}", key)

    def tr_op(self, v: M.Op, key, res) -> Expr:
        args = [self.tr(a, key, res) for a in v.args]
        if v.op in _BIN_PREC:
            p = _BIN_PREC[v.op]
            a, b = args
            return Expr(f"{a.wrap(p)} {v.op} {b.wrap(p + 1)}", _join(a.kind, b.kind), p)
        if v.op == "**":
            a, b = args
            return Expr(f"{a.wrap(POW + 1)} ** {b.wrap(NEG)}", _join(a.kind, b.kind), POW)
        if v.op == "neg":
            (a,) = args
            return Expr(f"-{a.wrap(NEG)}", a.kind, NEG)
        if v.op == "index":
            a, b = args
            if a.kind != "const" or b.kind != "const":
                self.fail("indexing works on constant tuples only (like `betas[0]`)", key)
            return Expr(f"{a.wrap(ATOM)}[{b.code}]", "const")
        if v.op == "tuple":
            if any(a.kind != "const" for a in args):
                self.fail("tuples hold constants only", key)
            inner = ", ".join(a.code for a in args)
            return Expr(f"({inner},)" if len(args) == 1 else f"({inner})", "const")
        self.fail(f"the operator `{v.op}` has no meaning in an optimizer expression", key)

    def tr_call(self, v: M.Call, key, res) -> Expr:
        f = v.func
        kw = dict(v.kwargs)
        if f in self.memories:
            return self.tr_apply(v, key, res)
        if f in _UNARY_FUNCS:
            if len(v.args) != 1 or kw:
                self.fail(f"`{f}` takes one argument", key)
            a = self.tr(v.args[0], key, res)
            return Expr(f"{_UNARY_FUNCS[f]}({a.code})", a.kind)
        if f in _BINARY_FUNCS:
            if len(v.args) != 2 or kw:
                self.fail(f"`{f}` takes two arguments", key)
            a, b = (self.tr(x, key, res) for x in v.args)
            return Expr(f"{_BINARY_FUNCS[f]}({a.code}, {b.code})", _join(a.kind, b.kind))
        if f == "clamp":
            names = ("x", "min", "max")
            given = list(v.args)
            if not 1 <= len(given) <= 3 or set(kw) - {"min", "max"}:
                self.fail("`clamp` takes `(x, min, max)`", key, help="for example `clamp(x, min=0, max=1)`")
            parts = {n: self.tr(a, key, res) for n, a in zip(names, given)}
            for n, a in kw.items():
                if n in parts:
                    self.fail(f"`clamp` gets `{n}` twice", key)
                parts[n] = self.tr(a, key, res)
            if "min" not in parts and "max" not in parts:
                self.fail("`clamp` needs `min` or `max`", key)
            code = ", ".join([parts["x"].code] + [f"{n}={parts[n].code}" for n in ("min", "max") if n in parts])
            return Expr(f"rt.clamp({code})", _join(*(p.kind for p in parts.values())))
        if f == "where":
            if len(v.args) != 3 or kw:
                self.fail("`where` takes `(condition, a, b)`", key)
            c, a, b = (self.tr(x, key, res) for x in v.args)
            if c.kind == "const":  # a hyperparameter switch (Nesterov): pick the branch in Python
                return Expr(f"{a.wrap(COND + 1)} if {c.wrap(COND + 1)} else {b.wrap(COND)}",
                            _join(a.kind, b.kind), COND)
            return Expr(f"rt.where({c.code}, {a.code}, {b.code})", "tensor")
        if f == "newton_schulz":
            if len(v.args) != 1:
                self.fail("`newton_schulz` takes one matrix, then `steps=`, `coefficients=`, `eps=`", key)
            unknown = set(kw) - set(NS_KWARGS)
            if unknown:
                self.fail(f"`newton_schulz` has no argument `{sorted(unknown)[0]}`", key,
                          help="its arguments are `steps`, `coefficients` and `eps`")
            x = self.tr(v.args[0], key, res)
            if x.kind != "tensor":
                self.fail("`newton_schulz` orthogonalises a tensor per parameter, not a constant", key)
            parts = [x.code]
            for n in NS_KWARGS:
                if n in kw:
                    a = self.tr(kw[n], key, res)
                    if a.kind != "const":
                        self.fail(f"`newton_schulz`'s `{n}` must be a constant", key)
                    parts.append(f"{n}={a.code}")
            self.uses_ns = True
            return Expr(f"rt.newton_schulz({', '.join(parts)})", "tensor")
        self.fail(f"`{f}` is not a function optimizer expressions can use", key)

    def tr_apply(self, v: M.Call, key, res) -> Expr:
        """``m(q)``: a memory applied to a query."""
        mem = self.memories[v.func]
        if len(v.args) != 1 or v.kwargs:
            self.fail(f"`{v.func}(...)` applies the memory to one query", key)
        q = self.tr(v.args[0], key, res)
        kind = mem.structure.kind
        if kind == "elementwise":
            m = res.name(v.func, key)
            return Expr(f"{m.wrap(MUL)} * {q.wrap(MUL + 1)}", "tensor", MUL)
        if kind == "mlp":
            if not isinstance(res, StepResolver):
                self.fail(f"`{v.func}(...)` is computed each step and cannot be used here", key)
            res.applied(v.func)
            return Expr(f"{self.mlp(v.func)}.read(states, {literal(v.func)}, {q.code})", "tensor")
        self.fail(f"`{v.func}` is a `{kind}` memory and cannot be applied to a query", key,
                  help=f"read its state by name: `{v.func}`")

    # ---- memory reads, writes ----
    def mem_local(self, name: str) -> str:
        return self.namer.name(name)

    def decay_value(self, mem: M.Memory):
        """The factor on the old state of an l2/dot write (retention - lr, or retention), written
        from the spec's own expressions: ``1 - (1 - betas[0])`` is ``betas[0]``."""
        ret = self.written(mem, "retention", mem.retention.value) if (
            mem.retention and mem.retention.kind == "constant") else 1
        lr = self.written(mem, "lr", mem.lr.value) if mem.lr else 1.0
        if mem.objective.kind == "dot":
            return ret
        if _is_num(ret) and _is_num(lr):
            return ret - lr
        if _is_num(ret) and ret == 1 and isinstance(lr, M.Op) and lr.op == "-" and _is_num(lr.args[0]) \
                and lr.args[0] == 1:
            return lr.args[1]
        return M.Op(op="-", args=(ret, lr))

    def read_code(self, mem: M.Memory, writes_code: str, res, key) -> str:
        args = [f"states, {literal(mem.name)}"]
        if mem.bias_correction:
            d = self.tr(self.decay_value(mem), key, res)
            args.append(f"bias_decay={d.code}, writes={writes_code}")
        code = f"rt.read({', '.join(args)})"
        if mem.precondition is not None and mem.precondition.kind == "newton_schulz":
            pc = mem.precondition
            code = (f"rt.newton_schulz({code}, steps={literal(pc.steps)}, "
                    f"coefficients={literal(tuple(pc.coefficients))})")
        return code

    def write_kwargs(self, mem: M.Memory, res, key) -> list[str]:
        out = []
        if mem.key is not None:
            k = self.tr(mem.key, key + ("ref",), res)
            if k.kind == "const" and mem.structure.kind == "linear":
                self.fail(f"memory `{mem.name}`: a linear memory's key is a matrix per parameter, not a "
                          "number", key + ("key",), key)
            out.append(f"key={k.code}")
        out.append(f"objective={literal(mem.objective.kind)}")
        lr = self.written(mem, "lr", mem.lr.value) if mem.lr else 1.0
        out.append(f"lr={self.tr(lr, key, res).code}")
        if mem.retention is not None and mem.retention.kind == "constant":
            out.append(f"retention={self.tr(self.written(mem, 'retention', mem.retention.value), key, res).code}")
        if mem.objective.kind in ("l2", "dot") and (mem.rule is None or mem.rule.kind == "gd") and mem.key is None:
            out.append(f"decay={self.tr(self.decay_value(mem), key, res).code}")
        if mem.key is not None and mem.structure.kind == "linear":
            out.append("structure='linear'")
        if mem.objective.kind == "lp":
            out.append(f"p={literal(mem.objective.p)}")
        if mem.objective.kind == "huber":
            out.append(f"delta={literal(mem.objective.delta)}")
        if mem.rule is not None and mem.rule.kind == "dgd":
            out.append("rule='dgd'")
        return out

    def memory_comment(self, mem: M.Memory) -> str:
        lv = self.levels[mem.level]
        every = "every step" if lv.period == 1 else f"every {lv.period} steps"
        bits = [f"key {show(mem.key)}"] if mem.key is not None else []
        if mem.structure.kind == "mlp":
            bits.insert(0, "an MLP per coordinate")
        bits.append(f"objective {mem.objective.kind}")
        if mem.rule is not None and mem.rule.kind != "gd":
            bits.append(f"rule {mem.rule.kind}")
        lr = self.written(mem, "lr", mem.lr.value) if mem.lr else 1.0
        bits.append(f"lr {show(lr)}")
        if mem.retention is not None and mem.retention.kind == "constant":
            bits.append(f"retention {show(self.written(mem, 'retention', mem.retention.value))}")
        if mem.bias_correction:
            bits.append("bias-corrected")
        return (f"{self.where((self.opt.name, 'memory', mem.name))}  memory {mem.name} in {mem.level} "
                f"({every}): {', '.join(bits)}")

    # ---- the plan ----
    def plan(self) -> dict:
        self.classify()
        o = self.opt
        step_res = StepResolver(self)
        nodes: dict[tuple, Node] = {}
        counter = [0]

        def node(key) -> Node:
            if key not in nodes:
                nodes[key] = Node(key, counter[0])
                counter[0] += 1
            return nodes[key]

        # order of preference when several statements are ready: parameters, then each
        # memory's write and read in spec order, then the update
        for name in self.derived:
            node(("D", name))
        for mem in o.memories:
            node(("W", mem.name))
            node(("R", mem.name))
        node(("U",))

        # derived values
        for name, value in self.derived.items():
            key = (o.name, "param", name)
            n = nodes[("D", name)]
            with step_res.recording(n.deps):
                e = self.tr(value, key, step_res)
            local = self.namer.name(name)
            code = f"{local} = {e.code}" if e.kind == "const" else f"{local} = rt.bind({e.code})"
            n.stmt = Stmt(f"{self.where(key)}  {name} = {show(value)}", [code])
        # memory writes (fast) and chunk accumulation (slow)
        for mem in o.memories:
            key = (o.name, "memory", mem.name)
            w = nodes[("W", mem.name)]
            src = mem.input if mem.input is not None else M.Ref(name="grad")
            with step_res.recording(w.deps):
                x = self.tr(src, key + ("ref",), step_res)
                if self.is_slow(mem.name):
                    w.stmt = Stmt(self.memory_comment(mem) + ": add to the chunk sum",
                                  [f"rt.accumulate(states, {literal(mem.name)}, {x.code})"])
                else:
                    kws = self.write_kwargs(mem, step_res, key)
                    if mem.key is not None and mem.structure.kind == "linear" and x.kind != "const":
                        self.fail(f"memory `{mem.name}`: a linear memory with a key maps it to a multiple of "
                                  "the identity (Eq. 48's P = x I), so its `input` must be a number",
                                  key + ("input",), key, help="write `input 1` (P = I)")
                    if mem.init is not None and mem.init.kind == "first":
                        step_res.builtin("step")
                        kws += ["first=True", "writes=step"]
                    writer = f"{self.mlp(mem.name)}.write" if mem.name in self.mlps else "rt.write"
                    w.stmt = Stmt(self.memory_comment(mem),
                                  [f"{writer}(states, {literal(mem.name)}, {x.code}, {', '.join(kws)})"])
        # the update
        u = nodes[("U",)]
        ukey = (o.name, "update")
        with step_res.recording(u.deps):
            upd = self.tr(o.update, ukey, step_res)
        if upd.kind != "tensor":
            self.fail("the update must be a tensor per parameter (use `grad`, `param` or a memory)", ukey)
        step_res.builtin("param")
        u.stmt = Stmt(f"{self.where(ukey)}  update = {show(o.update)}",
                      [f"rt.apply_update(param, {upd.code})"])
        u.deps |= {("W", m.name) for m in o.memories}
        # memory reads that were asked for
        for mem in o.memories:
            r = nodes[("R", mem.name)]
            if mem.name not in step_res.reads:
                continue
            local = self.mem_local(mem.name)
            key = (o.name, "memory", mem.name)
            if self.is_slow(mem.name):
                ci = step_res.slow_reads.get(mem.name)
                if ci is not None:
                    code = f"{local} = {self.caches[ci].local}"
                    r.deps.add(("C", ci))
                else:
                    with step_res.recording(r.deps):
                        p = self.levels[mem.level].period
                        step_res.builtin("step")
                        code = f"{local} = {self.read_code(mem, f'(step - 1) // {p}', step_res, key)}"
                r.stmt = Stmt(f"{self.where(key)}  {mem.name}: the state of the last boundary of "
                              f"level {mem.level}", [code])
            else:
                r.deps.add(("W", mem.name))
                with step_res.recording(r.deps):
                    if mem.bias_correction:
                        step_res.builtin("step")
                    read = self.read_code(mem, "step", step_res, key)
                code = f"{local} = {read}" if read.startswith("rt.read(") else f"{local} = rt.bind({read})"
                r.stmt = Stmt(None, [code])
        body = self.order(nodes, step_res)
        return self.context(step_res, body)

    def order(self, nodes: dict[tuple, Node], res: "StepResolver") -> list[Stmt]:
        wanted: set[tuple] = set()
        stack = [("U",)] + [("W", m.name) for m in self.opt.memories]
        while stack:
            k = stack.pop()
            if k in wanted or k[0] == "C":
                continue
            wanted.add(k)
            stack.extend(nodes[k].deps)
        for k in wanted:
            if nodes[k].stmt is None:
                raise AssertionError(f"no statement for {k}")
        indeg = {k: 0 for k in wanted}
        users: dict[tuple, list] = {k: [] for k in wanted}
        for k in wanted:
            for d in nodes[k].deps:
                if d in wanted:
                    indeg[k] += 1
                    users[d].append(k)
        ready = [(nodes[k].order, k) for k in wanted if indeg[k] == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            _, k = heapq.heappop(ready)
            out.append(nodes[k].stmt)
            for u in users[k]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(ready, (nodes[u].order, u))
        if len(out) != len(wanted):
            stuck = sorted(k for k in wanted if indeg[k] > 0)
            names = ", ".join(dict.fromkeys(k[1] for k in stuck if len(k) > 1))
            first = next((k for k in stuck if len(k) > 1), None)
            keys = [(self.opt.name, "memory" if first[0] in ("W", "R") else "param", first[1])] if first else []
            self.fail(f"values depend on each other in a cycle ({names}): a fast memory cannot read "
                      "itself in its own input", *keys,
                      help="read the memory's previous state through a slower level, or restructure")
        return out

    # ---- the template context ----
    def context(self, res: "StepResolver", body: list[Stmt]) -> dict:
        o = self.opt
        builtins = []
        if "param" in res.builtins_used:
            builtins.append("param = rt.TensorList(params)")
        if "grad" in res.builtins_used:
            builtins.append("grad = rt.TensorList(grads)")
        if "step" in res.builtins_used or self.caches or any(self.is_slow(m) for m in self.memories):
            builtins.append("step = rt.steps(states)")
        if res.builtins_used & {"rows", "cols"}:
            builtins.append("rows, cols = rt.rows_cols(params)")
        # amortised slow values: fill in missing ones (first step, new parameters), then read
        cache_stmts = []
        for c in self.caches:
            cache_stmts.append(Stmt(
                f"{c.comment}: computed once per chunk of level {', '.join(c.levels)}",
                [f"fresh = rt.missing(states, {literal(c.key)})",
                 "if fresh:",
                 f"    rt.store(rt.subset(states, fresh), {literal(c.key)}, "
                 f"self.{c.method}(group, rt.subset(states, fresh), step.take(fresh) - 1))",
                 f"{c.local} = rt.read(states, {literal(c.key)})"]))
        # slow levels: boundary writes after the update, then refresh their amortised values
        boundary = []
        due_names = {}
        for lv in o.levels:
            mems = [m for m in o.memories if m.level == lv.name]
            if lv.period <= 1 or not mems:
                continue
            due = self.namer.fresh(f"due_{lv.name}")
            due_names[lv.name] = due
            lines = [f"{due} = rt.boundaries(step, {literal(lv.period)})", f"if {due}:",
                     f"    done = rt.subset(states, {due})"]
            self.namer.taken.add("done")
            res_b = BoundaryResolver(self)
            for m in mems:
                kws = self.write_kwargs(m, res_b, (o.name, "memory", m.name))
                if m.init is not None and m.init.kind == "first":
                    kws += ["first=True", f"writes=step.take({due}) // {literal(lv.period)}"]
                lines.append(f"    rt.write_chunk(done, {literal(m.name)}, {', '.join(kws)})")
            res.hyper_used |= res_b.hyper_used
            boundary.append(Stmt(f"{self.where((o.name, 'level', lv.name))}  level {lv.name}: every "
                                 f"{lv.period} steps its memories write once, with the chunk's summed input",
                                 lines))
        for c in self.caches:
            dues = [due_names[lv] for lv in c.levels if lv in due_names]
            if not dues:
                continue
            if len(dues) == 1:
                refresh = dues[0]
                lines = []
            else:
                refresh = "refresh"
                lines = [f"refresh = sorted(set({') | set('.join(dues)}))"]
            lines += [f"if {refresh}:",
                      f"    rt.store(rt.subset(states, {refresh}), {literal(c.key)}, "
                      f"self.{c.method}(group, rt.subset(states, {refresh}), step.take({refresh})))"]
            boundary.append(Stmt(f"{c.comment}: refreshed after the boundary write", lines))
        # the group's hyperparameters (and constants computed from them) the step uses,
        # including those of the boundary writes
        prelude = [f"{self.namer.name(n)} = group[{literal(n)}]" for n in self.hyper if n in res.hyper_used]
        prelude += [ln for ln in self.derived_const_lines(res.derived_used) if ln not in prelude]
        init_body = self.init_body()
        matrix_only = ""
        if self.uses_ns:
            matrix_only = "Newton-Schulz orthogonalises each parameter as a matrix"
        elif self.uses_delta:
            matrix_only = "a linear memory with a key treats each parameter as a matrix"
        levels_doc = "; ".join(
            f"{lv.name} (every {lv.period} step{'s' if lv.period > 1 else ''}): "
            + (", ".join(m.name for m in o.memories if m.level == lv.name) or "no memories")
            for lv in o.levels)
        doc = (o.doc + "\n\n" if o.doc else "") + f"Compiled from {self.where((o.name,))}. Levels: {levels_doc}."
        return {
            "name": o.name,
            "source": self.where((o.name,)),
            "doc": docstring(doc, "    "),
            "hyperparameters": [{"name": n, "default": literal(v)} for n, v in self.hyper.items()],
            "hyperparameters_literal": literal(dict(self.hyper)),
            "matrix_only": literal(matrix_only),
            "spec_literal": literal(self.where((o.name,))),
            "init": init_body,
            "mlp_memories": [{"name": literal(n), "code": c,
                              "comment": f"{self.where((o.name, 'memory', n))}  memory {n}: one MLP per coordinate, "
                                         "its weights in the state (nldsl.optim.deep)"}
                             for n, c in self.mlps.items()],
            "caches": [{"method": c.method, "comment": c.comment, "body": c.body, "result": c.result}
                       for c in self.caches],
            "prelude": prelude,
            "builtins": builtins,
            "cache_reads": cache_stmts,
            "body": body,
            "boundary": boundary,
            "defaults": dict(self.hyper),
        }

    def derived_const_lines(self, used: set[str]) -> list[str]:
        """Assignments of the derived constants in ``used`` (and what they need), in order."""
        need: set[str] = set()

        def visit(name):
            if name in need:
                return
            need.add(name)
            for r in _refs(self.derived[name]):
                if r in self.derived:
                    visit(r)

        for n in used:
            if n in self.derived and self.kind_of_name(n, None) == "const":
                visit(n)
        out = []
        res = ConstResolver(self)
        for name, value in self.derived.items():
            if name in need:
                e = self.tr(value, (self.opt.name, "param", name), res)
                out.append(f"{self.namer.name(name)} = {e.code}")
        hyper_first = [f"{self.namer.name(n)} = group[{literal(n)}]" for n in self.hyper if n in res.hyper_used]
        return hyper_first + out

    def init_body(self) -> list[Stmt]:
        o = self.opt
        res = ConstResolver(self)
        stmts = []
        for mem in o.memories:
            key = (o.name, "memory", mem.name)
            init = mem.init.kind if mem.init else "zeros"
            if mem.name in self.mlps:
                build = f"state.update({self.mlp(mem.name)}.initial_state({literal(mem.name)}, p))"
                stmts.append(Stmt(f"{self.where(key)}  memory {mem.name}: an MLP per coordinate, its last layer "
                                  "zero", [build]))
                continue
            if init == "constant":
                v = self.written(mem, "init", mem.init.value)
                e = self.tr(v, key + ("init",), res)
                if e.kind != "const":
                    self.fail(f"memory `{mem.name}`: the initial constant must be a number", key + ("init",), key)
                code = f"rt.full(p, {e.code})"
            else:
                code = "rt.zeros(p)"
            lines = [f"state[{literal(mem.name)}] = {code}"]
            if self.is_slow(mem.name):  # the key nldsl.optim.memory.chunk_key gives
                lines.append(f"state[{literal(mem.name + '.chunk_sum')}] = rt.zeros(p)")
            stmts.append(Stmt(f"{self.where(key)}  memory {mem.name}: init {init}", lines))
        pre = [f"{self.namer.name(n)} = group[{literal(n)}]" for n in self.hyper if n in res.hyper_used]
        pre += [ln for ln in self.derived_const_lines(res.derived_used) if ln not in pre]
        if pre:
            stmts.insert(0, Stmt(None, pre))
        return stmts

    # ---- amortised slow values ----
    def cache_for(self, v: M.Call, key, comment: str, levels: tuple[str, ...], read_of: str | None = None) -> int:
        for c in self.caches:
            if c.value == v:
                return c.index
        i = len(self.caches)
        # state key "slow.{i}": what nldsl.optim.memory.cache_key(i) gives
        c = Cache(index=i, key=f"slow.{i}", value=v, levels=levels, method=f"_slow_{i}",
                  local=self.namer.fresh(f"slow_{i}"), comment=comment)
        self.caches.append(c)
        res = CacheResolver(self)
        if read_of is not None:
            mem = self.memories[read_of]
            p = self.levels[mem.level].period
            result = self.read_code(mem, f"clock // {p}", res, key)
        else:
            result = self.tr_call(v, key, res).code
        c.body = [Stmt(None, res.lines())]
        c.result = result
        return i


class _Recording:
    def __init__(self, res, deps):
        self.res, self.deps = res, deps

    def __enter__(self):
        self.res._deps.append(self.deps)

    def __exit__(self, *exc):
        self.res._deps.pop()


class StepResolver:
    """Names as seen inside ``step``: records the statements each expression depends on."""

    def __init__(self, planner: OptimizerPlanner):
        self.p = planner
        self._deps: list[set] = []
        self.hyper_used: set[str] = set()
        self.derived_used: set[str] = set()
        self.builtins_used: set[str] = set()
        self.reads: set[str] = set()
        self.slow_reads: dict[str, int] = {}

    def recording(self, deps: set) -> _Recording:
        return _Recording(self, deps)

    def dep(self, key) -> None:
        if self._deps:
            self._deps[-1].add(key)

    def builtin(self, name: str) -> None:
        self.builtins_used.add(name)

    def applied(self, name: str) -> None:
        """``name(q)`` of an MLP memory: computed after the memory's write of this step."""
        self.dep(("W", name))

    def name(self, name: str, key) -> Expr:
        p = self.p
        if name in BUILTINS:
            self.builtins_used.add(name)
            return Expr(name, p.kind_of_name(name, key))
        if name in p.hyper:
            self.hyper_used.add(name)
            return Expr(p.namer.name(name), "const")
        if name in p.derived:
            kind = p.kind_of_name(name, key)
            if kind == "const":
                self.derived_used.add(name)
            else:
                self.dep(("D", name))
            return Expr(p.namer.name(name), kind)
        if name in p.memories:
            self.reads.add(name)
            self.dep(("R", name))
            mem = p.memories[name]
            if p.is_slow(name) and mem.precondition is not None and mem.precondition.kind == "newton_schulz":
                if name not in self.slow_reads:
                    call = M.Call(func="newton_schulz", args=(M.Ref(name=name),))
                    self.slow_reads[name] = p.cache_for(
                        call, (p.opt.name, "memory", name),
                        f"{p.where((p.opt.name, 'memory', name))}  newton_schulz({name}) (its precondition)",
                        (mem.level,), read_of=name)
            return Expr(p.namer.name(name), "tensor")
        return p.kind_of_name(name, key)  # reports the unknown name

    def cached(self, v: M.Call, key) -> Expr | None:
        p = self.p
        if p.kind_of(v, key) != "tensor":
            return None
        mems, runtime = p.scan(v, key)
        if runtime or not mems or not all(p.is_slow(m) for m in mems):
            return None
        levels = tuple(dict.fromkeys(p.memories[m].level for m in p.memories if m in mems))
        i = p.cache_for(v, key, f"{p.where(key)}  {show(v)}", levels)
        self.dep(("C", i))
        return Expr(p.caches[i].local, "tensor")


class ConstResolver:
    """Names in constant contexts (initial states, derived constants): hyperparameters only."""

    def __init__(self, planner: OptimizerPlanner):
        self.p = planner
        self.hyper_used: set[str] = set()
        self.derived_used: set[str] = set()

    def name(self, name: str, key) -> Expr:
        p = self.p
        if name in p.hyper:
            self.hyper_used.add(name)
            return Expr(p.namer.name(name), "const")
        if name in p.derived and p.kind_of_name(name, key) == "const":
            self.derived_used.add(name)
            for r in _refs(p.derived[name]):
                if r in p.hyper:
                    self.hyper_used.add(r)
                elif r in p.derived:
                    self.name(r, key)
            return Expr(p.namer.name(name), "const")
        p.fail(f"`{name}` is not a constant here (only hyperparameters and values computed from them)", key)

    def cached(self, v, key):
        return None


class BoundaryResolver(ConstResolver):
    """Names in a slow level's boundary write: hyperparameters (lr, retention)."""


class CacheResolver(ConstResolver):
    """Names inside an amortised slow value's method: hyperparameters and slow memories."""

    def __init__(self, planner: OptimizerPlanner):
        super().__init__(planner)
        self.reads: dict[str, str] = {}

    def name(self, name: str, key) -> Expr:
        p = self.p
        if name in p.memories:
            if name not in self.reads:
                mem = p.memories[name]
                per = p.levels[mem.level].period
                self.reads[name] = p.read_code(mem, f"clock // {per}", self, key)
            return Expr(p.namer.name(name), "tensor")
        return super().name(name, key)

    def lines(self) -> list[str]:
        pre = [f"{self.p.namer.name(n)} = group[{literal(n)}]" for n in self.p.hyper if n in self.hyper_used]
        pre += [ln for ln in self.p.derived_const_lines(self.derived_used) if ln not in pre]
        return pre + [f"{self.p.namer.name(m)} = {code}" for m, code in self.reads.items()]


def _plan(opt: M.Optimizer, spec) -> dict:
    return OptimizerPlanner(opt, spec).plan()


def _register() -> None:
    from nldsl.codegen import BlockKind, register_block_kind

    register_block_kind(BlockKind(name="optimizer", blocks=lambda ir: ir.optimizers, plan=_plan,
                                  template="optimizer.py.j2",
                                  imports=("import torch", "import nldsl.optim as rt")))


_register()
