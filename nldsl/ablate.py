"""Ablations: edits of a spec by path, applied to its syntax tree.

Paths address the spec by its own names (Hydra-style overrides, and the ``ablation NAME {}``
blocks of a spec use the same forms):

- ``dim = 64`` a model or optimizer parameter; ``block = ...``; ``optimizer = ...``; ``update = ...``
- ``fast.every = 32``, ``fast.clock``, ``fast.read``, ``fast.scope`` for a level
- ``titans.rule = gd``, ``titans.structure = linear``, ``titans.structure.depth = 3``,
  ``titans.inputs.k = static``, ``titans.level = slow`` for a memory (and CMS chains alike)
- ``~titans`` removes a memory, CMS chain or level (and its uses in the block and transfers);
  ``~titans.momentum`` removes a property; ``+titans.momentum = 0.9`` adds one.

Edits apply to the syntax tree, so parameters referenced by name (``every chunk``) resolve
again in the variant, and the variant prints back as a spec with its comments.
"""
from __future__ import annotations

from dataclasses import replace

from nldsl.diagnostics import suggest
from nldsl.syntax import ast as A

LEVEL_ATTRS = ("every", "clock", "read", "scope")
TOP_KEYWORDS = ("block", "optimizer", "update")


class EditError(Exception):
    def __init__(self, message: str, span: A.Span | None = None, help: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.help = help


def _memory_props(kind: str) -> tuple[str, ...]:
    from nldsl.ir.lower import Ctx, Lowerer

    low = Lowerer(Ctx("<edit>"))
    if kind == "optimizer":
        return tuple(low._memory_props(True, False))
    if kind == "cms":
        return tuple(low._memory_props(False, True)) + ("levels", "structure", "aggregate")
    return tuple(low._memory_props(False, False))


def _is_norm(e: A.Expr) -> bool:
    return isinstance(e, A.Name) and e.id in ("norm", "rmsnorm", "layernorm", "identity")


def drop_from_block(e: A.Expr, name: str) -> A.Expr | None:
    """The block without ``name``; stages left holding only normalisations go too."""
    if isinstance(e, A.Name):
        return None if e.id == name else e
    if isinstance(e, A.Chain):
        items = [x for x in (drop_from_block(i, name) for i in e.items) if x is not None]
        if not items or all(_is_norm(x) for x in items) and len(items) < len(e.items):
            return None
        return items[0] if len(items) == 1 else replace(e, items=tuple(items))
    if isinstance(e, A.Call):
        args = [x for x in (drop_from_block(a, name) for a in e.args) if x is not None]
        if e.args and not args:
            return None
        if e.func == "residual" and all(_is_norm(a) for a in args) and args != list(e.args):
            return None
        return replace(e, args=tuple(args))
    return e


class _Target:
    """One model or optimizer of the tree, edited in place (on copies)."""

    def __init__(self, node: A.Model | A.Optimizer):
        self.node = node
        self.kind = "model" if isinstance(node, A.Model) else "optimizer"
        self.stmts = list(node.stmts)

    def named(self, cls, name: str):
        for i, s in enumerate(self.stmts):
            if isinstance(s, cls) and s.name == name:
                return i, s
        return None, None

    def top_names(self) -> list[str]:
        out = []
        for s in self.stmts:
            if isinstance(s, (A.Param, A.Level, A.Memory, A.Cms)):
                out.append(s.name)
        return out + [k for k in TOP_KEYWORDS if (k != "update") == (self.kind == "model")]

    def result(self):
        return replace(self.node, stmts=tuple(self.stmts))


def _set_kwarg(call: A.Expr, key: str, value: A.Expr | None, op: str, span) -> A.Expr:
    if isinstance(call, A.Name):
        call = A.Call(call.id, (), (), span=call.span)
    if not isinstance(call, A.Call):
        raise EditError("this value takes no arguments", span)
    kws = list(call.kwargs)
    idx = next((i for i, k in enumerate(kws) if k.name == key), None)
    if op == "remove":
        if idx is None:
            raise EditError(f"`{key}` is not set, nothing to remove", span)
        del kws[idx]
    elif idx is None:
        if op == "set":
            raise EditError(f"`{key}` is not set", span, help=f"to add it use `+...{key} = VALUE`")
        kws.append(A.KwArg(key, value))
    else:
        if op == "add":
            raise EditError(f"`{key}` is already set", span, help="to change it drop the `+`")
        kws[idx] = A.KwArg(key, value)
    if not kws and not call.args:
        return A.Name(call.func, span=call.span)
    return replace(call, kwargs=tuple(kws))


def _one_call(p: A.Prop) -> bool:
    return not p.kwargs and len(p.values) == 1 and isinstance(p.values[0], (A.Call, A.Name))


def _edit_body(t: _Target, i: int, s, rest: list[str], op: str, value, span, kind: str):
    prop = rest[0]
    if kind != "cms" and prop == "structure":
        if len(rest) == 1:
            if op != "set":
                raise EditError("a memory's structure can only be changed", span,
                                help=f"write `{s.name}.structure = VALUE`")
            t.stmts[i] = replace(s, structure=value)
        else:
            t.stmts[i] = replace(s, structure=_set_kwarg(s.structure, rest[1], value, op, span))
        return
    if kind != "cms" and prop == "level" and len(rest) == 1:
        if op != "set" or not isinstance(value, A.Name):
            raise EditError("a memory's level is changed with `NAME.level = LEVEL`", span)
        t.stmts[i] = replace(s, level=value.id)
        return
    if kind == "cms" and prop == "variant" and len(rest) == 1:
        if op != "set" or not isinstance(value, A.Name):
            raise EditError("a CMS variant is changed with `NAME.variant = sequential`", span)
        t.stmts[i] = replace(s, variant=value.id)
        return
    allowed = _memory_props("optimizer" if t.kind == "optimizer" else kind)
    if prop not in allowed:
        raise EditError(f"`{s.name}` has no property `{prop}`", span,
                        help=suggest(prop, list(allowed) + (["structure", "level"] if kind != "cms" else ["variant"]),
                                     "properties"))
    body = s.body or A.Body()
    props = list(body.props)
    idx = next((j for j, p in enumerate(props) if p.name == prop), None)
    if len(rest) == 2 and idx is not None and _one_call(props[idx]):
        # a keyword of the call that is the property's one value: `chain.structure.depth`,
        # `titans.rule.window`
        p = props[idx]
        props[idx] = replace(p, values=(_set_kwarg(p.values[0], rest[1], value, op, span),))
    elif len(rest) == 2:  # a keyword inside a property: inputs.k
        key = rest[1]
        if idx is None:
            if op == "set":
                raise EditError(f"`{s.name}.{prop}` is not set", span,
                                help=f"to add it use `+{s.name}.{prop}.{key} = VALUE`")
            if op == "remove":
                raise EditError(f"`{s.name}.{prop}` is not set, nothing to remove", span)
            props.append(A.Prop(prop, (), (A.KwArg(key, value),)))
        else:
            p = props[idx]
            kws = list(p.kwargs)
            k = next((j for j, kw in enumerate(kws) if kw.name == key), None)
            if op == "remove":
                if k is None:
                    raise EditError(f"`{s.name}.{prop}.{key}` is not set, nothing to remove", span)
                del kws[k]
            elif k is None:
                if op == "set":
                    raise EditError(f"`{s.name}.{prop}.{key}` is not set", span,
                                    help=f"to add it use `+{s.name}.{prop}.{key} = VALUE`")
                kws.append(A.KwArg(key, value))
            else:
                if op == "add":
                    raise EditError(f"`{s.name}.{prop}.{key}` is already set", span,
                                    help="to change it drop the `+`")
                kws[k] = A.KwArg(key, value)
            props[idx] = replace(p, kwargs=tuple(kws))
    elif len(rest) == 1:
        if op == "remove":
            if idx is None:
                raise EditError(f"`{s.name}.{prop}` is not set, nothing to remove", span)
            del props[idx]
        else:
            values = value.items if isinstance(value, A.Tuple) and prop == "levels" else (value,)
            new = A.Prop(prop, tuple(values))
            if idx is None:  # every property has a default, so `=` may set one not written
                props.append(new)
            else:
                if op == "add":
                    raise EditError(f"`{s.name}.{prop}` is already set", span, help="to change it drop the `+`")
                props[idx] = replace(new, trivia=props[idx].trivia)
    else:
        raise EditError(f"path is too long after `{s.name}.{prop}`", span)
    t.stmts[i] = replace(s, body=replace(body, props=tuple(props)))


def _remove_component(t: _Target, i: int, name: str):
    removed = t.stmts[i]
    del t.stmts[i]
    stmts = []
    for s in t.stmts:
        if isinstance(s, A.Transfer) and name in (s.source, s.target):
            continue
        if isinstance(s, A.Block):
            e = drop_from_block(s.expr, name)
            if e is None:
                e = A.Name("identity")
            s = replace(s, expr=e)
        stmts.append(s)
    # levels only the removed component used go with it
    if isinstance(removed, (A.Memory, A.Cms)):
        own = {removed.level} if isinstance(removed, A.Memory) else {
            v.id for p in (removed.body.props if removed.body else ()) if p.name == "levels"
            for v in p.values if isinstance(v, A.Name)}
        still = set()
        for s in stmts:
            if isinstance(s, A.Memory):
                still.add(s.level)
                for p in (s.body.props if s.body else ()):
                    if p.name == "generators":
                        still |= {v.id for v in p.values if isinstance(v, A.Name)}
            elif isinstance(s, A.Cms):
                for p in (s.body.props if s.body else ()):
                    if p.name == "levels":
                        still |= {v.id for v in p.values if isinstance(v, A.Name)}
        gone = {lv for lv in own if lv not in still}
        stmts = [s for s in stmts if not (isinstance(s, A.Level) and s.name in gone and s.clock == "tokens")
                 and not (isinstance(s, A.Transfer) and (s.source in gone or s.target in gone))]
    t.stmts = stmts


def apply_edit(t: _Target, op: str, path: tuple[str, ...], value: A.Expr | None, span) -> None:
    head, rest = path[0], list(path[1:])
    if not rest and head in TOP_KEYWORDS:
        cls = {"block": A.Block, "optimizer": A.UseOptimizer, "update": A.Update}[head]
        idx = next((i for i, s in enumerate(t.stmts) if isinstance(s, cls)), None)
        if op == "remove":
            if idx is None:
                raise EditError(f"`{head}` is not set, nothing to remove", span)
            del t.stmts[idx]
        elif idx is None:
            if op == "set":
                raise EditError(f"`{head}` is not set", span, help=f"to add it use `+{head} = VALUE`")
            t.stmts.append(cls(value))
        else:
            t.stmts[idx] = replace(t.stmts[idx], expr=value)
        return
    i, s = t.named(A.Param, head)
    if s is not None:
        if rest:
            raise EditError(f"parameter `{head}` has no parts", span, help=f"write `{head} = VALUE`")
        if op == "remove":
            del t.stmts[i]
        elif op == "add":
            raise EditError(f"parameter `{head}` is already set", span, help=f"to change it write `{head} = VALUE`")
        else:
            t.stmts[i] = replace(s, value=value)
        return
    i, s = t.named(A.Level, head)
    if s is not None:
        if not rest:
            if op != "remove":
                raise EditError(f"`{head}` is a level; edit one of its parts", span,
                                help=f"for example `{head}.every = 32`")
            del t.stmts[i]
            return
        attr = rest[0]
        if attr not in LEVEL_ATTRS or len(rest) > 1:
            raise EditError(f"level `{head}` has no part `{'.'.join(rest)}`", span,
                            help=suggest(attr, LEVEL_ATTRS, "level parts"))
        if op == "remove" and attr in ("read", "scope"):
            t.stmts[i] = replace(s, **{attr: None})
        elif op == "remove":
            raise EditError(f"a level always has `{attr}`", span)
        elif attr == "every":
            t.stmts[i] = replace(s, period=value)
        else:
            if not isinstance(value, A.Name):
                raise EditError(f"`{head}.{attr}` takes a name", span)
            t.stmts[i] = replace(s, **{attr: value.id})
        return
    for cls, kind in ((A.Memory, "memory"), (A.Cms, "cms")):
        i, s = t.named(cls, head)
        if s is not None:
            if not rest:
                if op != "remove":
                    raise EditError(f"`{head}` is a {kind}; edit one of its properties", span,
                                    help=f"for example `{head}.objective = dot`, or `~{head}` to remove it")
                _remove_component(t, i, head)
                return
            _edit_body(t, i, s, rest, op, value, span, kind)
            return
    if op == "add" and not rest:
        t.stmts.insert(sum(isinstance(x, A.Param) for x in t.stmts), A.Param(head, value))
        return
    raise EditError(f"`{head}` matches nothing in `{t.node.name}`", span,
                    help=suggest(head, t.top_names(), "names"))


def apply(f: A.File, edits: list[tuple[str, tuple[str, ...], A.Expr | None, A.Span | None]],
          target: str | None = None) -> A.File:
    """Applies ``(op, path, value, span)`` edits to the one model/optimizer (or ``target``)."""
    owners = [it for it in f.items if isinstance(it, (A.Model, A.Optimizer))]
    if target is not None:
        owners = [o for o in owners if o.name == target]
    if len(owners) != 1:
        raise EditError("ablations need exactly one model or optimizer in the spec")
    t = _Target(owners[0])
    for op, path, value, span in edits:
        apply_edit(t, op, path, value, span)
    new = t.result()
    items = tuple(new if it is owners[0] else it for it in f.items)
    return replace(f, items=items)


def ablation_edits(ab: A.Ablation):
    out = []
    for e in ab.edits:
        if isinstance(e, A.SetEdit):
            out.append(("set", e.path.parts, e.value, e.path.span))
        elif isinstance(e, A.AddEdit):
            out.append(("add", e.path.parts, e.value, e.path.span))
        else:
            out.append(("remove", e.path.parts, None, e.path.span))
    return out


def without_ablations(f: A.File) -> A.File:
    return replace(f, items=tuple(it for it in f.items if not isinstance(it, A.Ablation)))
