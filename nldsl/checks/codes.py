"""The rule table: every diagnostic code, what it means, and a wrong and a right example.

Codes are stable: a code is never reused for another rule. ``nldsl explain CODE`` prints an
entry; ``docs/diagnostics.md`` is generated from this table (a test keeps them in sync), and a
test checks that each wrong example raises its code and each right example checks clean.
"""
from __future__ import annotations

from dataclasses import dataclass

_HEAD = "  vocab = 256; dim = 64; layers = 2; context = 64\n"


def _model(body: str, head: str = _HEAD) -> str:
    return "model Tiny {\n" + head + body.rstrip() + "\n}\n"


_BASE = ("  level outer : steps every 1\n"
         "  level fast : tokens every 16\n")
_BLOCK = "  block = residual(norm -> mem)\n"


@dataclass(frozen=True)
class Code:
    code: str
    severity: str
    title: str
    explanation: str
    wrong: str | None
    right: str | None

    @property
    def group(self) -> str:
        return {"0": "Syntax and names", "1": "Levels and frequencies",
                "2": "Memories: structure, objective, rule", "3": "Models, optimizers, ablations",
                "4": "Compiler"}[self.code[2]]


_TABLE = [
    Code("NL001", "error", "syntax error",
         "The text does not follow the grammar. The message names what the parser expected at the "
         "caret; statements end at a newline or `;`, bodies are enclosed in `{ }`.",
         _model(_BASE.replace("fast : tokens", "fast tokens") + "  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL002", "error", "file is not UTF-8 text",
         "Spec files are UTF-8 text. A file with bytes that are not UTF-8 (a binary file, or text "
         "saved in another encoding) is refused at the first such byte.",
         None, None),
    Code("NL003", "error", "include cannot be resolved",
         "`include \"file.nl\"` names a spec file relative to the including file. The file must "
         "exist, parse and check, and includes must not form a cycle.",
         'include "no_such_file.nl"\n' + _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL004", "error", "defined twice",
         "Each model, optimizer, level, memory, CMS chain and ablation name is defined once in its scope.",
         _model(_BASE + "  level fast : tokens every 32\n  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  level slow : tokens every 32\n  memory mem in fast : linear\n"
                "  memory big in slow : linear\n  block = residual(norm -> mem) -> residual(norm -> big)\n")),
    Code("NL005", "error", "unknown property or argument",
         "The name is not a property of this construct (or an argument of this call). The help line "
         "suggests the closest valid name.",
         _model(_BASE + "  memory mem in fast : linear { objectve l2 }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { objective l2 }\n" + _BLOCK)),
    Code("NL006", "error", "invalid value",
         "The value has the wrong kind, or is not one of the choices this property accepts.",
         _model(_BASE + "  memory mem in fast : linear { objective l3 }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { objective l2 }\n" + _BLOCK)),
    Code("NL007", "error", "set twice",
         "A property, parameter or mode is given twice; only one value can hold.",
         _model(_BASE + "  memory mem in fast : linear { objective l2; objective dot }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { objective dot }\n" + _BLOCK)),
    Code("NL008", "error", "number out of range",
         "The number is not finite or does not fit (integers are at most 2**31 - 1).",
         _model(_BASE.replace("every 16", "every 1e999") + "  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL009", "error", "reserved name",
         "Spec names become Python identifiers in generated code. Names starting with `_` and Python "
         "keywords are refused so that no spec text can reach generated code unsanitized.",
         _model(_BASE + "  memory __import__ in fast : linear\n" + _BLOCK.replace("mem", "__import__")),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL010", "error", "nested too deeply",
         "Brackets nest at most 64 levels deep and expressions cannot be arbitrarily long; a spec "
         "never needs more.",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK, _HEAD + "  scale = " + "(" * 70 + "1"
                + ")" * 70 + "\n"),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK, _HEAD + "  scale = 1\n")),

    Code("NL101", "error", "unknown level",
         "A memory, a CMS chain or a `generators` property names a level the model does not define.",
         _model(_BASE + "  memory mem in fats : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL102", "error", "period is not a positive integer",
         "A level updates every `period` units of its clock (frequency 1/period); the period must be "
         "a whole number >= 1.",
         _model(_BASE.replace("every 16", "every 0") + "  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL103", "error", "unknown clock",
         "A level counts time in `tokens` (positions of a context flow: in-context levels) or "
         "`steps` (outer optimizer steps: pre-training and optimizer levels).",
         _model(_BASE.replace("fast : tokens", "fast : token") + "  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL104", "error", "initialization transfer must come from a strictly slower level",
         "`transfer A -> B : init` means level A meta-learns the initial state of B (paper Eq. 28). "
         "Only a level that updates less often than B can do so: its context spans many of B's.",
         _model(_BASE + "  level slow : tokens every 64\n  memory mem in fast : linear\n"
                "  memory big in slow : linear\n  transfer fast -> slow : init\n"
                "  block = residual(norm -> mem) -> residual(norm -> big)\n"),
         _model(_BASE + "  level slow : tokens every 64\n  memory mem in fast : linear\n"
                "  memory big in slow : linear\n  transfer slow -> fast : init\n"
                "  block = residual(norm -> mem) -> residual(norm -> big)\n")),
    Code("NL105", "error", "generation must come from a slower level, or be self-referential",
         "`transfer A -> B : generate` means A generates B's weights or context (a hypernetwork). A "
         "faster level cannot generate a slower one; the same level can only when declared "
         "self-referential with `generate(self=true)`.",
         _model(_BASE + "  memory mem in fast : linear\n  transfer fast -> fast : generate\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n  transfer fast -> fast : generate(self=true)\n"
                + _BLOCK)),
    Code("NL106", "error", "same-frequency dependency cycle",
         "Two components at the same frequency depend on each other's state at the same time, so "
         "neither can be computed first (paper Def. 2 orders them only when one needs the other). "
         "Dependencies are the `condition`, `context` and `generate` transfers (a level's stand for "
         "the memories it holds) and the block's data flow (in `a -> b`, b reads a's output). "
         "Break the cycle, or declare the generation self-referential.",
         _model(_BASE + "  memory a in fast : linear\n  memory b in fast : linear\n"
                "  transfer a -> b : condition\n  transfer b -> a : condition\n"
                "  block = residual(norm -> a) -> residual(norm -> b)\n"),
         _model(_BASE + "  memory a in fast : linear\n  memory b in fast : linear\n"
                "  transfer a -> b : condition\n"
                "  block = residual(norm -> a) -> residual(norm -> b)\n")),
    Code("NL107", "error", "CMS period does not divide the next slower period",
         "In a CMS chain each level's chunk C(l) = C_max / f_l must be a whole number of the faster "
         "level's chunks, so every period divides the next slower one.",
         _model("  level cms1 : tokens every 16\n  level cms2 : tokens every 24\n"
                "  cms mem : sequential { levels cms1, cms2 }\n" + _BLOCK),
         _model("  level cms1 : tokens every 16\n  level cms2 : tokens every 32\n"
                "  cms mem : sequential { levels cms1, cms2 }\n" + _BLOCK)),
    Code("NL108", "error", "context is not a multiple of a token period",
         "With `partial = strict` (the default) the training context must split into whole chunks "
         "of every token level. Set `partial = carry` to carry a partial chunk in the state to the "
         "next call, or `partial = flush` to update on it at the end of the sequence.",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK,
                "  vocab = 256; dim = 64; layers = 2; context = 100\n"),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK,
                "  vocab = 256; dim = 64; layers = 2; context = 100; partial = carry\n")),
    Code("NL109", "warning", "token level never updates inside a sequence",
         "The level's period is longer than the training context and its state resets with each "
         "sequence, so it never updates. Mark it `carry` to keep its state across calls.",
         _model("  level slow : tokens every 4096\n  memory mem in slow : linear\n" + _BLOCK),
         _model("  level slow : tokens every 4096 carry\n  memory mem in slow : linear\n" + _BLOCK)),
    Code("NL110", "error", "transfer endpoint is not defined",
         "Both ends of a transfer must be a level or a memory of the model.",
         _model(_BASE + "  memory mem in fast : linear\n  transfer outer -> fsat : init\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n  transfer outer -> fast : init\n" + _BLOCK)),
    Code("NL111", "error", "backprop transfer through detached writes",
         "`transfer A -> B : backprop` puts A and B in one gradient flow (paper section 3.3). That "
         "needs B's in-context writes to be differentiable; `writes detached` cuts the path.",
         _model(_BASE + "  memory mem in fast : linear { writes detached }\n"
                "  transfer outer -> mem : backprop\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { writes differentiable }\n"
                "  transfer outer -> mem : backprop\n" + _BLOCK)),
    Code("NL112", "warning", "level holds no memory",
         "A token-clock level with no memory (and no CMS chain through it) updates nothing.",
         _model(_BASE + "  level idle : tokens every 8\n  memory mem in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL113", "error", "CMS levels must be token levels listed fast to slow",
         "A CMS chain lists its levels from the highest frequency to the lowest (paper Fig. 5); all "
         "of them count tokens.",
         _model("  level cms1 : tokens every 16\n  level cms2 : tokens every 64\n"
                "  cms mem : sequential { levels cms2, cms1 }\n" + _BLOCK),
         _model("  level cms1 : tokens every 16\n  level cms2 : tokens every 64\n"
                "  cms mem : sequential { levels cms1, cms2 }\n" + _BLOCK)),
    Code("NL114", "error", "token-clock level inside an optimizer",
         "An optimizer's memories compress the gradient stream, which advances once per outer "
         "step: its levels count `steps`.",
         "optimizer Sgd {\n  lr = 0.1\n  level step : tokens every 1\n"
         "  memory m in step : elementwise { objective dot }\n  update = m\n}\n",
         "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : elementwise { objective dot }\n  update = m\n}\n"),
    Code("NL115", "error", "meta-learned initial state without an init transfer",
         "`init meta` says a slower level learns this memory's initial state; declare which one "
         "with `transfer SLOWER -> LEVEL : init`.",
         _model(_BASE + "  memory mem in fast : linear { init meta }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { init meta }\n  transfer outer -> fast : init\n"
                + _BLOCK)),

    Code("NL201", "error", "property does not apply to this memory",
         "Attention is a non-parametric memory: it has no objective, rule, learning rate or "
         "retention. An optimizer memory compresses the gradient stream, so it cannot be "
         "attention, and `aggregate` applies to independent CMS chains only.",
         _model(_BASE + "  memory mem in fast : attention { objective l2 }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : attention\n" + _BLOCK)),
    Code("NL202", "error", "rule does not fit the memory's structure",
         "Delta gradient descent erases along the key (W (alpha I - eta k k^T)) and Newton-Schulz "
         "orthogonalises a matrix: both need a `linear` or `mlp` memory, not an `elementwise` one. "
         "A CMS chain is built from `mlp` blocks.",
         "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : elementwise { objective dot; precondition newton_schulz }\n  update = m\n}\n",
         "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : linear { objective dot; precondition newton_schulz }\n  update = m\n}\n"),
    Code("NL203", "error", "rule does not fit the objective",
         "Delta gradient descent is the closed-form step of an L2 regression with a proximal term "
         "(paper Eq. 56-57); it applies to the `l2` and `dot` objectives only. The gd and Omega "
         "rules take every objective (the Omega rule sums its gradient over the window's inputs).",
         _model(_BASE + "  memory mem in fast : linear { objective l1; rule dgd }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { objective l2; rule dgd }\n" + _BLOCK)),
    Code("NL204", "error", "dimensions do not agree",
         "`dim` must split evenly across `heads`, MLP depth is at least 1, expansions, windows and "
         "convolution widths are positive.",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK,
                "  vocab = 256; dim = 64; heads = 5; layers = 2; context = 64\n"),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK,
                "  vocab = 256; dim = 64; heads = 4; layers = 2; context = 64\n")),

    Code("NL205", "error", "memory needs a key",
         "An optimizer memory with a `key` learns to map the key to its `input` (the value). An `mlp` "
         "memory is such a map (deep momentum, Eq. 50: it is trained on the gradient u and read at "
         "`m(grad)`), and `rule dgd` erases along the key (delta momentum, Eq. 48-49): both need "
         "`key EXPR`.",
         "optimizer Deep {\n  lr = 0.01\n  level step : steps every 1\n"
         "  memory m in step : mlp(depth=2) { input 1; objective dot }\n  update = lr * m(grad)\n}\n",
         "optimizer Deep {\n  lr = 0.01\n  level step : steps every 1\n"
         "  memory m in step : mlp(depth=2) { key grad; input 1; objective dot }\n  update = lr * m(grad)\n}\n"),
    Code("NL206", "warning", "constant outside its range",
         "A constant `retention` or `momentum` is the fraction of the state kept per update: above 1 "
         "the state grows without bound, below 0 it flips sign every update. A constant `lr` below "
         "0 climbs the objective instead of descending it (0 turns learning off).",
         _model(_BASE + "  memory mem in fast : linear { retention constant(1.2) }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { retention constant(0.98) }\n" + _BLOCK)),

    Code("NL301", "error", "block uses an unknown name",
         "A block composes the model's memories and CMS chains with builtins (`norm`, `rmsnorm`, "
         "`layernorm`, `mlp`, `swiglu`, `identity`) and combinators (`residual(...)`, `sum(...)`, "
         "`gate(...)`), joined by `->`.",
         _model(_BASE + "  memory mem in fast : linear\n  block = residual(norm -> mme)\n"),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL302", "warning", "memory is not used by the block",
         "The memory is defined but the block never applies it, so it does nothing.",
         _model(_BASE + "  memory mem in fast : linear\n  memory spare in fast : linear\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL303", "error", "missing required setting",
         "A model sets `vocab`, `dim`, `layers` and `context` and has a `block`; an optimizer has an "
         "`update`.",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK, "  vocab = 256; dim = 64; layers = 2\n"),
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK)),
    Code("NL304", "error", "unknown optimizer",
         "`optimizer = NAME` names an optimizer defined in this file or an included one; "
         "`optimizer = \"file.nl\"` names a spec file holding one optimizer.",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK + "  optimizer = Sgdd\n")
         + "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : elementwise { objective dot }\n  update = m\n}\n",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK + "  optimizer = Sgd\n")
         + "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : elementwise { objective dot }\n  update = m\n}\n"),
    Code("NL305", "error", "ablation edit does not match the spec",
         "An ablation edits the spec by path: `memory.property`, `level.every`, `param`, "
         "`memory.inputs.k`, `block`. `path = value` changes what is set, `+path = value` adds what "
         "is not, `~path` removes. A path that matches nothing is an error.",
         _model(_BASE + "  memory mem in fast : linear { objective l2 }\n" + _BLOCK)
         + "ablation hebbian { mem.objectve = dot }\n",
         _model(_BASE + "  memory mem in fast : linear { objective l2 }\n" + _BLOCK)
         + "ablation hebbian { mem.objective = dot }\n"),
    Code("NL306", "error", "ablation variant does not check",
         "Every named ablation is applied and the variant is checked in full; its own diagnostics "
         "are listed as notes.",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK) + "ablation bad { fast.every = 0 }\n",
         _model(_BASE + "  memory mem in fast : linear\n" + _BLOCK) + "ablation slower { fast.every = 32 }\n"),
    Code("NL307", "error", "optimizer expression uses an unknown name",
         "Optimizer expressions may use the optimizer's parameters and memories, `grad`, `param`, "
         "`step`, `rows`, `cols`, the functions `sqrt`, `abs`, `sign`, `newton_schulz`, `max`, `min`, "
         "`clamp`, `where`, and a memory applied to a query (`m(grad)`).",
         "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : elementwise { objective dot }\n  update = mm\n}\n",
         "optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n"
         "  memory m in step : elementwise { objective dot }\n  update = m\n}\n"),
    Code("NL308", "error", "memory read does not fit its structure",
         "An optimizer expression reads a memory by name (its state: an `elementwise` or `linear` "
         "memory is shaped like the parameter) or applies it to one query, `m(q)` (an `elementwise` "
         "memory gives m * q, an `mlp` memory its output at q). An `mlp` memory's state is its "
         "weights, so it is only read applied; a `linear` memory applied to a query would give a "
         "rows x rows matrix, so it is only read by name.",
         "optimizer Deep {\n  lr = 0.01\n  level step : steps every 1\n"
         "  memory m in step : mlp(depth=2) { key grad; input 1; objective dot }\n  update = lr * m\n}\n",
         "optimizer Deep {\n  lr = 0.01\n  level step : steps every 1\n"
         "  memory m in step : mlp(depth=2) { key grad; input 1; objective dot }\n  update = lr * m(grad)\n}\n"),
    Code("NL309", "error", "parameter defined in terms of itself",
         "A parameter's value may use other parameters (in an optimizer, also ones defined below "
         "it: they are computed every step in the order they need), but not itself, directly or "
         "through others: such a value has nothing to start from.",
         "optimizer Sgd {\n  lr = 0.1\n  g = h + grad\n  h = g * param\n  level step : steps every 1\n"
         "  memory m in step : elementwise { input g; objective dot }\n  update = lr * m\n}\n",
         "optimizer Sgd {\n  lr = 0.1\n  g = h + grad\n  h = 0.01 * param\n  level step : steps every 1\n"
         "  memory m in step : elementwise { input g; objective dot }\n  update = lr * m\n}\n"),

    Code("NL401", "error", "the compiler cannot build this yet",
         "The spec is valid, but the code generator has no implementation for this combination "
         "(for example delta momentum on an in-context memory). `nldsl compile` reports it at the spec's "
         "text before any code runs, and `nldsl ablate` for each variant it would refuse; `nldsl check` "
         "does not.",
         _model(_BASE + "  memory mem in fast : linear { objective l1; momentum delta }\n" + _BLOCK),
         _model(_BASE + "  memory mem in fast : linear { objective l1; momentum gate }\n" + _BLOCK)),
]

CODES: dict[str, Code] = {c.code: c for c in _TABLE}


def explain(code: str) -> str:
    c = CODES[code]
    lines = [f"{c.code} ({c.severity}): {c.title}", "", c.explanation]
    if c.wrong is not None:
        lines += ["", "Wrong:", "", *("    " + ln for ln in c.wrong.rstrip("\n").split("\n"))]
    if c.right is not None:
        lines += ["", "Right:", "", *("    " + ln for ln in c.right.rstrip("\n").split("\n"))]
    return "\n".join(lines)
