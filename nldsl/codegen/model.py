"""Models: registers the ``model`` block kind of the code generator.

:mod:`nldsl.codegen.model_plan` decides everything (runtime layer per memory, constructor
arguments, the block's forward lines); ``codegen_templates/model.py.j2`` lays it out as an
:class:`~nldsl.nn.model.NSAMModel` subclass and its block class.
"""
from __future__ import annotations

from nldsl.codegen import BlockKind, SpecContext, register_block_kind
from nldsl.codegen.model_plan import Planner, Unsupported
from nldsl.codegen.render import docstring
from nldsl.diagnostics import SpecError

STANDARD = ("vocab", "dim", "heads", "layers", "context")


def _plan(model, ctx: SpecContext) -> dict:
    try:
        plan = Planner(model, ctx.spans, ctx.file, ctx.label).plan()
    except Unsupported as e:
        raise SpecError(e.diagnostics, ctx.sources) from None
    lines = [f"{plan.class_name}, compiled from {ctx.label}."]
    if plan.doc:
        lines += ["", plan.doc]
    lines += ["", "Levels, fastest first:"]
    for n, c, p, s, _, holds in plan.levels:
        what = ", ".join(holds) or ("no memory" + (" (the outer optimizer's clock)" if c == "steps" else ""))
        lines.append(f"    {n}: {c} every {p}" + (", carries across calls" if s == "carry" else "") + f": {what}")
    lines += ["", "``model(input_ids, state=None) -> ModelOutput(logits, state)``; pass ``state`` back to",
              "continue the stream. Keyword arguments override the spec's values."]
    plan.extra = [(n, d) for n, d in plan.params if n not in STANDARD]
    return {"name": plan.class_name, "plan": plan, "doc": docstring("\n".join(lines), "    "),
            "spec_hash": ctx.sha256, "resolved_hash": ctx.resolved_sha256, "defaults": {}}


register_block_kind(BlockKind(
    name="model", blocks=lambda ir: ir.models, plan=_plan, template="model.py.j2",
    imports=("import torch", "from torch import nn",
             "from nldsl.nn.layers import MLP, SwiGLU, make_norm",
             "from nldsl.nn.deep import CmsChain, DeepMemory, SelfModifyingTitans",
             "from nldsl.nn.memories import AttentionMemory, LinearMemory",
             "from nldsl.nn.model import Config, LevelInfo, NSAMModel")))
