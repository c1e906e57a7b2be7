"""IR -> syntax tree with every default written out (``nldsl fmt --resolved``).

Comments are carried over from the original tree by matching statements by kind and name,
so the resolved spec reads like the original with the defaults made visible.
"""
from __future__ import annotations

from dataclasses import replace

from nldsl.ir import models as M
from nldsl.ir.values import to_expr
from nldsl.syntax import ast as A


def _name(x: str) -> A.Name:
    return A.Name(x)


def _call(func: str, *args, **kwargs) -> A.Call:
    return A.Call(func, tuple(args), tuple(A.KwArg(k, v) for k, v in kwargs.items()))


def structure(s: M.Structure) -> A.Expr:
    if s.kind == "mlp":
        return _call("mlp", depth=to_expr(s.depth), expansion=to_expr(s.expansion),
                     residual=A.Bool(bool(s.residual)), activation=_name(s.activation),
                     norm=_name(s.norm or "none"),
                     **({} if s.prenorm is None else {"prenorm": _name(s.prenorm)}))
    if s.kind == "attention" and s.window is not None:
        return _call("attention", window=to_expr(s.window))
    return _name(s.kind)


def _constant(kind: str, value) -> A.Expr:
    return _call("constant", to_expr(value)) if kind == "constant" else _name(kind)


def memory_props(m: M.Memory, *, skip: tuple[str, ...] = ()) -> list[A.Prop]:
    props: list[tuple[str, A.Expr | list[A.KwArg]]] = []
    if m.objective:
        o = m.objective
        props.append(("objective", _call("lp", p=to_expr(o.p)) if o.kind == "lp" else
                      _call("huber", delta=to_expr(o.delta)) if o.kind == "huber" else _name(o.kind)))
    if m.rule:
        props.append(("rule", _call("omega", window=to_expr(m.rule.window)) if m.rule.kind == "omega"
                      else _name(m.rule.kind)))
    if m.momentum:
        props.append(("momentum", _constant(m.momentum.kind, m.momentum.beta)))
    if m.precondition:
        p = m.precondition
        props.append(("precondition", _name("none") if p.kind == "none" else _call(
            "newton_schulz", steps=to_expr(p.steps),
            coefficients=A.Tuple(tuple(to_expr(c) for c in p.coefficients)))))
    if m.retention:
        props.append(("retention", _constant(m.retention.kind, m.retention.value)))
    if m.lr:
        props.append(("lr", _constant(m.lr.kind, m.lr.value)))
    if m.key is not None:
        props.append(("key", to_expr(m.key)))
    if m.input is not None:
        props.append(("input", to_expr(m.input)))
    if m.bias_correction is not None:
        props.append(("bias_correction", A.Bool(m.bias_correction)))
    if m.read:
        props.append(("read", _name(m.read)))
    if m.inputs is not None and m.structure.kind != "attention":
        props.append(("inputs", [A.KwArg(k, _name(getattr(m.inputs, k))) for k in ("k", "v", "q", "eta", "alpha")]))
    if m.generators:
        props.append(("generators", _name(m.generators)))
    if m.signal:
        props.append(("signal", _name(m.signal)))
    if m.writes:
        props.append(("writes", _name(m.writes)))
    if m.init:
        init = m.init
        props.append(("init", _call("pretrained", A.String(init.path)) if init.kind == "pretrained" else
                      _call("constant", to_expr(init.value)) if init.kind == "constant" else _name(init.kind)))
    for key in ("heads", "qk_norm", "v_norm", "conv"):
        v = getattr(m, key)
        if v is not None:
            props.append((key, _name(v) if isinstance(v, str) else to_expr(v)))
    out = []
    for name, v in props:
        if name in skip:
            continue
        if isinstance(v, list):
            out.append(A.Prop(name, (), tuple(v)))
        else:
            out.append(A.Prop(name, (v,)))
    return out


def _level(lv: M.Level) -> A.Level:
    return A.Level(lv.name, lv.clock, to_expr(lv.period), "carry" if lv.scope == "carry" else "reset", lv.read)


def _model(m: M.Model) -> A.Model:
    stmts: list = [A.Param(k, to_expr(v)) for k, v in m.params]
    stmts += [_level(lv) for lv in m.levels]
    for mem in m.memories:
        stmts.append(A.Memory(mem.name, mem.level, structure(mem.structure), A.Body(tuple(memory_props(mem)))))
    for c in m.cms:
        props = [A.Prop("levels", tuple(_name(x) for x in c.levels))]
        if c.memories:
            first = c.memories[0]
            props.append(A.Prop("structure", (structure(first.structure),)))
            # members may read differently (each defaults to its level's mode): write `read`
            # only when they agree
            reads = {m.read for m in c.memories}
            skip = ("inputs", "generators", "heads", "qk_norm", "v_norm", "conv")
            skip += () if len(reads) == 1 else ("read",)
            props += memory_props(first, skip=skip)
        if c.aggregate:
            props.append(A.Prop("aggregate", (_name(c.aggregate),)))
        stmts.append(A.Cms(c.name, c.variant, A.Body(tuple(props))))
    for t in m.transfers:
        kind = _call("generate", self=A.Bool(True)) if t.self_referential else _name(t.kind)
        stmts.append(A.Transfer(t.source, t.target, kind))
    if m.block is not None:
        stmts.append(A.Block(to_expr(m.block)))
    if m.optimizer:
        stmts.append(A.UseOptimizer(_name(m.optimizer)))
    return A.Model(m.name, tuple(stmts))


def _optimizer(o: M.Optimizer) -> A.Optimizer:
    stmts: list = [A.Param(k, to_expr(v)) for k, v in o.params]
    stmts += [_level(lv) for lv in o.levels]
    for mem in o.memories:
        stmts.append(A.Memory(mem.name, mem.level, structure(mem.structure), A.Body(tuple(memory_props(mem)))))
    if o.update is not None:
        stmts.append(A.Update(to_expr(o.update)))
    return A.Optimizer(o.name, tuple(stmts))


def _key(s) -> tuple:
    if isinstance(s, A.Transfer):
        return ("transfer", s.source, s.target)
    for attr in ("name",):
        if hasattr(s, attr):
            return (type(s).__name__, getattr(s, attr))
    return (type(s).__name__,)


def _carry_trivia(new_items, old_items):
    old = {_key(s): s for s in old_items}
    out = []
    for s in new_items:
        o = old.get(_key(s))
        if o is not None:
            kw = {"trivia": o.trivia}
            if isinstance(s, (A.Model, A.Optimizer)):
                kw["stmts"] = _carry_trivia(s.stmts, o.stmts)
                kw["closing"] = o.closing
            if isinstance(s, (A.Memory, A.Cms)) and s.body is not None and o.body is not None:
                kw["body"] = replace(s.body, props=_carry_trivia(s.body.props, o.body.props), closing=o.body.closing)
            s = replace(s, **kw)
        out.append(s)
    return tuple(out)


def resolved_tree(ir: M.SpecIR, original: A.File) -> A.File:
    """The spec with every default written out, keeping includes, ablations and comments."""
    built = {o.name: _model(o) for o in ir.models}
    built.update({o.name: _optimizer(o) for o in ir.optimizers})
    items = []
    for it in original.items:
        if isinstance(it, (A.Model, A.Optimizer)) and it.name in built:
            new = built[it.name]
            items.append(_carry_trivia((new,), (it,))[0])
        else:
            items.append(it)
    return replace(original, items=tuple(items))
