"""The level graph: a ``networkx.DiGraph`` view of one model or optimizer.

Nodes are ``level:NAME`` and ``memory:NAME`` (with clock, period, frequency and rank, where
rank 0 is the fastest level). Edges carry a ``kind``:

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
    rank = {}
    for lv in ranked:
        rank[lv.name] = len({speed_key(x) for x in ranked if speed_key(x) < speed_key(lv)})
    for lv in owner.levels:
        g.add_node(level_node(lv.name), kind="level", name=lv.name, clock=lv.clock, period=lv.period,
                   frequency=lv.frequency, scope=lv.scope, read=lv.read, rank=rank[lv.name])

    def add_memory(mem: M.Memory, node: str | None = None, **extra):
        node = node or memory_node(mem.name)
        lv = levels.get(mem.level)
        attrs = dict(kind="memory", name=mem.name, level=mem.level, structure=mem.structure.kind,
                     objective=mem.objective.kind if mem.objective else None,
                     rule=mem.rule.kind if mem.rule else None)
        if lv is not None:
            attrs.update(clock=lv.clock, period=lv.period, frequency=lv.frequency, rank=rank[lv.name])
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
        # data flow in the block: memories and CMS chains in the order the block applies them
        used = []
        cms_names = {c.name: c for c in owner.cms}
        mem_names = {m.name for m in owner.memories}
        for name in block_names(owner.block):
            if name in mem_names:
                used.append([memory_node(name)])
            elif name in cms_names:
                used.append([memory_node(m.name) for m in cms_names[name].memories])
        for prev, nxt in zip(used, used[1:]):
            if prev and nxt and not g.has_edge(prev[-1], nxt[0]):
                g.add_edge(prev[-1], nxt[0], kind="flow", implied=True)
    return g


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
