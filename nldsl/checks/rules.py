"""The checker: level-frequency consistency and compatibility rules over the IR.

Each rule is a function registered under its code in ``RULES``; it receives the model (or
optimizer) and a :class:`Checker` that knows the source spans, and reports through it. All
rules run, so a file's diagnostics come out together.
"""
from __future__ import annotations

from typing import Callable

import networkx as nx

from nldsl.diagnostics import Diagnostic, suggest
from nldsl.graph import block_flow_edges, block_names, endpoint_nodes, level_node, memory_node, speed_key
from nldsl.ir import models as M
from nldsl.ir.lower import BLOCK_BUILTINS, BLOCK_COMBINATORS, OPT_BUILTINS, OPT_FUNCTIONS, OPT_SIGNATURES
from nldsl.ir.values import walk


class Checker:
    def __init__(self, file: str, spans: dict, known_optimizers: dict[str, str]):
        self.file = file
        self.spans = spans
        self.known_optimizers = known_optimizers
        self.diags: list[Diagnostic] = []

    def span(self, *keys: tuple):
        for k in keys:
            s = self.spans.get(k)
            if s is not None:
                return s
        return None

    def report(self, code: str, message: str, *keys: tuple, help: str | None = None, notes=()):
        self.diags.append(Diagnostic.at(code, message, self.span(*keys), help=help, file=self.file,
                                        notes=notes))


ModelRule = Callable[[M.Model, Checker], None]
RULES: dict[str, list[tuple[str, Callable]]] = {}  # code -> [(applies to, rule)]


def rule(code: str, applies_to: str = "model"):
    def register(fn):
        RULES.setdefault(code, []).append((applies_to, fn))
        return fn
    return register


def _levels(owner) -> dict[str, M.Level]:
    return {lv.name: lv for lv in owner.levels}


def _memory_keys(owner, mem: M.Memory, field: str | None = None) -> tuple[tuple, ...]:
    """Source keys for a memory (CMS members point at their chain)."""
    keys = []
    if isinstance(owner, M.Model):
        for c in owner.cms:
            if mem in c.memories:
                if field:
                    keys.append((owner.name, "cms", c.name, field))
                keys.append((owner.name, "cms", c.name))
    if field:
        keys.append((owner.name, "memory", mem.name, field))
    keys.append((owner.name, "memory", mem.name))
    keys.append((owner.name,))
    return tuple(keys)


# ---- levels and frequencies ----------------------------------------------------------------


@rule("NL101")
@rule("NL101", "optimizer")
def unknown_levels(owner, ck: Checker):
    levels = _levels(owner)
    for mem in owner.memories:
        if mem.level not in levels:
            ck.report("NL101", f"memory `{mem.name}` is in level `{mem.level}`, which is not defined",
                      (owner.name, "memory", mem.name, "level"), help=suggest(mem.level, levels, "levels"))
        if mem.generators and mem.generators not in levels:
            ck.report("NL101", f"`generators {mem.generators}` names a level that is not defined",
                      (owner.name, "memory", mem.name, "generators"),
                      help=suggest(mem.generators, levels, "levels"))
    for c in getattr(owner, "cms", ()):
        for ln in c.levels:
            if ln not in levels:
                ck.report("NL101", f"CMS `{c.name}` lists level `{ln}`, which is not defined",
                          (owner.name, "cms", c.name, "levels", ln), (owner.name, "cms", c.name),
                          help=suggest(ln, levels, "levels"))


def _transfer_levels(owner: M.Model, name: str) -> list[M.Level]:
    levels = _levels(owner)
    if name in levels:
        return [levels[name]]
    out = []
    for mem in owner.all_memories():
        if mem.name == name and mem.level in levels:
            out.append(levels[mem.level])
    for c in owner.cms:
        if c.name == name:
            out += [levels[m.level] for m in c.memories if m.level in levels]
    return out


def _describe(lv: M.Level) -> str:
    return f"`{lv.name}` ({lv.clock} every {lv.period})"


@rule("NL104")
def init_from_slower(owner: M.Model, ck: Checker):
    for i, t in enumerate(owner.transfers):
        if t.kind != "init":
            continue
        for src in _transfer_levels(owner, t.source):
            for dst in _transfer_levels(owner, t.target):
                if not speed_key(src) > speed_key(dst):
                    slower = [lv for lv in owner.levels if speed_key(lv) > speed_key(dst)]
                    help = (f"write the transfer from a slower level, e.g. `transfer "
                            f"{max(slower, key=speed_key).name} -> {t.target} : init`" if slower else
                            "add an outer level (`level pretrain : steps every 1`) and transfer from it")
                    ck.report("NL104", f"`{t.source}` cannot meta-learn the initial state of `{t.target}`: "
                              f"{_describe(src)} is not slower than {_describe(dst)}",
                              (owner.name, "transfer", i, "source"), help=help)
                    break


def _slowest_name(owner: M.Model) -> str:
    return max(owner.levels, key=speed_key).name if owner.levels else "outer"


@rule("NL105")
def generate_from_slower(owner: M.Model, ck: Checker):
    for i, t in enumerate(owner.transfers):
        if t.kind != "generate":
            continue
        for src in _transfer_levels(owner, t.source):
            for dst in _transfer_levels(owner, t.target):
                same = speed_key(src) == speed_key(dst)
                if speed_key(src) < speed_key(dst):
                    ck.report("NL105", f"{_describe(src)} updates faster than {_describe(dst)}, so it "
                              f"cannot generate `{t.target}`", (owner.name, "transfer", i, "source"),
                              help="generation goes from a slower level to a faster one; for a faster "
                              "level feeding a slower one use `condition`")
                    return
                if same and not t.self_referential:
                    ck.report("NL105", f"`{t.source}` generating `{t.target}` at the same frequency is "
                              "self-referential and must be declared", (owner.name, "transfer", i, "kind"),
                              help="write `generate(self=true)`")
                    return


@rule("NL106")
def same_frequency_cycles(owner: M.Model, ck: Checker):
    """A dependency cycle whose members all share one frequency cannot be ordered. Dependencies:
    the data transfers (a level's stand for the memories it holds) and the block's data flow
    (a memory reads the output of the one before it); a cycle is reported at its last transfer."""
    import networkx as nx

    levels = _levels(owner)
    mem_level = {memory_node(m.name): m.level for m in owner.all_memories()}
    held: dict[str, list[str]] = {}
    for node, lv in mem_level.items():
        held.setdefault(level_node(lv), []).append(node)

    def members(name: str) -> list[str]:
        return [m for n in endpoint_nodes(owner, name) for m in held.get(n, [n])]

    dep = nx.DiGraph()
    index = {}
    for i, t in enumerate(owner.transfers):
        if t.kind in ("init", "backprop") or t.self_referential:
            continue
        for a in members(t.source):
            for b in members(t.target):
                dep.add_edge(a, b)
                index.setdefault((a, b), i)
    dep.add_edges_from(block_flow_edges(owner))

    def freq(node: str):
        name = mem_level.get(node) or node.split(":", 1)[1]
        lv = levels.get(name)
        return speed_key(lv) if lv else None

    reported = set()
    cycles = []
    for cycle in nx.simple_cycles(dep, length_bound=8):
        start = cycle.index(min(cycle))  # a canonical rotation: messages must not depend on hashing
        cycles.append(cycle[start:] + cycle[:start])
    for cycle in sorted(cycles):
        if cycle[0] == cycle[-1] and len(cycle) == 1 and (cycle[0], cycle[0]) in index:
            t = owner.transfers[index[(cycle[0], cycle[0])]]
            if t.kind == "generate":
                continue  # reported as NL105
        keys = {freq(n) for n in cycle}
        if len(keys) != 1 or None in keys:
            continue
        edges = list(zip(cycle, cycle[1:] + cycle[:1]))
        last = max((index[e] for e in edges if e in index), default=None)
        if last is None or last in reported:  # the block alone is not a cycle of transfers
            continue
        reported.add(last)
        name = lambda n: n.split(":", 1)[1]  # noqa: E731
        names = " -> ".join(map(name, cycle + cycle[:1]))
        fed = [f"{name(a)} into {name(b)}" for a, b in edges if (a, b) not in index]
        if fed:
            names += f" (the block feeds {', '.join(fed)})"
        ck.report("NL106", f"dependency cycle at one frequency: {names}",
                  (owner.name, "transfer", last, "source"),
                  help="remove one direction of the cycle, or make it `generate(self=true)` if it is "
                  "self-referential")


@rule("NL107")
def cms_divisibility(owner: M.Model, ck: Checker):
    levels = _levels(owner)
    for c in owner.cms:
        chain = [levels[n] for n in c.levels if n in levels]
        for fast, slow in zip(chain, chain[1:]):
            if fast.clock == slow.clock and slow.period > fast.period and slow.period % fast.period:
                ck.report("NL107", f"in CMS `{c.name}`, the period of `{slow.name}` ({slow.period}) is not "
                          f"a multiple of the period of `{fast.name}` ({fast.period})",
                          (owner.name, "level", slow.name, "period"),
                          help=f"use a multiple of {fast.period}, such as "
                               f"{fast.period * max(1, round(slow.period / fast.period))}")


def _context(owner: M.Model):
    ctx = owner.param("context")
    return ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None


def _partial(owner: M.Model) -> str:
    p = owner.param("partial")
    return p.name if isinstance(p, M.Ref) else "strict"


@rule("NL108")
def context_multiple(owner: M.Model, ck: Checker):
    ctx = _context(owner)
    if ctx is None or _partial(owner) != "strict":
        return
    for lv in owner.levels:
        if lv.clock == "tokens" and lv.period <= ctx and ctx % lv.period:
            ck.report("NL108", f"context {ctx} is not a multiple of the period of `{lv.name}` ({lv.period})",
                      (owner.name, "level", lv.name, "period"),
                      help="set `partial = carry` (or `flush`) in the model, or pick a context that is a "
                      f"multiple of {lv.period}")


@rule("NL109")
def never_updates(owner: M.Model, ck: Checker):
    ctx = _context(owner)
    if ctx is None:
        return
    for lv in owner.levels:
        if lv.clock == "tokens" and lv.period > ctx and lv.scope == "sequence":
            ck.report("NL109", f"level `{lv.name}` updates every {lv.period} tokens but a sequence has "
                      f"{ctx}: its state resets before it ever updates", (owner.name, "level", lv.name, "period"),
                      help=f"add `carry` to keep its state across calls: `level {lv.name} : tokens every "
                      f"{lv.period} carry`")


@rule("NL110")
def transfer_endpoints(owner: M.Model, ck: Checker):
    names = {lv.name for lv in owner.levels} | {m.name for m in owner.memories} | {c.name for c in owner.cms}
    for i, t in enumerate(owner.transfers):
        for end, key in ((t.source, "source"), (t.target, "target")):
            if end not in names:
                ck.report("NL110", f"transfer {key} `{end}` is not a level or memory of `{owner.name}`",
                          (owner.name, "transfer", i, key), help=suggest(end, names, "levels and memories"))


@rule("NL111")
def backprop_needs_differentiable(owner: M.Model, ck: Checker):
    for i, t in enumerate(owner.transfers):
        if t.kind != "backprop":
            continue
        targets = [m for m in owner.all_memories() if m.name == t.target or m.level == t.target]
        for c in owner.cms:
            if c.name == t.target:
                targets += list(c.memories)
        for m in targets:
            if m.writes == "detached":
                ck.report("NL111", f"backprop into `{m.name}` needs differentiable writes, but `{m.name}` "
                          "has `writes detached`", (owner.name, "transfer", i, "target"),
                          help=f"set `writes differentiable` on `{m.name}`, or use another kind of transfer")
                break


@rule("NL112")
def empty_levels(owner: M.Model, ck: Checker):
    used = {m.level for m in owner.all_memories()} | {m.generators for m in owner.memories if m.generators}
    for lv in owner.levels:
        if lv.clock == "tokens" and lv.name not in used:
            ck.report("NL112", f"level `{lv.name}` holds no memory", (owner.name, "level", lv.name, "name"),
                      help="put a memory in it, list it in a CMS chain, or remove it")


@rule("NL113")
def cms_order(owner: M.Model, ck: Checker):
    levels = _levels(owner)
    for c in owner.cms:
        chain = [levels[n] for n in c.levels if n in levels]
        for lv in chain:
            if lv.clock != "tokens":
                ck.report("NL113", f"CMS `{c.name}` lists `{lv.name}`, which counts {lv.clock}",
                          (owner.name, "cms", c.name, "levels", lv.name),
                          help="CMS levels are in-context levels: `tokens every N`")
                return
        for fast, slow in zip(chain, chain[1:]):
            if slow.period <= fast.period:
                ck.report("NL113", f"CMS `{c.name}` lists `{slow.name}` (every {slow.period}) after "
                          f"`{fast.name}` (every {fast.period}); list levels fastest first",
                          (owner.name, "cms", c.name, "levels", slow.name),
                          help="order: " + ", ".join(x.name for x in sorted(chain, key=speed_key)))
                return


@rule("NL114", "optimizer")
def optimizer_clock(owner: M.Optimizer, ck: Checker):
    for lv in owner.levels:
        if lv.clock != "steps":
            ck.report("NL114", f"optimizer level `{lv.name}` counts {lv.clock}; optimizer levels count steps",
                      (owner.name, "level", lv.name, "clock"),
                      help=f"write `level {lv.name} : steps every {lv.period}`")


@rule("NL115")
def meta_init_needs_transfer(owner: M.Model, ck: Checker):
    targets = {t.target for t in owner.transfers if t.kind == "init"}
    for mem in owner.memories:
        if mem.init and mem.init.kind == "meta" and mem.name not in targets and mem.level not in targets:
            ck.report("NL115", f"`{mem.name}` has a meta-learned initial state but no level learns it",
                      (owner.name, "memory", mem.name, "init"), (owner.name, "memory", mem.name),
                      help=f"add `transfer {_slowest_name(owner)} -> {mem.level} : init`")


# ---- memories --------------------------------------------------------------------------------


@rule("NL201", "optimizer")
def optimizer_structures(owner: M.Optimizer, ck: Checker):
    for mem in owner.memories:
        if mem.structure.kind == "attention":
            ck.report("NL201", f"optimizer memory `{mem.name}` cannot be attention: it compresses the "
                      "gradient stream", (owner.name, "memory", mem.name, "structure"),
                      help="use `elementwise`, `linear` or `mlp`")


@rule("NL202")
@rule("NL202", "optimizer")
def rule_fits_structure(owner, ck: Checker):
    for mem in owner.all_memories():
        if mem.structure.kind != "elementwise":
            continue
        if mem.rule and mem.rule.kind in ("dgd", "omega"):
            ck.report("NL202", f"rule `{mem.rule.kind}` needs a matrix memory, but `{mem.name}` is elementwise",
                      *_memory_keys(owner, mem, "rule"), help="use a `linear` or `mlp` memory, or `rule gd`")
        if mem.precondition and mem.precondition.kind == "newton_schulz":
            ck.report("NL202", f"Newton-Schulz orthogonalises a matrix, but `{mem.name}` is elementwise",
                      *_memory_keys(owner, mem, "precondition"),
                      help="use a `linear` memory (one matrix per parameter), or drop the preconditioner")


@rule("NL203")
@rule("NL203", "optimizer")
def rule_fits_objective(owner, ck: Checker):
    for mem in owner.all_memories():
        if mem.rule and mem.rule.kind == "dgd" and mem.objective and mem.objective.kind not in ("l2", "dot"):
            ck.report("NL203", f"delta gradient descent needs the `l2` or `dot` objective, not "
                      f"`{mem.objective.kind}`", *_memory_keys(owner, mem, "rule"),
                      help="set `objective l2`, or use `rule gd`")


def _literal(v, owner) -> float | None:
    """A constant's value when it folded to a number, or names a numeric parameter (an
    optimizer's `retention constant(momentum)`: its default, which a user may override)."""
    if isinstance(v, M.Ref):
        v = dict(owner.params).get(v.name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@rule("NL206")
@rule("NL206", "optimizer")
def constants_in_range(owner, ck: Checker):
    """Constant decays outside [0, 1] grow or flip a state every update; a negative step size
    climbs the objective. Valid, so warnings (0 is fine: a step of 0 turns learning off)."""
    for mem in owner.all_memories():
        decays = (("retention", "state", mem.retention.value if mem.retention and mem.retention.kind == "constant"
                   else None),
                  ("momentum", "momentum", mem.momentum.beta if mem.momentum and mem.momentum.kind == "constant"
                   else None))
        for field, what, value in decays:
            a = _literal(value, owner)
            if a is not None and not 0 <= a <= 1:
                effect = "grows without bound" if a > 1 else "flips its sign every update"
                ck.report("NL206", f"`{mem.name}` keeps {a:g} of its {what} per update: the {what} {effect}",
                          *_memory_keys(owner, mem, field),
                          help=f"a constant {field} is a fraction in [0, 1] (1 keeps everything)")
        eta = _literal(mem.lr.value, owner) if mem.lr and mem.lr.kind == "constant" else None
        if eta is not None and eta < 0:
            ck.report("NL206", f"`{mem.name}` steps with a learning rate of {eta:g}: a negative step climbs "
                      "its objective", *_memory_keys(owner, mem, "lr"),
                      help="use a positive step size (0 turns learning off)")


@rule("NL205", "optimizer")
def optimizer_keys(owner: M.Optimizer, ck: Checker):
    """An MLP maps keys to values and the delta rule erases along the key: both need one."""
    for mem in owner.memories:
        if mem.key is not None:
            continue
        if mem.structure.kind == "mlp":
            ck.report("NL205", f"`{mem.name}` is an MLP memory without a `key`: an MLP maps keys to "
                      "values, so its objective has nothing to read it at",
                      (owner.name, "memory", mem.name, "structure"), (owner.name, "memory", mem.name),
                      help="add `key grad` (deep momentum, Eq. 50: the memory is trained on the "
                      "gradient u = grad)")
        elif mem.rule is not None and mem.rule.kind == "dgd" and mem.structure.kind != "elementwise":  # else NL202
            ck.report("NL205", f"rule `dgd` erases along the memory's key, but `{mem.name}` has no `key`",
                      (owner.name, "memory", mem.name, "rule"), (owner.name, "memory", mem.name),
                      help="add `key grad` (delta momentum, Eq. 48-49), or use `rule gd`")


@rule("NL204")
def dimensions(owner: M.Model, ck: Checker):
    dim, heads = owner.param("dim"), owner.param("heads")
    if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads:
        ck.report("NL204", f"`dim` ({dim}) does not split evenly into {heads} heads",
                  (owner.name, "param", "heads"), (owner.name, "param", "dim"),
                  help=f"use a head count that divides {dim}")
        return
    for mem in owner.memories:
        if isinstance(dim, int) and mem.heads and dim % mem.heads:
            ck.report("NL204", f"`dim` ({dim}) does not split evenly into the {mem.heads} heads of `{mem.name}`",
                      (owner.name, "memory", mem.name, "heads"), help=f"use a head count that divides {dim}")


# ---- models and optimizers --------------------------------------------------------------------


@rule("NL301")
def block_names_exist(owner: M.Model, ck: Checker):
    if owner.block is None:
        return
    known = {m.name for m in owner.memories} | {c.name for c in owner.cms} | set(BLOCK_BUILTINS)

    def walk(v):
        if isinstance(v, M.Ref):
            if v.name not in known:
                ck.report("NL301", f"the block uses `{v.name}`, which is not a memory, CMS chain or builtin",
                          (owner.name, "block", v.name), (owner.name, "block"),
                          help=suggest(v.name, known, "names"))
        elif isinstance(v, M.Call):
            if v.func not in BLOCK_COMBINATORS and v.func not in BLOCK_BUILTINS:
                ck.report("NL301", f"the block calls `{v.func}`, which is not a combinator",
                          (owner.name, "block", "call", v.func), (owner.name, "block"),
                          help=suggest(v.func, BLOCK_COMBINATORS + BLOCK_BUILTINS, "combinators"))
            for a in v.args:
                walk(a)
            for _, a in v.kwargs:
                if not isinstance(a, (int, float)):
                    walk(a)
        elif isinstance(v, M.Op):
            if v.op not in ("->", "+"):
                ck.report("NL301", f"the block uses the operator `{v.op}`; blocks compose with `->` and "
                          "`sum(...)`", (owner.name, "block"))
                return
            for a in v.args:
                walk(a)
        else:
            ck.report("NL301", "a block composes names, not literal values", (owner.name, "block"),
                      help="for example `block = residual(norm -> attn) -> residual(norm -> mlp)`")

    walk(owner.block)


@rule("NL302")
def unused_memories(owner: M.Model, ck: Checker):
    used = set(block_names(owner.block))
    used |= {t.source for t in owner.transfers if t.kind in ("condition", "context", "generate")}
    for mem in owner.memories:
        if mem.name not in used:
            ck.report("NL302", f"memory `{mem.name}` is never used by the block", (owner.name, "memory", mem.name),
                      help="add it to `block = ...`, or remove it")
    for c in owner.cms:
        if c.name not in used:
            ck.report("NL302", f"CMS `{c.name}` is never used by the block", (owner.name, "cms", c.name),
                      help="add it to `block = ...`, or remove it")


@rule("NL304")
def optimizer_exists(owner: M.Model, ck: Checker):
    if owner.optimizer is None or owner.optimizer.startswith("file:"):
        return
    if owner.optimizer not in ck.known_optimizers:
        ck.report("NL304", f"`{owner.optimizer}` is not an optimizer defined here or in an included file",
                  (owner.name, "optimizer"), help=suggest(owner.optimizer, ck.known_optimizers, "optimizers"))


@rule("NL309")
@rule("NL309", "optimizer")
def parameter_cycles(owner, ck: Checker):
    """A parameter's value may use other parameters, but never, through them, itself: such a
    value has no first term to compute (an optimizer's `g = h + grad; h = g * param`)."""
    order = {name: i for i, (name, _) in enumerate(owner.params)}
    uses = nx.DiGraph()
    for name, value in owner.params:
        uses.add_node(name)
        uses.add_edges_from((name, ref.name) for ref in walk(value) if isinstance(ref, M.Ref) and ref.name in order)
    for cycle in sorted(nx.simple_cycles(uses), key=lambda c: sorted(order[n] for n in c)):
        start = cycle.index(min(cycle, key=order.get))
        cycle = cycle[start:] + cycle[:start]
        first = cycle[0]
        through = "" if len(cycle) == 1 else " through " + ", ".join(f"`{n}`" for n in cycle[1:])
        ck.report("NL309", f"parameter `{first}` is defined in terms of itself{through}",
                  (owner.name, "param", first),
                  help="compute it from numbers, builtins and parameters that do not use it")


def _optimizer_exprs(owner: M.Optimizer) -> list[tuple[M.Value, tuple, str]]:
    """(expression, source key, where) of every expression an optimizer computes with."""
    exprs = [(owner.update, (owner.name, "update"), "update")] if owner.update is not None else []
    for k, v in owner.params:  # parameters computed each step (g = grad + weight_decay * param)
        if isinstance(v, (M.Ref, M.Call, M.Op)):
            exprs.append((v, (owner.name, "param", k), k))
    for m in owner.memories:
        for field in (m.input, m.key, m.lr.value if m.lr else None, m.retention.value if m.retention else None,
                      m.momentum.beta if m.momentum else None, m.init.value if m.init else None):
            if field is not None:
                exprs.append((field, (owner.name, "memory", m.name, "ref"), m.name))
    return exprs


@rule("NL307", "optimizer")
def optimizer_names(owner: M.Optimizer, ck: Checker):
    memories = {m.name for m in owner.memories}
    known = {k for k, _ in owner.params} | memories | set(OPT_BUILTINS)
    for value, key, where in _optimizer_exprs(owner):
        for ref in (x for x in walk(value) if isinstance(x, M.Ref)):
            if ref.name not in known:
                ck.report("NL307", f"`{ref.name}` in `{where}` is not a parameter, memory or builtin of "
                          f"`{owner.name}`", key + (ref.name,), key, help=suggest(ref.name, known, "names"))
        for call in (x for x in walk(value) if isinstance(x, M.Call)):
            if call.func not in OPT_FUNCTIONS and call.func not in memories:  # m(q): NL308
                ck.report("NL307", f"`{call.func}` is not a function optimizer expressions can use",
                          key + ("call", call.func), key,
                          help=suggest(call.func, OPT_FUNCTIONS + tuple(sorted(memories)), "functions"))


@rule("NL005", "optimizer")
def optimizer_call_arguments(owner: M.Optimizer, ck: Checker):
    """The arguments of the functions optimizer expressions call (:data:`OPT_SIGNATURES`): unknown
    keywords (NL005) and wrong counts (NL006), at the call, before the compiler would meet them."""
    for value, key, where in _optimizer_exprs(owner):
        for call in (x for x in walk(value) if isinstance(x, M.Call) and x.func in OPT_SIGNATURES):
            fewest, most, keywords = OPT_SIGNATURES[call.func]
            at = key + ("call", call.func)
            for name, _ in call.kwargs:
                if name not in keywords:
                    ck.report("NL005", f"`{call.func}` has no argument `{name}`", at + (name,), at, key,
                              help=suggest(name, keywords, f"arguments of `{call.func}`") if keywords else
                              f"`{call.func}` takes no keyword arguments")
            if not fewest <= len(call.args) <= most:
                want = str(fewest) if fewest == most else f"{fewest} to {most}"
                ck.report("NL006", f"`{call.func}` takes {want} argument{'s' if most > 1 else ''}"
                          f"{' before its keywords' if keywords else ''}, not {len(call.args)}", at, key)


@rule("NL308", "optimizer")
def memory_reads(owner: M.Optimizer, ck: Checker):
    """A memory is read by name (its state) or applied to a query (`m(grad)`), as its structure allows."""
    structures = {m.name: m.structure.kind for m in owner.memories}
    for value, key, where in _optimizer_exprs(owner):
        for call in (x for x in walk(value) if isinstance(x, M.Call) and x.func in structures):
            kind = structures[call.func]
            if len(call.args) != 1 or call.kwargs:
                ck.report("NL308", f"`{call.func}(...)` applies the memory to one query, not "
                          f"{len(call.args) + len(call.kwargs)} arguments", key + ("call", call.func), key,
                          help=f"write `{call.func}(grad)`")
            elif kind == "linear":
                ck.report("NL308", f"`{call.func}` is a `linear` memory: applied to a query it gives a "
                          "rows x rows matrix, not an update shaped like the parameter",
                          key + ("call", call.func), key, help=f"read its state by name: `{call.func}`")
        for ref in (x for x in walk(value) if isinstance(x, M.Ref)):
            if structures.get(ref.name) == "mlp":
                ck.report("NL308", f"`{ref.name}` in `{where}` is an MLP memory: its state is the MLP's "
                          "weights, which have no value shaped like the parameter",
                          key + (ref.name,), key, help=f"apply it to a query: `{ref.name}(grad)`")


def run(ir: M.SpecIR, ck: Checker) -> list[Diagnostic]:
    for owners, kind in ((ir.models, "model"), (ir.optimizers, "optimizer")):
        for owner in owners:
            for code in sorted(RULES):
                for applies_to, fn in RULES[code]:
                    if applies_to == kind:
                        fn(owner, ck)
    return ck.diags
