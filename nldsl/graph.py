"""The level graph: a ``networkx.DiGraph`` view of one model or optimizer.

Nodes are ``level:NAME`` and ``memory:NAME`` (with clock, period, frequency and rank, where
rank 0 is the fastest level: see :func:`frequency_ranks`). Edges carry a ``kind``:

- ``holds``: a level holds a memory;
- the five transfer kinds of the paper (``condition``, ``context``, ``backprop``, ``init``,
  ``generate``), from transfers written in the spec or implied by it (generated inputs, CMS
  variants);
- ``flow``: data flow in the block, and along a sequential CMS chain.

The graph is derived from the IR every time; it is never the source of truth.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nldsl.ir import models as M
from nldsl.ir.values import walk

if TYPE_CHECKING:
    import networkx as nx

CLOCK_RANK = {"tokens": 0, "steps": 1}
#: edges along which a memory's state at time t needs another's state at time t
DEPENDENCY_KINDS = ("condition", "context", "generate", "flow")


def speed_key(level: M.Level) -> tuple[int, int]:
    """Sorts levels fastest first: token clocks before step clocks, then by period."""
    return (CLOCK_RANK[level.clock], level.period)


def level_node(name: str) -> str:
    return f"level:{name}"


def memory_node(name: str) -> str:
    return f"memory:{name}"


def block_names(value) -> list[str]:
    """Names used in a block expression, in order of first use."""
    if value is None:
        return []
    return list(dict.fromkeys(v.name for v in walk(value) if isinstance(v, M.Ref)))


def build(owner: M.Model | M.Optimizer) -> "nx.DiGraph":
    import networkx as nx  # imported here: `nldsl check` needs it only for cycle detection

    g = nx.DiGraph(name=owner.name, kind="model" if isinstance(owner, M.Model) else "optimizer")
    levels = {lv.name: lv for lv in owner.levels}
    ranked = sorted(levels.values(), key=speed_key)
    for lv in owner.levels:
        g.add_node(level_node(lv.name), kind="level", name=lv.name, clock=lv.clock, period=lv.period,
                   frequency=lv.frequency, scope=lv.scope, read=lv.read)

    def add_memory(mem: M.Memory, node: str | None = None, **extra):
        node = node or memory_node(mem.name)
        lv = levels.get(mem.level)
        attrs = dict(kind="memory", name=mem.name, level=mem.level, structure=mem.structure.kind,
                     objective=mem.objective.kind if mem.objective else None,
                     rule=mem.rule.kind if mem.rule else None)
        if lv is not None:
            attrs.update(clock=lv.clock, period=lv.period, frequency=lv.frequency)
            g.add_edge(level_node(lv.name), node, kind="holds")
        attrs.update(extra)
        g.add_node(node, **attrs)
        return node

    for mem in owner.memories:
        add_memory(mem)
        if mem.inputs is not None and mem.generators is not None:
            gen_level = levels.get(mem.generators)
            for inp in mem.inputs.generated():
                comp = M.Memory(name=f"{mem.name}.{inp}", level=mem.generators, structure=mem.structure,
                                objective=mem.objective, rule=mem.rule)
                node = add_memory(comp, generated_for=mem.name, input=inp) if gen_level else None
                if node is None:
                    continue
                # the memory is conditioned on its generators' outputs (paper Eq. 25)
                g.add_edge(node, memory_node(mem.name), kind="condition", input=inp, implied=True,
                           self_referential=False)
                if mem.signal == "self":
                    g.add_edge(node, node, kind="generate", implied=True, self_referential=True)

    if isinstance(owner, M.Model):
        steps_levels = [lv for lv in ranked if lv.clock == "steps"]
        outer = steps_levels[-1] if steps_levels else None
        for c in owner.cms:
            nodes = [add_memory(m, cms=c.name) for m in c.memories]
            for a, b in zip(nodes, nodes[1:]):
                if c.variant in ("sequential", "nested"):
                    g.add_edge(a, b, kind="flow", implied=True, cms=c.name)
                if c.variant == "nested":  # the slower block meta-learns the faster one's start
                    g.add_edge(b, a, kind="init", implied=True, cms=c.name, self_referential=False)
            if outer is not None and c.variant != "nested":
                for n in nodes:
                    g.add_edge(level_node(outer.name), n, kind="init", implied=True, cms=c.name,
                               self_referential=False)
            elif outer is not None and nodes:
                g.add_edge(level_node(outer.name), nodes[-1], kind="init", implied=True, cms=c.name,
                           self_referential=False)
        for t in owner.transfers:
            for src in endpoint_nodes(owner, t.source):
                for dst in endpoint_nodes(owner, t.target):
                    g.add_edge(src, dst, kind=t.kind, self_referential=t.self_referential, implied=False)
        # data flow in the block, as its operators compose the memories and CMS chains
        for a, b in block_flow_edges(owner):
            if not g.has_edge(a, b):
                g.add_edge(a, b, kind="flow", implied=True)
    rank = frequency_ranks(g, levels)
    for _, attrs in g.nodes(data=True):
        name = _level_of(attrs)
        if name in rank:
            attrs["rank"] = rank[name]
    return g


def _level_of(attrs: dict) -> str | None:
    return attrs["name"] if attrs["kind"] == "level" else attrs.get("level")


def frequency_ranks(g: "nx.DiGraph", levels: dict[str, M.Level]) -> dict[str, int]:
    """Each level's rank in the paper's order (section 3.2), 0 the fastest: by frequency
    (:func:`speed_key`), and among levels of one frequency A before B when B's state at time t
    needs A's (an edge of :data:`DEPENDENCY_KINDS` from A's level to B's, self-referential
    generation aside). Same-frequency levels that need nothing of each other (the paper's
    A =_f B, like Adam's two moments) share a rank, and so do the levels of a same-frequency
    cycle (an error, NL106, but the graph still renders)."""
    import networkx as nx

    needs = nx.DiGraph()
    needs.add_nodes_from(levels)
    for a, b, attrs in g.edges(data=True):
        la, lb = _level_of(g.nodes[a]), _level_of(g.nodes[b])
        if (attrs["kind"] in DEPENDENCY_KINDS and not attrs.get("self_referential") and la in levels
                and lb in levels and la != lb and speed_key(levels[la]) == speed_key(levels[lb])):
            needs.add_edge(la, lb)
    parts = nx.condensation(needs)
    depth: dict[int, int] = {}
    for c in nx.topological_sort(parts):
        depth[c] = max((depth[p] + 1 for p in parts.predecessors(c)), default=0)
    of = parts.graph["mapping"]
    rank, offset = {}, 0
    for key in sorted({speed_key(lv) for lv in levels.values()}):
        group = [n for n, lv in levels.items() if speed_key(lv) == key]
        for n in group:
            rank[n] = offset + depth[of[n]]
        offset += 1 + max(depth[of[n]] for n in group)
    return rank


def block_flow_edges(owner: M.Model) -> list[tuple[str, str]]:
    """The memory nodes the block feeds one into another (:func:`block_flow`); a CMS chain takes
    its input at its first block and gives its output from its last (an independent chain: every
    block does both)."""
    cms_names = {c.name: c for c in owner.cms}
    mem_names = {m.name for m in owner.memories}

    def ends(name: str) -> tuple[list[str], list[str]]:
        if name in mem_names:
            return [memory_node(name)], [memory_node(name)]
        c = cms_names.get(name)
        if c is None:
            return [], []
        nodes = [memory_node(m.name) for m in c.memories]
        return (nodes, nodes) if c.variant == "independent" else (nodes[:1], nodes[-1:])

    return block_flow(owner.block, ends)


def block_flow(value, ends) -> list[tuple[str, str]]:
    """The data-flow edges of a block expression, in order: along ``->`` the outputs of each
    stage feed the inputs of the next; the arguments of any other operator or call (a sum, a
    gate, ``residual(...)``) read the same input side by side. ``ends(name)`` gives a name's
    (input nodes, output nodes); names that are no memory give none."""
    edges: list[tuple[str, str]] = []

    def visit(v) -> tuple[list[str], list[str]]:
        if isinstance(v, M.Ref):
            return ends(v.name)
        if isinstance(v, M.Call):
            args = [*v.args, *(a for _, a in v.kwargs)]
        elif isinstance(v, M.Op):
            args = list(v.args)
        else:  # a literal
            return [], []
        parts = [visit(a) for a in args]
        if isinstance(v, M.Op) and v.op == "->":
            parts = [p for p in parts if p[0]]
            for (_, outs), (ins, _) in zip(parts, parts[1:]):
                edges.extend((a, b) for a in outs for b in ins)
            return (parts[0][0], parts[-1][1]) if parts else ([], [])
        return [n for p in parts for n in p[0]], [n for p in parts for n in p[1]]

    if value is not None:
        visit(value)
    return list(dict.fromkeys(edges))


def endpoint_nodes(owner: M.Model, name: str) -> list[str]:
    """The graph nodes a transfer endpoint names: a level, a memory, or every block of a CMS."""
    if any(lv.name == name for lv in owner.levels):
        return [level_node(name)]
    if any(m.name == name for m in owner.memories):
        return [memory_node(name)]
    for c in owner.cms:
        if c.name == name:
            return [memory_node(m.name) for m in c.memories]
    return []
