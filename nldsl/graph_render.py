"""Drawing the level graph: DOT and Mermaid text (deterministic), and PNG via matplotlib.

Levels are laid out by frequency like the paper's figures: the fastest level on top, the
outer (step-clock) levels at the bottom. PNG needs no system Graphviz.
"""
from __future__ import annotations

import io

import networkx as nx

EDGE_STYLE = {  # kind -> (DOT style, colour)
    "holds": ("dotted", "gray50"), "flow": ("solid", "black"), "condition": ("solid", "royalblue"),
    "context": ("dashed", "royalblue"), "backprop": ("bold", "firebrick"), "init": ("dashed", "darkgreen"),
    "generate": ("bold", "darkorange"),
}


def _label(g: nx.DiGraph, n: str) -> str:
    a = g.nodes[n]
    if a["kind"] == "level":
        return f"{a['name']}\n{a['clock']} every {a['period']}" + (" (carry)" if a.get("scope") == "carry" else "")
    parts = [a["name"], a["structure"]]
    if a.get("objective"):
        parts.append(f"{a['objective']} / {a['rule']}")
    return "\n".join(parts)


def _sorted_nodes(g: nx.DiGraph) -> list[str]:
    return sorted(g.nodes, key=lambda n: (g.nodes[n].get("rank", 99), g.nodes[n]["kind"] != "level", n))


def _sorted_edges(g: nx.DiGraph):
    return sorted(g.edges(data=True), key=lambda e: (e[0], e[1], e[2].get("kind", "")))


def _dot_id(n: str) -> str:
    return '"' + n.replace('"', '\\"') + '"'


def to_dot(g: nx.DiGraph) -> str:
    lines = [f"digraph {_dot_id(g.graph.get('name', 'spec'))} {{", "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=10];', '  edge [fontname="Helvetica", fontsize=9];']
    ranks: dict[int, list[str]] = {}
    for n in _sorted_nodes(g):
        a = g.nodes[n]
        shape = "box" if a["kind"] == "level" else "ellipse"
        style = ', style="rounded,filled", fillcolor="#eef3fb"' if a["kind"] == "level" else ""
        label = _label(g, n).replace("\n", "\\n").replace('"', '\\"')
        lines.append(f'  {_dot_id(n)} [label="{label}", shape={shape}{style}];')
        ranks.setdefault(a.get("rank", 99), []).append(n)
    for r in sorted(ranks):
        lines.append("  { rank=same; " + " ".join(_dot_id(n) for n in ranks[r]) + "; }")
    for u, v, d in _sorted_edges(g):
        kind = d.get("kind", "")
        style, color = EDGE_STYLE.get(kind, ("solid", "black"))
        label = "" if kind in ("holds", "flow") else kind + (" (self)" if d.get("self_referential") else "")
        if d.get("input"):
            label = f"{label} {d['input']}".strip()
        lines.append(f'  {_dot_id(u)} -> {_dot_id(v)} [style={style}, color={color}'
                     + (f', label="{label}"' if label else "") + "];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mm_id(n: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in n)


def to_mermaid(g: nx.DiGraph) -> str:
    lines = ["flowchart TB"]
    by_rank: dict[int, list[str]] = {}
    for n in _sorted_nodes(g):
        by_rank.setdefault(g.nodes[n].get("rank", 99), []).append(n)
    for r in sorted(by_rank):
        lines.append(f'  subgraph rank{r}["frequency rank {r}"]')
        for n in by_rank[r]:
            label = _label(g, n).replace("\n", "<br/>").replace('"', "'")
            shape = ('["', '"]') if g.nodes[n]["kind"] == "level" else ('(["', '"])')
            lines.append(f"    {_mm_id(n)}{shape[0]}{label}{shape[1]}")
        lines.append("  end")
    for u, v, d in _sorted_edges(g):
        kind = d.get("kind", "")
        arrows = {"holds": "-.-", "init": "-.->", "context": "-.->", "backprop": "==>", "generate": "==>"}
        arrow = arrows.get(kind, "-->")
        label = "" if kind in ("holds", "flow") else kind + (" self" if d.get("self_referential") else "")
        lines.append(f"  {_mm_id(u)} {arrow}" + (f"|{label}|" if label else "") + f" {_mm_id(v)}")
    return "\n".join(lines) + "\n"


def layout(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Rows by frequency rank (fastest on top); in a row, each level then the memories it holds."""
    rows: dict[int, list[str]] = {}
    placed: set[str] = set()
    for n in _sorted_nodes(g):
        if g.nodes[n]["kind"] != "level":
            continue
        row = rows.setdefault(g.nodes[n].get("rank", 99), [])
        row.append(n)
        held = sorted(v for _, v, d in g.out_edges(n, data=True) if d.get("kind") == "holds")
        row.extend(held)
        placed.update([n, *held])
    for n in _sorted_nodes(g):
        if n not in placed:
            rows.setdefault(g.nodes[n].get("rank", 99), []).append(n)
    pos = {}
    for row, r in enumerate(sorted(rows)):
        names = rows[r]
        for i, n in enumerate(names):
            pos[n] = (i - (len(names) - 1) / 2.0, -row)
    return pos


def to_png(g: nx.DiGraph) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    pos = layout(g)
    width = max([abs(x) for x, _ in pos.values()] + [1]) * 2 + 2
    height = max([-y for _, y in pos.values()] + [0]) + 1.5
    fig, ax = plt.subplots(figsize=(max(6.0, width * 2.4), max(3.0, height * 1.6)))
    ax.set_axis_off()
    for row_y in sorted({y for _, y in pos.values()}):  # one band per frequency
        ax.axhspan(row_y - 0.32, row_y + 0.32, color="#f4f6fa" if int(row_y) % 2 else "#fbfbfd", zorder=0)
    for u, v, d in _sorted_edges(g):
        kind = d.get("kind", "")
        if kind == "holds":  # membership is shown by placing memories beside their level
            continue
        style, color = EDGE_STYLE.get(kind, ("solid", "black"))
        color = {"gray50": "#888888"}.get(color, color)
        ls = {"dotted": ":", "dashed": "--"}.get(style, "-")
        lw = 2.0 if style == "bold" else 1.0
        if u == v:
            x, y = pos[u]
            ax.annotate("", xy=(x + 0.15, y + 0.18), xytext=(x - 0.15, y + 0.18),
                        arrowprops=dict(arrowstyle="->", color=color, lw=lw, connectionstyle="arc3,rad=-1.2"))
            continue
        arrow = FancyArrowPatch(pos[u], pos[v], arrowstyle="-|>", mutation_scale=12, color=color, lw=lw,
                                linestyle=ls, connectionstyle="arc3,rad=0.12", shrinkA=28, shrinkB=28)
        ax.add_patch(arrow)
        if kind not in ("holds", "flow"):
            (x1, y1), (x2, y2) = pos[u], pos[v]
            ax.text((x1 + x2) / 2, (y1 + y2) / 2, kind, fontsize=7, color=color, ha="center",
                    va="center", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    for n, (x, y) in pos.items():
        a = g.nodes[n]
        box = dict(boxstyle="round,pad=0.4", fc="#eef3fb", ec="#4a6fa5") if a["kind"] == "level" else \
            dict(boxstyle="round,pad=0.35", fc="#fff5e6", ec="#c98a2b")
        ax.text(x, y, _label(g, n), ha="center", va="center", fontsize=8, bbox=box)
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.set_title(f"{g.graph.get('kind', 'spec')} {g.graph.get('name', '')}: fast (top) to slow (bottom)",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
