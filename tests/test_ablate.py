"""``nldsl ablate``: the override grammar, the sweep plan, variant checking, output, summaries.

The command is driven through ``nldsl.ablate_cmd.run(argv)`` (and once through a parent parser,
the way ``nldsl.cli`` registers it), so these tests do not depend on the CLI's registration.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from nldsl import ablate_cmd, sweep
from nldsl.spec import analyze_file
from nldsl.sweep import OverrideError, parse_override
from nldsl.syntax import ast as A
from nldsl.syntax.parser import parse
from nldsl.syntax.printer import format_file

REPO = Path(__file__).resolve().parents[1]
HOPE = str(REPO / "specs" / "hope.nl")
TITANS = str(REPO / "specs" / "titans.nl")
TABLE6 = ["no_dgd", "no_momentum", "no_weight_decay", "no_cms", "static_k", "static_v", "static_q"]


def ablate(capsys, *argv):
    rc = ablate_cmd.run([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def plan_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if re.match(r"#\d+ : ", ln)]


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Each test runs in an empty folder, so the default output (ablations/...) lands there."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# ---- the override grammar --------------------------------------------------------------------

PARSE_CASES = [
    ("titans.rule=gd", "set", ("titans", "rule"), ["gd"]),
    ("dim=64", "set", ("dim",), ["64"]),
    ("fast.every=8,16,32", "set", ("fast", "every"), ["8", "16", "32"]),
    ("lr=1e-3,-2", "set", ("lr",), ["1e-3", "-2"]),
    ("~chain", "remove", ("chain",), []),
    ("+titans.momentum=0.9", "add", ("titans", "momentum"), ["0.9"]),
    ("mem.structure=mlp(depth=2, expansion=4),linear", "set", ("mem", "structure"),
     ["mlp(depth=2, expansion=4)", "linear"]),
    ("x=(1, 2),(3, 4)", "set", ("x",), ["(1, 2)", "(3, 4)"]),
    ('x="a,b",c', "set", ("x",), ['"a,b"', "c"]),
    ("block=residual(rmsnorm -> titans)", "set", ("block",), ["residual(rmsnorm -> titans)"]),
    ("titans.rule=choice(gd, dgd)", "set", ("titans", "rule"), ["gd", "dgd"]),
    ("a=range(1,5)", "set", ("a",), ["1", "2", "3", "4"]),
    ("a=range(0,10,3)", "set", ("a",), ["0", "3", "6", "9"]),
    ("a=range(5,1,-2)", "set", ("a",), ["5", "3"]),
    ("a=range(-2,1)", "set", ("a",), ["-2", "-1", "0"]),
    ("a=range(0.1,0.4,0.1)", "set", ("a",), ["0.1", "0.2", "0.3"]),
    ("a=range(1e-4,1e-3,3e-4)", "set", ("a",), ["0.0001", "0.0004", "0.0007"]),
    ("a=range(1,2,0.25)", "set", ("a",), ["1.0", "1.25", "1.5", "1.75"]),
    ("a=range(1.0,3.0)", "set", ("a",), ["1.0", "2.0"]),
    ("a=1,range(2,4)", "set", ("a",), ["1", "2", "3"]),
    ("fast.read=anchor", "set", ("fast", "read"), ["anchor"]),
    ("  dim = 64 ", "set", ("dim",), ["64"]),
]


@pytest.mark.parametrize("text,op,path,values", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_override(text, op, path, values):
    ov = parse_override(text)
    assert (ov.op, ov.path, [c.text for c in ov.choices]) == (op, path, values)


def test_values_are_spec_expressions():
    ov = parse_override("x=(1, 2),mlp(depth=2),gd,-1,\"m3.nl\",true")
    kinds = [type(c.expr) for c in ov.choices]
    assert kinds == [A.Tuple, A.Call, A.Name, A.Neg, A.String, A.Bool]
    assert ov.choices[1].expr.kwargs[0].name == "depth"


def test_float_range_is_exact():
    ov = parse_override("lr=range(0.1,1.0,0.1)")
    assert [c.text for c in ov.choices] == [f"0.{i}" for i in range(1, 10)]
    assert [c.expr.value for c in ov.choices][2] == 0.3  # never 0.30000000000000004
    assert all(isinstance(c.expr.value, float) for c in ov.choices)
    ints = parse_override("n=range(2,8,2)")
    assert all(isinstance(c.expr.value, int) for c in ints.choices)


def test_value_spans_point_into_the_override():
    ov = parse_override("titans.rule=gd,omega(window=4)", index=3)
    first, second = ov.choices
    assert first.expr.span == A.Span("<override 3>", 1, 13, 1, 15)
    assert second.expr.span.column == 16 and second.expr.kwargs[0].value.span.column == 29
    assert ov.segments == ((1, 7), (8, 12))
    rng = parse_override("a=range(1,3)")
    assert {c.expr.span.column for c in rng.choices} == {3}  # values of a range point at it


PARSE_ERRORS = [
    ("titans.rule", "ends too early", 12),
    ("a=", "no value after `=`", 2),
    ("~a=3", "a removal takes no value", 3),
    ("=3", "an override starts with a path", 1),
    ("a..b=1", "unexpected `.`", 3),
    ("a=(1,2", "a bracket is not closed; add `)`", 7),
    ("a={1}", "unexpected `{`", 3),
    ("a=1#x", "unexpected `#`", 4),
    ("a=(1,,2)", "unexpected `,`", 6),
    ("a=1 2", "unexpected `2`", 5),
    ("a=range(1)", "`range` takes 2 or 3 numbers", 3),
    ("a=range(5,1)", "gives no values", 3),
    ("a=range(1,2,0)", "the step of `range` is 0", 3),
    ("a=range(x,2)", "`range` takes plain numbers", 3),
    ("a=choice()", "`choice` takes the values", 3),
    ("", "empty override", 1),
]


@pytest.mark.parametrize("text,message,column", PARSE_ERRORS, ids=[c[0] or "empty" for c in PARSE_ERRORS])
def test_parse_errors(text, message, column):
    with pytest.raises(OverrideError) as ei:
        parse_override(text)
    e = ei.value
    assert message in e.message
    assert e.column == column
    lines = e.render().splitlines()
    assert lines[1] == f"  | {text}"
    assert lines[2] == "  | " + " " * (column - 1) + "^" * (e.end_column - column)


def test_a_sweep_too_long_is_refused():
    with pytest.raises(OverrideError, match="more than"):
        parse_override("a=range(0,100000)")


# ---- the plan ------------------------------------------------------------------------------


def test_plan_is_the_product_in_command_line_order():
    ovs = [parse_override("mem.conv=2,4", 1), parse_override("fast.every=8,16,32", 2)]
    variants = sweep.plan(["a", "b"], ovs)
    assert len(variants) == 12
    assert variants[0].label == "@a mem.conv=2 fast.every=8"
    assert variants[1].label == "@a mem.conv=2 fast.every=16"  # the last axis varies fastest
    assert variants[6].label == "@b mem.conv=2 fast.every=8"
    assert variants[0].dirname == "000_@a,conv=2,every=8"
    assert variants[11].dirname == "011_@b,conv=4,every=32"


def test_directory_names():
    ovs = [parse_override("fast.every=8", 1), parse_override("gen.every=4", 2),
           parse_override("mem.structure=mlp(depth=2, expansion=4),linear", 3), parse_override("~chain", 4),
           parse_override("+mem.momentum=0.9", 5)]
    names = [v.dirname for v in sweep.plan([], ovs)]
    assert names == ["000_fast.every=8,gen.every=4,structure=mlp_depth=2_expansion=4,~chain,+momentum=0.9",
                     "001_fast.every=8,gen.every=4,structure=linear,~chain,+momentum=0.9"]
    assert sweep.plan([None], [])[0].dirname == "000_@base"
    assert sweep.plan([None, "x"], ovs[:1])[0].dirname == "000_@base,every=8"
    long = sweep.plan([], [parse_override("x=" + "(" + ", ".join(["1"] * 80) + ")", 1)])[0].dirname
    assert len(long) <= sweep.NAME_LIMIT + 4 and re.search(r"-[0-9a-f]{8}$", long)
    wide = sweep.plan([], [parse_override("n=range(0,1200)", 1)])
    assert wide[0].dirname == "0000_n=0" and wide[-1].dirname == "1199_n=1199"


def test_flatten_and_diff():
    tree = parse('model M {\n dim = 4\n level f : tokens every 2 read running\n'
                 ' memory m in f : mlp(depth=2) { objective l2; inputs k=static, v=generated }\n'
                 ' transfer f -> f : generate(self=true)\n block = m\n}\n')
    flat = dict(sweep.flatten(tree))
    assert flat["M.dim"] == "4" and flat["M.f.every"] == "2" and flat["M.f.read"] == "running"
    assert flat["M.m.structure"] == "mlp" and flat["M.m.structure.depth"] == "2"
    assert flat["M.m.inputs.k"] == "static" and flat["M.transfer[f->f]"] == "generate(self=true)"
    new = [(k, "3" if k == "M.f.every" else v) for k, v in sweep.flatten(tree) if k != "M.dim"]
    new.append(("M.extra", "1"))
    assert sweep.diff_flattened(sweep.flatten(tree), new) == [
        "- M.dim = 4", "- M.f.every = 2", "+ M.f.every = 3", "+ M.extra = 1"]


# ---- the command: plans and written variants -----------------------------------------------------


def test_dry_run_lists_the_seven_paper_ablations(capsys, _cwd):
    rc, out, err = ablate(capsys, HOPE, "--dry-run")
    assert rc == 0, err
    assert out.splitlines()[0] == "Generating 7 variants:"
    assert plan_lines(out) == [f"#{i} : @{n}" for i, n in enumerate(TABLE6)]
    assert "7 of 7 variants check clean; nothing was written" in err
    assert _listing(_cwd) == []
    rc2, out2, _ = ablate(capsys, HOPE, "@all", "--dry-run")
    assert rc2 == 0 and plan_lines(out2) == plan_lines(out)


def test_a_variant_the_compiler_cannot_build_is_named_before_anything_runs(capsys, tmp_path):
    """A variant that checks but that `nldsl compile` would refuse (NL401) is said so up front,
    with the compiler's reason; it is still a valid spec, so it is written."""
    rc, out, err = ablate(capsys, HOPE, "titans.momentum=delta,gate", "--dry-run")
    assert rc == 0, err
    assert "note: variant #0 (titans.momentum=delta) checks, but the compiler cannot build it yet" in err
    assert "error[NL401]: `momentum delta` in the deep memory `titans` is not compiled yet" in err
    assert "variant #1" not in err
    assert "2 of 2 variants check clean (1 of them not compiled yet: #0); nothing was written" in err
    rc, out, err = ablate(capsys, HOPE, "titans.momentum=delta", "-o", tmp_path / "out")
    assert rc == 0 and "cannot build it yet" in err
    assert (tmp_path / "out" / "000_momentum=delta" / "spec.nl").exists()
    # --run skips it (no training run starts) and says why in the summary
    rc, out, err = ablate(capsys, HOPE, "titans.momentum=delta", "-o", tmp_path / "run", "--run", "--steps", "1")
    assert rc == 1, err
    assert "| 0 | `000_momentum=delta` | titans.momentum=delta | not compiled (NL401) |" in out
    assert not (tmp_path / "run" / "000_momentum=delta" / "run").exists()


def test_two_by_three_sweep_writes_six_checked_specs(capsys, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = ablate(capsys, TITANS, "mem.conv=2,4", "fast.every=8,16,32", "-o", out_dir)
    assert rc == 0, err
    assert out.splitlines()[0] == "Generating 6 variants:"
    assert plan_lines(out)[0] == "#0 : mem.conv=2 fast.every=8"
    assert plan_lines(out)[5] == "#5 : mem.conv=4 fast.every=32"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    dirs = [v["directory"] for v in manifest["variants"]]
    assert dirs == ["000_conv=2,every=8", "001_conv=2,every=16", "002_conv=2,every=32",
                    "003_conv=4,every=8", "004_conv=4,every=16", "005_conv=4,every=32"]
    base_sha = hashlib.sha256(Path(TITANS).read_bytes()).hexdigest()
    assert manifest["base_sha256"] == base_sha and manifest["spec"] == TITANS
    assert manifest["includes"] == [{"path": "adam.nl", "copied": True,
                                     "sha256": hashlib.sha256((REPO / "specs/adam.nl").read_bytes()).hexdigest()}]
    for v in manifest["variants"]:
        d = out_dir / v["directory"]
        assert v["valid"] and v["base_sha256"] == base_sha
        assert v["sha256"] == hashlib.sha256((d / "spec.nl").read_bytes()).hexdigest()
        assert v["resolved_sha256"] == hashlib.sha256((d / "spec.resolved.nl").read_bytes()).hexdigest()
        assert (d / "adam.nl").read_bytes() == (REPO / "specs/adam.nl").read_bytes()
        for name in ("spec.nl", "spec.resolved.nl"):
            a = analyze_file(d / name)
            assert a.ok and not a.diagnostics, [str(x) for x in a.diagnostics]
        conv, every = re.match(r"\d+_conv=(\d+),every=(\d+)", v["directory"]).groups()
        assert v["overrides"] == [f"mem.conv={conv}", f"fast.every={every}"]
        text = (d / "spec.nl").read_text()
        assert f"level fast : tokens every {every} read running" in text and f"conv {conv}" in text
        assert "ablation" not in text.split("model Titans")[1]  # the base's ablations are dropped
    assert not list(out_dir.glob("*/.*tmp*"))


def test_table6_variants_check_clean_and_reparse(capsys, tmp_path):
    out_dir = tmp_path / "hope"
    rc, out, err = ablate(capsys, HOPE, "@all", "-o", out_dir)
    assert rc == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert [v["ablation"] for v in manifest["variants"]] == TABLE6
    assert [v["directory"] for v in manifest["variants"]] == [f"{i:03d}_@{n}" for i, n in enumerate(TABLE6)]
    for v in manifest["variants"]:
        d = out_dir / v["directory"]
        text = (d / "spec.nl").read_text()
        assert format_file(parse(text)) == text  # re-parses, and is already formatted
        assert text.startswith(f"# nldsl ablate: variant {v['directory']} of hope.nl\n# overrides: @{v['ablation']}\n")
        a = analyze_file(d / "spec.nl")
        assert a.ok and not a.diagnostics, (v["ablation"], [str(x) for x in a.diagnostics])
        assert analyze_file(d / "spec.resolved.nl").ok
    no_cms = (out_dir / "003_@no_cms" / "spec.nl").read_text()
    assert "chain" not in no_cms.split("model Hope")[1] and "cms1" not in no_cms.split("model Hope")[1]
    assert "rule gd" in (out_dir / "000_@no_dgd" / "spec.nl").read_text()


def test_show_diff(capsys):
    rc, out, err = ablate(capsys, HOPE, "@no_dgd", "@static_k", "--dry-run", "--show-diff")
    assert rc == 0, err
    lines = out.splitlines()
    i = lines.index("#0 : @no_dgd", 3)
    assert lines[i + 1:i + 3] == ["  - Hope.titans.rule = dgd", "  + Hope.titans.rule = gd"]
    assert "  + Hope.titans.inputs.k = static" in lines
    rc, out, _ = ablate(capsys, HOPE, "@no_cms", "--dry-run", "--show-diff")
    assert "  - Hope.transfer[fast->cms1] = condition" in out and "  - Hope.chain.variant = sequential" in out


def test_a_variant_that_changes_nothing_is_noted(capsys):
    """Removing a property whose default is what the spec set (Titans' `qk_norm l2`) gives the
    base model again: the plan says so, and still succeeds. A swept value equal to the base's
    (the usual control) and `@base` are not noted."""
    rc, out, err = ablate(capsys, TITANS, "~mem.qk_norm", "--dry-run")
    assert rc == 0, err
    assert "note: variant #0 (~mem.qk_norm) is the base spec once defaults are filled in: a removed " \
           "property takes its default" in err
    rc, out, err = ablate(capsys, TITANS, "mem.conv=2,4", "--dry-run")
    assert rc == 0 and "note:" not in err  # a sweep's control value
    rc, out, err = ablate(capsys, HOPE, "@base", "--dry-run")
    assert rc == 0 and "note:" not in err  # the base, asked for by name


def test_named_ablations_multiply_with_overrides(capsys):
    rc, out, err = ablate(capsys, HOPE, "@base", "@no_dgd", "fast.every=16,32", "--dry-run")
    assert rc == 0, err
    assert plan_lines(out) == ["#0 : @base fast.every=16", "#1 : @base fast.every=32",
                               "#2 : @no_dgd fast.every=16", "#3 : @no_dgd fast.every=32"]


def test_values_with_commas_inside_brackets(capsys, tmp_path):
    rc, out, err = ablate(capsys, TITANS, "mem.rule=gd,omega(window=4)",
                          "mem.structure=mlp(depth=2, expansion=2),linear", "-o", tmp_path / "o")
    assert rc == 0, err
    assert plan_lines(out) == [
        "#0 : mem.rule=gd mem.structure=mlp(depth=2, expansion=2)", "#1 : mem.rule=gd mem.structure=linear",
        "#2 : mem.rule=omega(window=4) mem.structure=mlp(depth=2, expansion=2)",
        "#3 : mem.rule=omega(window=4) mem.structure=linear"]
    text = (tmp_path / "o" / "002_rule=omega_window=4,structure=mlp_depth=2_expansion=2" / "spec.nl").read_text()
    assert "rule omega(window=4)" in text and "mlp(depth=2, expansion=2)" in text


def test_ranges_end_to_end(capsys, tmp_path):
    rc, out, err = ablate(capsys, TITANS, "mem.conv=range(2,5)", "--dry-run")
    assert rc == 0 and plan_lines(out) == ["#0 : mem.conv=2", "#1 : mem.conv=3", "#2 : mem.conv=4"]
    rc, out, err = ablate(capsys, HOPE, "chain.lr=range(0.01,0.04,0.01)", "-o", tmp_path / "lr")
    assert rc == 0, err
    assert plan_lines(out) == ["#0 : chain.lr=0.01", "#1 : chain.lr=0.02", "#2 : chain.lr=0.03"]
    assert "lr 0.03" in (tmp_path / "lr" / "002_lr=0.03" / "spec.nl").read_text()


def test_add_remove_and_call_keywords(capsys, tmp_path):
    rc, out, err = ablate(capsys, TITANS, "+mem.inputs.k=static", "~mem.momentum", "+extra=3",
                          "mem.structure.depth=3", "-o", tmp_path / "o", "--show-diff")
    assert rc == 0, err
    assert "  - Titans.mem.structure.depth = 2\n  + Titans.mem.structure.depth = 3" in out
    assert "  - Titans.mem.momentum = gate\n  + Titans.mem.momentum = none" in out
    assert "  + Titans.extra = 3" in out
    text = (tmp_path / "o" / "000_+k=static,~momentum,+extra=3,depth=3" / "spec.nl").read_text()
    assert "inputs k=static" in text and "momentum gate" not in text and "extra = 3" in text
    rc, out, err = ablate(capsys, HOPE, "chain.structure.depth=1,3", "--dry-run", "--show-diff")
    assert rc == 0, err
    assert "  + Hope.chain.structure.depth = 3" in out


def test_cms_structure_keywords(capsys, tmp_path):
    """A CMS chain's `structure mlp(...)` is a property: a named ablation and an override both
    edit its keywords in place."""
    cms = REPO / "specs" / "cms.nl"
    assert "ablation no_prenorm { chain.structure.prenorm = none }" in cms.read_text()
    rc, out, err = ablate(capsys, cms, "@no_prenorm", "chain.structure.depth=3", "-o", tmp_path / "o")
    assert rc == 0, err
    [spec] = (tmp_path / "o").glob("*/spec.nl")
    assert "structure mlp(depth=3, expansion=4, residual=true, activation=gelu, prenorm=none)" in spec.read_text()
    assert analyze_file(spec).ok


def test_options_may_come_anywhere(capsys, tmp_path):
    rc, out, err = ablate(capsys, "--dry-run", TITANS, "mem.conv=2", "-o", tmp_path / "x", "fast.every=8")
    assert rc == 0, err
    assert plan_lines(out) == ["#0 : mem.conv=2 fast.every=8"]
    assert not (tmp_path / "x").exists()


def test_default_output_folder(capsys, _cwd):
    rc, _, err = ablate(capsys, TITANS, "mem.conv=2")
    assert rc == 0, err
    assert (_cwd / "ablations" / "titans" / "000_conv=2" / "spec.nl").is_file()
    assert (_cwd / "ablations" / "titans" / "manifest.json").is_file()


def test_output_is_deterministic(capsys, tmp_path):
    for name in ("a", "b"):
        assert ablate(capsys, HOPE, "@no_dgd", "fast.every=16,32", "-o", tmp_path / name)[0] == 0
    files = _listing(tmp_path / "a")
    assert files == _listing(tmp_path / "b")
    for f in files:
        if (tmp_path / "a" / f).is_file():
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_includes_outside_the_spec_folder_are_rewritten(capsys, tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "proj" / "parts").mkdir(parents=True)
    (tmp_path / "shared" / "adam.nl").write_text((REPO / "specs" / "adam.nl").read_text())
    (tmp_path / "proj" / "parts" / "opt.nl").write_text(
        'optimizer Sgd {\n  lr = 0.1\n  level step : steps every 1\n'
        '  memory m in step : vector { input grad; objective dot; rule gd }\n  update = m\n}\n')
    text = Path(TITANS).read_text().replace('include "adam.nl"',
                                            'include "../shared/adam.nl"\ninclude "parts/opt.nl"')
    (tmp_path / "proj" / "t.nl").write_text(text)
    assert analyze_file(tmp_path / "proj" / "t.nl").ok
    rc, out, err = ablate(capsys, tmp_path / "proj" / "t.nl", "mem.conv=2", "-o", tmp_path / "out" / "deep")
    assert rc == 0, err
    d = tmp_path / "out" / "deep" / "000_conv=2"
    written = (d / "spec.nl").read_text()
    assert 'include "../../../shared/adam.nl"' in written and 'include "parts/opt.nl"' in written
    assert (d / "parts" / "opt.nl").is_file() and not (d / "adam.nl").exists()
    assert analyze_file(d / "spec.nl").ok and analyze_file(d / "spec.resolved.nl").ok
    inc = json.loads((tmp_path / "out" / "deep" / "manifest.json").read_text())["includes"]
    assert [(i["path"], i["copied"]) for i in inc] == [("../shared/adam.nl", False), ("parts/opt.nl", True)]


# ---- bad input: exit codes, messages, nothing written ----------------------------------------


BAD_OVERRIDES = [  # (spec, argument, exit code, message, caret line, help)
    (HOPE, "titans.rulee=gd", 2, "could not override `titans.rulee`: memory `titans` has no property `rulee`",
     "  |        ^^^^^", "did you mean `rule`?"),
    (HOPE, "titns.rule=gd", 2, "`titns` matches nothing in `Hope`", "  | ^^^^^", "did you mean `titans`?"),
    (HOPE, "titans.inputs.kk=static", 2, "`titans.inputs` has no key `kk`", "  |               ^^",
     "did you mean `k`?"),
    (HOPE, "fast.evry=4", 2, "level `fast` has no part `evry`", "  |      ^^^^", "did you mean `every`?"),
    (HOPE, "titans.structure.expansionn=2", 2, "`titans.structure` has no argument `expansionn`",
     "  |                  ^^^^^^^^^^", "did you mean `expansion`?"),
    (TITANS, "mem.inputs.k=static", 2, "could not override `mem.inputs.k`: `mem.inputs` is not set",
     "  |            ^", "to add it use `+mem.inputs.k=static`"),
    (TITANS, "nosuch=1", 2, "`nosuch` matches nothing in `Titans`", "  | ^^^^^^",
     "to add a new parameter write `+nosuch=1`"),
    (HOPE, "~titans.precondition", 2, "could not remove `titans.precondition`: `titans.precondition` is not set, "
     "nothing to remove", "  |         ^^^^^^^^^^^^", "an override that removes nothing is an error"),
    (TITANS, "+mem.rule=gd", 2, "could not add `mem.rule`: `mem.rule` is already set", "  |  ^^^^^^^^",
     "to change it write `mem.rule=gd` (without `+`)"),
    (HOPE, "@no_dgf", 2, "has no ablation `no_dgf`", "  |  ^^^^^^", "did you mean `no_dgd`?"),
    (HOPE, "titans.rule=(gd", 2, "a bracket is not closed", "  |                ^", None),
    (TITANS, "mem.rule=3", 1, "error[NL006]: `3` is not a learning rule", "  |          ^",
     "`mem.rule` expects one of the rules: `dgd`, `gd`, `omega(window=N)`"),
    (TITANS, "fast.every=gd", 1, "error[NL006]: the period of level `fast` uses `gd`", "  |            ^^",
     "`fast.every` expects a number"),
    (TITANS, "mem.objective=l3", 1, "`l3` is not a valid objective", "  |               ^^",
     "`mem.objective` expects one of the objectives"),
    (TITANS, "fast.every=7", 1, "error[NL108]: context 512 is not a multiple of the period of `fast` (7)",
     "  |            ^", None),
]


@pytest.mark.parametrize("spec,arg,code,message,caret,help", BAD_OVERRIDES, ids=[c[1] for c in BAD_OVERRIDES])
def test_bad_overrides(capsys, tmp_path, spec, arg, code, message, caret, help):
    out_dir = tmp_path / "out"
    rc, out, err = ablate(capsys, spec, arg, "-o", out_dir)
    assert rc == code, err
    assert message in err
    lines = err.splitlines()
    i = lines.index(f"  | {arg}")
    assert lines[i + 1] == caret
    if help:
        assert f"= help: {help}" in err
    assert not out_dir.exists(), "nothing may be written"
    if code == 2:
        assert "Generating" not in out  # the plan is not even printed
    else:
        assert re.search(r"variant #0 \(.*\) does not check:", err) and "nothing was written" in err


def test_every_bad_argument_is_reported(capsys):
    rc, _, err = ablate(capsys, HOPE, "titans.rulee=gd", "@nope", "fast.every=8", "a=(", "--dry-run")
    assert rc == 2
    assert "3 of the arguments cannot be used; nothing was written" in err
    assert "has no ablation `nope`" in err and "has no property `rulee`" in err and "not closed" in err
    rc, _, err = ablate(capsys, HOPE, "fast.every=8", "fast.every=16", "--dry-run")
    assert rc == 2 and "`fast.every` is already overridden by `fast.every=8`" in err


def test_an_invalid_variant_stops_the_plan(capsys, tmp_path):
    out_dir = tmp_path / "o"
    rc, out, err = ablate(capsys, HOPE, "@no_dgd", "@no_cms", "chain.lr=0.1,0.2", "-o", out_dir)
    assert rc == 1
    assert len(plan_lines(out)) == 4
    assert "variant #2 (@no_cms chain.lr=0.1) does not check:" in err
    assert "could not override `chain.lr` (after `@no_cms`): `chain` matches nothing in `Hope`" in err
    assert "2 of 4 variants do not check (#2, #3)" in err
    assert not out_dir.exists()
    rc, out, err = ablate(capsys, HOPE, "@no_dgd", "@no_cms", "chain.lr=0.1,0.2", "-o", out_dir, "--keep-going")
    assert rc == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["000_@no_dgd,lr=0.1", "001_@no_dgd,lr=0.2", "manifest.json"]
    rows = json.loads((out_dir / "manifest.json").read_text())["variants"]
    assert [r["valid"] for r in rows] == [True, True, False, False]
    assert rows[2]["directory"] is None and "matches nothing" in rows[2]["errors"][0]


def test_a_type_error_in_one_value_of_a_sweep(capsys):
    rc, out, err = ablate(capsys, TITANS, "mem.rule=gd,3,omega(window=4)", "--dry-run")
    assert rc == 1
    assert "variant #1 (mem.rule=3) does not check:" in err and "variant #0" not in err
    assert "  | mem.rule=gd,3,omega(window=4)\n  |             ^\n" in err
    assert "dry run: 2 of 3 variants check clean; nothing was written" in err


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = ablate(capsys, TITANS, "mem.conv=2", "-o", blocker / "sub")
    assert rc == 2
    assert f"cannot write to {blocker / 'sub'}: {blocker} is not a directory" in err
    assert blocker.read_text() == "x" and _listing(tmp_path) == ["cwd", "file"]
    rc, _, err = ablate(capsys, TITANS, "mem.conv=2", "-o", blocker)
    assert rc == 2 and "is not a directory" in err


def test_unreadable_or_broken_spec(capsys, tmp_path):
    rc, _, err = ablate(capsys, tmp_path / "missing.nl", "--dry-run")
    assert rc == 2 and "no such file" in err
    bad = tmp_path / "bad.nl"
    bad.write_text("model M {\n  dim = \n}\n")
    rc, _, err = ablate(capsys, bad, "dim=4")
    assert rc == 1 and "error[NL001]" in err and "fix the base spec" in err
    plain = tmp_path / "plain.nl"
    plain.write_text("model M {\n  vocab = 256; dim = 64; layers = 2; context = 64\n"
                     "  level outer : steps every 1\n  level fast : tokens every 16\n"
                     "  memory mem in fast : linear\n  block = residual(norm -> mem)\n}\n")
    rc, _, err = ablate(capsys, plain, "--dry-run")
    assert rc == 2 and "nothing to ablate" in err
    rc, _, err = ablate(capsys, plain, "@all", "--dry-run")
    assert rc == 2 and "has no named ablations" in err
    rc, out, err = ablate(capsys, plain, "@base", "--dry-run")
    assert rc == 0 and plan_lines(out) == ["#0 : @base"]


def test_several_owners_need_a_name(capsys, tmp_path):
    spec = tmp_path / "two.nl"
    body = ("  vocab = 256; dim = 64; layers = 2; context = 64\n  level outer : steps every 1\n"
            "  level fast : tokens every 16\n  memory mem in fast : linear\n  block = residual(norm -> mem)\n")
    spec.write_text(f"model A {{\n{body}}}\n\nmodel B {{\n{body}}}\n")
    rc, _, err = ablate(capsys, spec, "dim=32", "--dry-run")
    assert rc == 2 and "--name A" in err
    rc, out, err = ablate(capsys, spec, "dim=32", "--name", "B", "--dry-run", "--show-diff")
    assert rc == 0, err
    assert "  - B.dim = 64" in out and "A.dim" not in out


def test_max_variants(capsys):
    rc, _, err = ablate(capsys, TITANS, "mem.conv=range(0,40)", "fast.every=1,2,4,8", "--dry-run",
                        "--max-variants", "100")
    assert rc == 2 and "the plan has 160 variants, more than --max-variants 100" in err


# ---- registration and --run ------------------------------------------------------------------


def test_registers_as_a_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="nldsl")
    sub = parser.add_subparsers(dest="command")
    ablate_cmd.build_subparser(sub)
    args = parser.parse_args(["ablate", "--dry-run", HOPE, "@no_dgd", "--show-diff", "fast.every=16"])
    assert args.func(args) == 0
    assert "#0 : @no_dgd fast.every=16" in capsys.readouterr().out
    args = parser.parse_args(["ablate", HOPE, "@no_cms", "-o", "x", "--run", "--task", "mqar", "--steps", "200"])
    assert args.run == ["--task", "mqar", "--steps", "200"] and args.output == "x" and args.items == ["@no_cms"]
    assert parser.parse_args(["ablate", HOPE]).run is None


def test_through_cli_main(capsys, monkeypatch, tmp_path):
    """Through ``nldsl.cli.main``, registered the way cli.py does it (or already registered)."""
    from nldsl import cli

    def registered(parser) -> bool:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return "ablate" in sub.choices

    if not registered(cli.build_parser()):
        plain = cli.build_parser

        def build_parser():
            p = plain()
            ablate_cmd.build_subparser(next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)))
            return p

        monkeypatch.setattr(cli, "build_parser", build_parser)
    assert cli.main(["ablate", HOPE, "@no_dgd", "--dry-run", "--show-diff"]) == 0
    assert "  + Hope.titans.rule = gd" in capsys.readouterr().out
    assert cli.main(["ablate", HOPE, "titans.rulee=gd", "-o", str(tmp_path / "o")]) == 2
    assert "did you mean `rule`?" in capsys.readouterr().err
    assert cli.main(["ablate", TITANS, "mem.rule=3", "-o", str(tmp_path / "o")]) == 1
    assert cli.main(["ablate", TITANS, "mem.conv=2,4", "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "001_conv=4" / "spec.nl").is_file() and not (tmp_path / "o" / "000_rule=3").exists()


def test_run_without_the_training_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nldsl.train", None)  # `import nldsl.train` fails
    rc, out, err = ablate(capsys, HOPE, "@no_cms", "@no_dgd", "-o", tmp_path / "o", "--run", "--task", "mqar")
    assert rc == 2
    assert "--run needs the training command `nldsl run`" in err
    assert not (tmp_path / "o").exists() and "Generating" not in out
    rc, _, err = ablate(capsys, HOPE, "--dry-run", "--run")
    assert rc == 2 and "contradict" in err


def test_run_writes_the_summary(capsys, monkeypatch, tmp_path):
    calls = []

    def fake_run(spec: Path, run_args, out: Path):
        calls.append((spec, list(run_args), out))
        assert analyze_file(spec).ok
        i = len(calls)
        return {"exit_code": 0, "status": "ok", "metric": "acc",
                "metrics": {"acc": 0.25 * i, "eval_loss": 3.0 - i, "tokens_per_s": 1000.0 * i}}

    monkeypatch.setattr(ablate_cmd, "_load_runner", lambda: None)
    monkeypatch.setattr(ablate_cmd, "_run_variant", fake_run)
    out_dir = tmp_path / "o"
    rc, out, err = ablate(capsys, HOPE, "@no_cms", "@no_dgd", "-o", out_dir,
                          "--run", "--task", "mqar", "--steps", "200")
    assert rc == 0, err
    assert [c[1] for c in calls] == [["--task", "mqar", "--steps", "200"]] * 2
    assert calls[0][0] == out_dir / "000_@no_cms" / "spec.nl" and calls[0][2] == out_dir / "000_@no_cms" / "run"
    md = (out_dir / "summary.md").read_text()
    assert "| 0 | `000_@no_cms` | @no_cms | ok | 0.2500 | 2.0000 | 1000.0 |" in md
    rows = list(csv.DictReader(io.StringIO((out_dir / "summary.csv").read_text())))
    assert [r["variant"] for r in rows] == ["000_@no_cms", "001_@no_dgd"] and rows[1]["acc"] == "0.5"
    assert (out_dir / "summary.png").read_bytes().startswith(b"\x89PNG")
    rc, _, err = ablate(capsys, HOPE, "@no_cms", "-o", out_dir, "--run", "--out", "elsewhere")
    assert rc == 2 and "cannot set --out" in err


@pytest.mark.parametrize("options, words", [
    (["--lr", "nan"], "--run: --lr must be a finite positive number, got nan; nothing was written"),
    (["--steps", "0"], "--run: --steps must be at least 1, got 0; nothing was written"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
])
def test_run_options_are_checked_before_any_variant_is_written(capsys, tmp_path, options, words):
    out_dir = tmp_path / "abl"
    rc, _, err = ablate(capsys, HOPE, "@no_cms", "-o", out_dir, "--run", *options)
    assert rc == 2 and words in err and "Traceback" not in err
    assert not out_dir.exists()


# ---- the summary writers -------------------------------------------------------------------------

ROWS = [
    {"variant": "000_@base", "overrides": ["@base"], "metrics": {"acc": 0.9, "eval_loss": 0.31}},
    {"variant": "001_@no_dgd", "overrides": ["@no_dgd"], "metrics": {"acc": 0.7, "eval_loss": 0.52,
                                                                      "tokens_per_s": 12345.6}},
    {"variant": "002_@no_cms", "overrides": "@no_cms fast.every=8", "metrics": {"acc": float("nan")},
     "status": "diverged"},
]


def test_summary_markdown():
    md = ablate_cmd.summary_markdown(ROWS, title="T")
    lines = md.splitlines()
    assert lines[0] == "# T"
    assert lines[2] == "| # | variant | overrides | status | acc | eval_loss | tokens_per_s |"
    assert lines[4] == "| 0 | `000_@base` | @base | ok | 0.9000 | 0.3100 | - |"
    assert lines[5] == "| 1 | `001_@no_dgd` | @no_dgd | ok | 0.7000 | 0.5200 | 12345.6 |"
    assert lines[6] == "| 2 | `002_@no_cms` | @no_cms fast.every=8 | diverged | - | - | - |"


def test_summary_csv():
    rows = list(csv.reader(io.StringIO(ablate_cmd.summary_csv(ROWS))))
    assert rows[0] == ["index", "variant", "overrides", "status", "acc", "eval_loss", "tokens_per_s"]
    assert rows[1] == ["0", "000_@base", "@base", "ok", "0.9", "0.31", ""]
    assert rows[3] == ["2", "002_@no_cms", "@no_cms fast.every=8", "diverged", "", "", ""]


def test_summary_files(tmp_path):
    tmp_path = tmp_path / "summary"
    tmp_path.mkdir()
    paths = ablate_cmd.write_summaries(ROWS, tmp_path)
    assert [p.name for p in paths] == ["summary.md", "summary.csv", "summary.png"]
    png = (tmp_path / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert ablate_cmd.summary_chart([]).startswith(b"\x89PNG")  # no rows, no metrics: still a picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv", "summary.md", "summary.png"]


# ---- the docs ------------------------------------------------------------------------------


def _doc_commands() -> list[list[str]]:
    text = (REPO / "docs" / "ablations.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["nldsl", "ablate"] and "--run" not in argv:
                out.append(argv[2:])
    return out


@pytest.mark.parametrize("argv", _doc_commands(), ids=lambda a: " ".join(a))
def test_docs_commands_run(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = [str(tmp_path / "out") if prev in ("-o", "--output") else a for prev, a in zip([""] + argv, argv)]
    rc, out, err = ablate(capsys, *argv)
    assert rc == 0, err


def test_docs_plan_listing_is_current(capsys):
    text = (REPO / "docs" / "ablations.md").read_text(encoding="utf-8")
    rc, out, _ = ablate(capsys, HOPE, "--dry-run")
    assert "\n".join(out.splitlines()) in text
