"""Level-frequency semantics and the checker, beyond the one-spec-per-code goldens; ablations."""
from __future__ import annotations

import pytest

import nldsl
from nldsl import ablate
from nldsl.graph import build, speed_key
from nldsl.ir import models as M
from nldsl.ir.resolved import resolved_tree
from nldsl.spec import analyze_ast, analyze_text
from nldsl.syntax import ast as A
from nldsl.syntax.parser import parse
from nldsl.syntax.printer import format_file
from tests.nltest_support import REPO


def model(body: str, *, context: int = 512, extra: str = "") -> str:
    """A model with an outer step level; ``body`` adds levels, memories, transfers and the block."""
    return ("model T {\n  vocab = 256\n  dim = 128\n  layers = 2\n"
            f"  context = {context}\n{extra}  level outer : steps every 1\n{body}}}\n")


def codes(text: str) -> list[str]:
    return [d.code for d in analyze_text(text, "t.nl").diagnostics]


def errors(text: str) -> list[str]:
    return [d.code for d in analyze_text(text, "t.nl").diagnostics if d.is_error]


def ir_of(text: str) -> M.Model:
    a = analyze_text(text, "t.nl")
    return a.ir.models[0]


TWO = ("  level fast : tokens every 16\n  level slow : tokens every 64\n"
       "  memory a in fast : linear\n  memory b in slow : linear\n")
BLOCK_AB = "  block = residual(norm -> a) -> residual(norm -> b)\n"


# ---- frequency ordering -----------------------------------------------------------------------


def test_steps_are_slower_than_tokens_and_larger_periods_slower():
    m = ir_of(model("  level fast : tokens every 1\n  level mid : tokens every 64\n"
                    "  level huge : tokens every 4096 carry\n  level sgd : steps every 8\n"
                    "  memory a in fast : linear\n  memory b in mid : linear\n  memory c in huge : linear\n"
                    "  block = a -> b -> c\n"))
    order = [lv.name for lv in sorted(m.levels, key=speed_key)]
    assert order == ["fast", "mid", "huge", "outer", "sgd"]  # tokens before steps, then by period
    g = build(m)
    rank = {n: g.nodes[f"level:{n}"]["rank"] for n in order}
    assert rank["fast"] < rank["mid"] < rank["huge"] < rank["outer"] < rank["sgd"]
    # a steps level every 1 is still slower than a token level every 4096
    assert speed_key(next(lv for lv in m.levels if lv.name == "outer")) > \
        speed_key(next(lv for lv in m.levels if lv.name == "huge"))


def ranks(body: str) -> dict:
    g = build(ir_of(model(body)))
    return {a["name"]: a["rank"] for _, a in g.nodes(data=True) if a["kind"] == "level"}


def test_same_frequency_levels_order_by_dependency():
    # the paper's A > B at f_A = f_B: B's state at time t needs A's (here b reads a's output)
    r = ranks("  level a1 : tokens every 16\n  level a2 : tokens every 16\n  level slow : tokens every 64\n"
              "  memory a in a1 : linear\n  memory b in a2 : linear\n  memory c in slow : linear\n"
              "  block = b -> c\n  transfer a1 -> a2 : condition\n")
    assert (r["a1"], r["a2"], r["slow"], r["outer"]) == (0, 1, 2, 3)
    # the block's data flow is a dependency too, whichever order the levels are declared in
    r = ranks("  level a2 : tokens every 16\n  level a1 : tokens every 16\n"
              "  memory a in a1 : linear\n  memory b in a2 : linear\n  block = a -> b\n")
    assert (r["a1"], r["a2"], r["outer"]) == (0, 1, 2)
    # the memories a level holds carry its rank
    g = build(ir_of(model("  level a1 : tokens every 16\n  level a2 : tokens every 16\n"
                          "  memory a in a1 : linear\n  memory b in a2 : linear\n  block = a -> b\n")))
    assert g.nodes["memory:a"]["rank"] == 0 and g.nodes["memory:b"]["rank"] == 1


def test_independent_same_frequency_levels_share_a_rank():
    # A =_f B (the paper's Adam moments): no dependency either way, one rank; only non-self
    # dependencies order levels
    r = ranks("  level a1 : tokens every 16\n  level a2 : tokens every 16\n"
              "  memory a in a1 : linear\n  memory b in a2 : linear\n  block = a + b\n")
    assert r["a1"] == r["a2"] == 0 and r["outer"] == 1
    r = ranks("  level a1 : tokens every 16\n  level a2 : tokens every 16\n"
              "  memory a in a1 : linear\n  memory b in a2 : linear\n  block = a + b\n"
              "  transfer a1 -> a1 : generate(self=true)\n  transfer outer -> a2 : init\n")
    assert r["a1"] == r["a2"] == 0


def test_block_flow_follows_the_block_operators():
    g = build(ir_of(model("  level fast : tokens every 16\n  memory a in fast : linear\n"
                          "  memory b in fast : linear\n  memory c in fast : linear\n"
                          "  memory d in fast : linear\n  block = residual(norm -> a) -> (b + c) -> d\n")))
    flow = sorted((a[7:], b[7:]) for a, b, k in g.edges(data="kind") if k == "flow")
    assert flow == [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]  # b and c side by side


def test_hope_levels_rank_as_the_paper_orders_them():
    g = nldsl.load(REPO / "specs" / "hope.nl").level_graph()
    rank = {a["name"]: a["rank"] for _, a in g.nodes(data=True) if a["kind"] == "level"}
    # fast (M_memory) and cms1 both update every 32 tokens; the chain reads the Titans output
    assert sorted(rank, key=rank.get) == ["gen", "fast", "cms1", "cms2", "cms3", "pretrain"]
    assert sorted(rank.values()) == list(range(6))


# ---- initialization and generation transfers ----------------------------------------------------


@pytest.mark.parametrize("transfer, expected", [
    pytest.param("outer -> fast : init", [], id="steps-to-tokens"),
    pytest.param("slow -> fast : init", [], id="slower-to-faster"),
    pytest.param("slow -> a : init", [], id="slower-level-to-memory"),
    pytest.param("b -> a : init", [], id="slower-memory-to-faster-memory"),
    pytest.param("fast -> slow : init", ["NL104"], id="faster-to-slower"),
    pytest.param("fast -> fast : init", ["NL104"], id="same-level"),
    pytest.param("a -> fast : init", ["NL104"], id="memory-to-its-own-level"),
    pytest.param("fast -> outer : init", ["NL104"], id="tokens-to-steps"),
])
def test_init_transfer_direction(transfer, expected):
    assert errors(model(TWO + f"  transfer {transfer}\n" + BLOCK_AB)) == expected


def test_init_between_equal_periods_is_an_error():
    text = model("  level f1 : tokens every 16\n  level f2 : tokens every 16\n  memory a in f1 : linear\n"
                 "  memory b in f2 : linear\n  transfer f1 -> f2 : init\n" + BLOCK_AB.replace("b)", "b)"))
    assert errors(text) == ["NL104"]


@pytest.mark.parametrize("transfer, expected", [
    pytest.param("fast -> fast : generate(self=true)", [], id="self-declared"),
    pytest.param("a -> a : generate(self=true)", [], id="memory-self-declared"),
    pytest.param("fast -> fast : generate", ["NL105"], id="self-undeclared"),
    pytest.param("slow -> fast : generate", [], id="slower-to-faster"),
    pytest.param("outer -> fast : generate", [], id="steps-to-tokens"),
    pytest.param("fast -> slow : generate", ["NL105"], id="faster-to-slower"),
    pytest.param("fast -> slow : generate(self=true)", ["NL105"], id="self-flag-does-not-excuse-faster"),
])
def test_generate_transfer_direction(transfer, expected):
    assert errors(model(TWO + f"  transfer {transfer}\n" + BLOCK_AB)) == expected


def test_generated_inputs_imply_generation_edges():
    m = ir_of(model("  level gen : tokens every 8\n  level fast : tokens every 32\n"
                    "  memory main in fast : mlp(depth=2) {\n    inputs k=generated, v=generated\n"
                    "    generators gen\n    signal self\n  }\n  block = main\n"))
    g = build(m)
    assert g.edges["memory:main.k", "memory:main"]["kind"] == "condition"
    assert g.nodes["memory:main.k"]["level"] == "gen"
    assert g.edges["memory:main.k", "memory:main.k"]["self_referential"] is True


def test_same_frequency_cycle_and_its_self_referential_escape():
    ring = ("  level fast : tokens every 16\n  memory a in fast : linear\n  memory b in fast : linear\n"
            "  transfer a -> b : condition\n  transfer b -> a : {kind}\n  block = a -> b\n")
    assert errors(model(ring.format(kind="condition"))) == ["NL106"]
    assert errors(model(ring.format(kind="generate(self=true)"))) == []
    assert errors(model(ring.format(kind="init"))) == ["NL104"]  # init is not a data dependency


@pytest.mark.parametrize("transfer, block, expected", [
    pytest.param("first -> second", "a -> b", [], id="along-the-block"),
    pytest.param("second -> first", "a -> b", ["NL106"], id="against-the-block"),
    pytest.param("b -> a", "a -> b", ["NL106"], id="memories-against-the-block"),
    pytest.param("second -> first", "a + b", [], id="side-by-side"),
    pytest.param("second -> first", "b -> a", [], id="block-the-other-way"),
])
def test_the_block_data_flow_is_a_dependency(transfer, block, expected):
    text = model("  level first : tokens every 16\n  level second : tokens every 16\n"
                 "  memory a in first : linear\n  memory b in second : linear\n"
                 f"  transfer {transfer} : condition\n  block = {block}\n")
    assert errors(text) == expected


def test_cycle_across_frequencies_is_allowed():
    text = model(TWO + "  transfer a -> b : condition\n  transfer b -> a : condition\n" + BLOCK_AB)
    assert errors(text) == []


# ---- CMS chains -------------------------------------------------------------------------------

def cms(periods: tuple[int, ...], order: tuple[int, ...] | None = None, context: int = 4096) -> str:
    levels = "".join(f"  level c{i} : tokens every {p}\n" for i, p in enumerate(periods))
    names = ", ".join(f"c{i}" for i in (order if order is not None else range(len(periods))))
    return model(levels + f"  cms chain : sequential {{ levels {names} }}\n  block = chain\n",
                 context=context)


@pytest.mark.parametrize("periods, expected", [
    pytest.param((16, 64, 256), [], id="powers-of-four"),
    pytest.param((1, 3, 9), [], id="powers-of-three"),
    pytest.param((16, 48, 96), [], id="each-divides-the-next"),
    pytest.param((16, 24), ["NL107"], id="24-not-a-multiple-of-16"),
    pytest.param((16, 64, 96), ["NL107"], id="last-not-a-multiple"),
    pytest.param((8, 12, 24), ["NL107"], id="middle-not-a-multiple"),
])
def test_cms_periods_divide(periods, expected):
    assert [c for c in errors(cms(periods, context=4608)) if c != "NL108"] == expected


@pytest.mark.parametrize("periods, order, expected", [
    pytest.param((16, 64, 256), (0, 1, 2), [], id="fast-to-slow"),
    pytest.param((16, 64, 256), (2, 1, 0), ["NL113"], id="slow-to-fast"),
    pytest.param((16, 64, 256), (0, 2, 1), ["NL113"], id="out-of-order"),
    pytest.param((16, 16), (0, 1), ["NL113"], id="equal-periods"),
])
def test_cms_levels_fastest_first(periods, order, expected):
    assert errors(cms(periods, order)) == expected


def test_cms_level_must_count_tokens():
    text = model("  level c1 : tokens every 16\n  cms chain : sequential { levels c1, outer }\n  block = chain\n")
    assert errors(text) == ["NL113"]


def test_cms_members_one_per_level():
    m = ir_of(cms((16, 64, 256)))
    [c] = m.cms
    assert [x.name for x in c.memories] == ["chain_c0", "chain_c1", "chain_c2"]
    assert [x.level for x in c.memories] == ["c0", "c1", "c2"]
    assert all(x.structure.kind == "mlp" for x in c.memories)


# ---- context, partial chunks and levels that never update -------------------------------------------


@pytest.mark.parametrize("partial, expected", [
    pytest.param(None, ["NL108"], id="default-strict"),
    pytest.param("strict", ["NL108"], id="strict"),
    pytest.param("carry", [], id="carry"),
    pytest.param("flush", [], id="flush"),
])
def test_context_multiple_of_periods(partial, expected):
    extra = f"  partial = {partial}\n" if partial else ""
    text = model("  level fast : tokens every 16\n  memory a in fast : linear\n  block = a\n", context=500,
                 extra=extra)
    assert errors(text) == expected


def test_partial_policy_must_be_known():
    text = model("  level fast : tokens every 16\n  memory a in fast : linear\n  block = a\n",
                 extra="  partial = drop\n")
    assert errors(text) == ["NL006"]


def test_context_rule_ignores_steps_levels_and_long_periods():
    text = model("  level fast : tokens every 16\n  level slow : tokens every 1000 carry\n"
                 "  level sgd : steps every 3\n  memory a in fast : linear\n  memory b in slow : linear\n"
                 "  block = a -> b\n", context=512)
    assert codes(text) == []


@pytest.mark.parametrize("scope, expected", [
    pytest.param("", ["NL109"], id="resets-each-sequence"),
    pytest.param(" reset", ["NL109"], id="explicit-reset"),
    pytest.param(" carry", [], id="carry-silences"),
])
def test_level_slower_than_the_context(scope, expected):
    text = model(f"  level slow : tokens every 4096{scope}\n  memory a in slow : linear\n  block = a\n",
                 context=1024)
    assert codes(text) == expected


def test_never_updates_is_a_warning():
    text = model("  level slow : tokens every 4096\n  memory a in slow : linear\n  block = a\n", context=1024)
    [d] = analyze_text(text, "t.nl").diagnostics
    assert d.severity == "warning" and not d.is_error


# ---- other rules -----------------------------------------------------------------------------------


def test_backprop_needs_differentiable_writes():
    base = "  level fast : tokens every 16\n  memory a in fast : linear {{ writes {w} }}\n" \
           "  transfer outer -> {t} : backprop\n  block = a\n"
    assert errors(model(base.format(w="differentiable", t="a"))) == []
    assert errors(model(base.format(w="detached", t="a"))) == ["NL111"]
    assert errors(model(base.format(w="detached", t="fast"))) == ["NL111"]  # through the level


def test_meta_init_needs_an_init_transfer():
    base = "  level fast : tokens every 16\n  memory a in fast : linear { init meta }\n{t}  block = a\n"
    assert errors(model(base.replace("{t}", ""))) == ["NL115"]
    assert errors(model(base.replace("{t}", "  transfer outer -> fast : init\n"))) == []
    assert errors(model(base.replace("{t}", "  transfer outer -> a : init\n"))) == []


@pytest.mark.parametrize("memory, init", [
    ("linear", "zeros"), ("mlp(depth=2)", "random"),
    ("linear { inputs k=generated, v=generated; signal self }", "random"),  # zero generators never move
])
def test_default_initial_states(memory, init):
    mem = ir_of(model(f"  level fast : tokens every 16\n  memory a in fast : {memory}\n  block = a\n")).memories[0]
    assert mem.init == M.Init(kind=init)


def test_init_transfer_makes_meta_the_default():
    text = model("  level fast : tokens every 16\n  memory a in fast : linear\n"
                 "  transfer outer -> fast : init\n  block = a\n")
    assert ir_of(text).memories[0].init == M.Init(kind="meta")


@pytest.mark.parametrize("memory, qk_norm, hidden_norm", [
    ("linear", "l2", None),                          # l2: M(k) moves by eta ||k||^2
    ("linear { objective dot }", "none", None),      # Hebbian: nothing to erase
    ("linear { objective dot; rule dgd }", "l2", None),  # DGD erases along k
    ("linear { objective huber }", "l2", None),
    ("linear { qk_norm none }", "none", None),       # stated: kept
    ("mlp(depth=2)", "l2", "l2"),
    ("mlp(depth=2, norm=none) { qk_norm none }", "none", "none"),
    ("mlp(depth=2) { objective dot }", "l2", "l2"),  # an MLP's inner layers learn through its state
    ("attention", "none", None),
])
def test_in_context_memories_that_erase_normalise_by_default(memory, qk_norm, hidden_norm):
    """A model's in-context memory whose step compares M(k) with a target (or erases, DGD)
    normalises its keys, and an MLP its hidden layers, unless the spec says otherwise."""
    mem = ir_of(model(f"  level fast : tokens every 16\n  memory a in fast : {memory}\n  block = a\n")).memories[0]
    assert mem.qk_norm == qk_norm
    assert mem.structure.norm == hidden_norm


def test_cms_and_optimizer_memories_keep_raw_inputs():
    """CMS blocks (prenorm is theirs) and optimizer memories (deep momentum) keep `none`."""
    text = model("  level fast : tokens every 16\n  level slow : tokens every 64\n"
                 "  cms chain : sequential { levels fast, slow; structure mlp(depth=2) }\n  block = chain\n")
    for mem in ir_of(text).cms[0].memories:
        assert (mem.qk_norm, mem.structure.norm) == ("none", "none")
    deep_momentum = (REPO / "specs" / "deep_momentum.nl").read_text()
    opt = analyze_text(deep_momentum, "deep_momentum.nl").ir.optimizers[0]
    assert opt.memories[0].structure.norm == "none"


@pytest.mark.parametrize("where, literal", [
    ("param", "1e999"), ("param", "-1e400"), ("lr", "1e999"), ("update", "1e999")])
def test_non_finite_literals_are_nl008(where, literal):
    """A literal that overflows to infinity is "not finite" (NL008) wherever it is written.

    Bug: only the typed model parameters and level periods check it; an untyped parameter,
    a `constant(...)` and an optimizer expression accept `inf`, and `nldsl fmt --resolved` then
    prints the value as `inf`, which reads back as a name (the resolved spec changes meaning).
    """
    if where == "update":
        text = ("optimizer O {\n  lr = 0.1\n  level s : steps every 1\n"
                f"  memory m in s : elementwise {{ objective dot }}\n  update = lr * m * {literal}\n}}\n")
    else:
        param = f"  big = {literal}\n" if where == "param" else ""
        body = f" {{ lr constant({literal}) }}" if where == "lr" else ""
        text = model(f"  level fast : tokens every 16\n  memory a in fast : linear{body}\n  block = a\n",
                     extra=param)
    a = analyze_text(text, "t.nl")
    if a.ok:  # if accepted at all, the resolved form must keep the meaning
        resolved = format_file(resolved_tree(a.ir, a.ast))
        assert analyze_text(resolved, "t.nl").ir == a.ir, resolved
    assert "NL008" in [d.code for d in a.diagnostics]


@pytest.mark.parametrize("setting, expected", [
    pytest.param("lr contant(0.1)", ["NL006"], id="misspelt-kind"),
    pytest.param("retention 2 * constant(0.45)", ["NL006"], id="kind-inside-arithmetic"),
    pytest.param("momentum gat()", ["NL006"], id="misspelt-gate-as-a-call"),
    pytest.param("lr 2 * 0.05", [], id="arithmetic"),
    pytest.param("lr constant(2 * 0.05)", [], id="arithmetic-inside-the-kind"),
])
def test_rates_are_checked_before_compiling(setting, expected):
    """A call that is no kind used to pass the checker as a `constant` expression and fail only
    when compiled (NL401)."""
    text = model(f"  level fast : tokens every 16\n  memory a in fast : linear {{ {setting} }}\n  block = a\n")
    assert errors(text) == expected


def test_lowering_reports_everything_at_once():
    text = model("  level fast : tokens every 16\n  memory a in fats : linear { objective l3; rule dgdd }\n"
                 "  memory a in fast : linear\n  block = residual(norm -> aa)\n")
    got = set(errors(text))
    assert {"NL101", "NL006", "NL004", "NL301"} <= got


# ---- ablations ----------------------------------------------------------------------------------------

HOPE = REPO / "specs" / "hope.nl"


def _hope():
    text = HOPE.read_text(encoding="utf-8")
    tree = parse(text, "specs/hope.nl")
    return text, tree


def _variant(tree, edits):
    return ablate.apply(ablate.without_ablations(tree), edits)


def _check_variant(text, tree, variant):
    return analyze_ast(variant, text, "specs/hope.nl", base=HOPE.parent, check_ablations=False)


HOPE_ABLATIONS = [it.name for it in parse(HOPE.read_text(encoding="utf-8")).items if isinstance(it, A.Ablation)]


def test_hope_has_the_papers_ablations():
    assert {"no_dgd", "no_momentum", "no_weight_decay", "no_cms", "static_k", "static_v", "static_q"} <= set(
        HOPE_ABLATIONS)


@pytest.mark.parametrize("name", HOPE_ABLATIONS)
def test_each_hope_ablation_applies_and_checks_clean(name):
    text, tree = _hope()
    [ab] = [it for it in tree.items if isinstance(it, A.Ablation) and it.name == name]
    variant = _variant(tree, ablate.ablation_edits(ab))
    a = _check_variant(text, tree, variant)
    assert a.ok and not a.diagnostics, [str(d) for d in a.diagnostics]
    base = _check_variant(text, tree, ablate.without_ablations(tree))
    assert a.ir != base.ir  # the ablation changed something
    # the variant prints back as a spec with the same meaning
    printed = format_file(variant)
    assert analyze_text(printed, "specs/hope.nl", base=HOPE.parent, check_ablations=False).ir == a.ir


@pytest.mark.parametrize("name, field, value", [
    ("no_dgd", "rule", M.Rule(kind="gd")),
    ("no_momentum", "momentum", M.Momentum(kind="none")),
    ("no_weight_decay", "retention", M.Retention(kind="none")),
])
def test_hope_ablations_change_the_titans_memory(name, field, value):
    text, tree = _hope()
    [ab] = [it for it in tree.items if isinstance(it, A.Ablation) and it.name == name]
    a = _check_variant(text, tree, _variant(tree, ablate.ablation_edits(ab)))
    [titans] = [m for m in a.ir.models[0].memories if m.name == "titans"]
    assert getattr(titans, field) == value


@pytest.mark.parametrize("inp", ["k", "v", "q"])
def test_hope_static_projection_ablations(inp):
    text, tree = _hope()
    [ab] = [it for it in tree.items if isinstance(it, A.Ablation) and it.name == f"static_{inp}"]
    a = _check_variant(text, tree, _variant(tree, ablate.ablation_edits(ab)))
    [titans] = [m for m in a.ir.models[0].memories if m.name == "titans"]
    assert getattr(titans.inputs, inp) == "static"
    assert inp not in titans.inputs.generated()


def test_removing_the_cms_removes_it_from_the_block_and_its_levels():
    text, tree = _hope()
    variant = _variant(tree, [("remove", ("chain",), None, None)])
    a = _check_variant(text, tree, variant)
    assert a.ok and not a.diagnostics
    m = a.ir.models[0]
    assert m.cms == ()
    assert "chain" not in format_file(variant).split("ablation")[0]
    assert {lv.name for lv in m.levels} == {"pretrain", "gen", "fast"}  # cms1..3 went with it
    assert all("cms" not in (t.source + t.target) for t in m.transfers)
    printed_block = format_file(variant)
    assert "block = residual(rmsnorm -> titans)\n" in printed_block


def test_unknown_ablation_path_is_nl305_with_did_you_mean():
    text = HOPE.read_text(encoding="utf-8") + "ablation typo { titns.rule = gd }\n"
    a = analyze_text(text, "specs/hope.nl", base=HOPE.parent)
    [d] = a.diagnostics
    assert d.code == "NL305" and "`titns` matches nothing" in d.message
    assert d.help == "did you mean `titans`?"
    assert d.line == text.count("\n")  # at the ablation's line


def test_unknown_property_in_an_ablation_is_nl305():
    with pytest.raises(ablate.EditError) as info:
        _variant(_hope()[1], [("set", ("titans", "retenton"), A.Name("none"), None)])
    assert "no property `retenton`" in info.value.message
    assert info.value.help == "did you mean `retention`?"


@pytest.mark.parametrize("edit, message", [
    (("set", ("fast",), A.Number(1, "1")), "is a level"),
    (("set", ("fast", "period"), A.Number(1, "1")), "has no part `period`"),
    (("remove", ("fast", "every"), None), "always has `every`"),
    (("add", ("dim",), A.Number(1, "1")), "already set"),
    (("set", ("dim", "x"), A.Number(1, "1")), "has no parts"),
    (("set", ("titans",), A.Number(1, "1")), "edit one of its properties"),
    (("set", ("nothing",), A.Number(1, "1")), "matches nothing"),
])
def test_bad_edits_explain_themselves(edit, message):
    op, path, value = edit
    with pytest.raises(ablate.EditError) as info:
        _variant(_hope()[1], [(op, path, value, None)])
    assert message in info.value.message


def test_variant_that_breaks_a_rule_is_nl306_with_notes():
    text = HOPE.read_text(encoding="utf-8") + "ablation odd { cms2.every = 48 }\n"
    a = analyze_text(text, "specs/hope.nl", base=HOPE.parent)
    [d] = a.diagnostics
    assert d.code == "NL306" and "`odd`" in d.message
    assert d.notes and all(n.startswith("NL") for n in d.notes)
    assert any(n.startswith("NL107") for n in d.notes)


def test_ablations_are_not_checked_when_the_base_spec_has_errors():
    text = HOPE.read_text(encoding="utf-8").replace("every 128", "every 0") + "ablation odd { cms2.every = 48 }\n"
    assert "NL306" not in codes(text)


def test_parameter_cycles_are_reported_once_at_their_first_parameter():
    """NL309: a parameter that uses itself, directly or through others, in a model or an
    optimizer; a forward reference without a cycle is fine in an optimizer (computed per step)."""
    opt = ("optimizer O {{\n  lr = 0.1\n{params}  level step : steps every 1\n"
           "  memory m in step : elementwise {{ input g; objective dot }}\n  update = lr * m\n}}\n")
    diags = analyze_text(opt.format(params="  g = a + grad\n  a = b * 2\n  b = g * param\n"), "t.nl").diagnostics
    assert [(d.code, d.line, d.message) for d in diags] == [
        ("NL309", 3, "parameter `g` is defined in terms of itself through `a`, `b`")]
    assert errors(opt.format(params="  g = a + grad\n  a = 0.1 * param\n")) == []
    assert errors(opt.format(params="  g = g + grad\n")) == ["NL309"]
    assert "NL309" in codes(model("  chunk = chunk * 2\n  level fast : tokens every 16\n"
                                  "  memory a in fast : linear\n  block = a\n"))


@pytest.mark.parametrize("props, flagged", [
    ("retention constant(1.2)", ["keeps 1.2 of its state per update: the state grows without bound"]),
    ("retention constant(-0.1)", ["the state flips its sign every update"]),
    ("momentum 1.5", ["keeps 1.5 of its momentum per update"]),
    ("lr constant(-0.1)", ["a learning rate of -0.1"]),
    ("retention constant(1); momentum constant(0); lr constant(0)", []),  # the ends of the ranges
    ("retention gate; lr gate", []),
])
def test_constants_out_of_range_are_warned(props, flagged):
    diags = analyze_text(model(f"  level fast : tokens every 16\n  memory a in fast : linear {{ {props} }}\n"
                               "  block = a\n"), "t.nl").diagnostics
    assert [d.code for d in diags] == ["NL206"] * len(flagged) and all(not d.is_error for d in diags)
    for d, words in zip(diags, flagged):
        assert words in d.message


def test_an_optimizer_constant_named_by_a_parameter_is_range_checked():
    """`retention constant(momentum)` with `momentum = 1.5`: NL206 at the retention (the
    parameter's default; a user may override it when building the optimizer)."""
    text = ("optimizer Heavy {{\n  lr = 0.01\n  momentum = {m}\n  level step : steps every 1\n"
            "  memory m in step : elementwise {{ objective dot; retention constant(momentum) }}\n"
            "  update = lr * m\n}}\n")
    assert codes(text.format(m=1.5)) == ["NL206"]
    assert codes(text.format(m=0.9)) == []
