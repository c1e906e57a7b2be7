"""Diagnostics "UI tests": one failing spec per rule code, with its rendered text as a golden.

Each ``tests/diagnostics/NLxxx_short_name.nl`` marks the offending line(s) with
``# expect: NLxxx``. The runner checks the spec against its golden ``.stderr`` (rendered
without colour, paths relative to the repository root); ``NLDSL_ACCEPT=1`` rewrites the goldens.
A meta-test asserts that every code of the rule table has a case reporting it at its line.

NL002 (not UTF-8) needs a non-UTF-8 file: it is written from bytes at test time rather than
committed (see ``GENERATED``).
"""
from __future__ import annotations

import json

import pytest

from nldsl.checks.codes import CODES
from nldsl.diagnostics import render_json, render_text
from nldsl.spec import analyze_file, analyze_text
from tests.nltest_support import (ACCEPT, DIAG_DIR, REPO, UI_CASES, UI_GENERATED, case_diagnostics,
                                  compile_diagnostics, expectations, is_compile_stage, rel,
                                  render_all_cases_in_subprocess, run_cli)

CASES = UI_CASES
GENERATED = UI_GENERATED
ALL_NAMES = sorted([p.stem for p in CASES] + list(GENERATED))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    """Every case rendered once, in a fresh interpreter with PYTHONHASHSEED=0."""
    return render_all_cases_in_subprocess(str(tmp_path_factory.mktemp("ui")), hash_seed=0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_ui_golden(name, rendered):
    text = rendered[name]
    golden = DIAG_DIR / f"{name}.stderr"
    if ACCEPT:
        golden.write_text(text, encoding="utf-8")
        return
    assert golden.exists(), f"missing golden {rel(golden)}; run with NLDSL_ACCEPT=1 to create it"
    expected = golden.read_text(encoding="utf-8")
    assert text == expected, (
        f"diagnostics of tests/diagnostics/{name}.nl changed; if intended, rerun with "
        f"NLDSL_ACCEPT=1\n--- got ---\n{text}--- golden ---\n{expected}")


def test_diagnostics_do_not_depend_on_hash_seed(rendered, tmp_path):
    """The same spec gives byte-identical diagnostics in every run (goldens, CI, editors)."""
    for seed in (1, 2):
        other = render_all_cases_in_subprocess(str(tmp_path / str(seed)), hash_seed=seed)
        differ = sorted(n for n in rendered if other.get(n) != rendered[n])
        assert not differ, f"PYTHONHASHSEED={seed} changes the diagnostics of {differ}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_ui_reports_exactly_the_expected_codes(case, in_repo):
    """Every ``# expect:`` is reported at its line, and nothing else is reported."""
    expected = expectations(case.read_text(encoding="utf-8"))
    assert expected, f"{rel(case)} has no `# expect: NLxxx` comment"
    assert case.stem.split("_")[0] in {c for c, _ in expected}, "the file name states the code it tests"
    diags, _ = case_diagnostics(rel(case))
    got = {(d.code, d.line) for d in diags}
    assert got == expected
    assert all(d.file == rel(case) for d in diags), "diagnostics of included files stay there"


def test_every_golden_has_a_case():
    orphans = [rel(g) for g in DIAG_DIR.glob("*.stderr") if g.stem not in ALL_NAMES]
    assert not orphans


def _covered_codes(tmp_path) -> dict[str, list[str]]:
    covered: dict[str, list[str]] = {}
    for case in CASES:
        got = {(d.code, d.line) for d in case_diagnostics(case)[0]}
        for code, line in expectations(case.read_text(encoding="utf-8")):
            if (code, line) in got:
                covered.setdefault(code, []).append(case.name)
    for name, (data, expected) in GENERATED.items():
        p = tmp_path / f"{name}.nl"
        p.write_bytes(data)
        got = {(d.code, d.line) for d in analyze_file(p).diagnostics}
        for code, line in expected:
            if (code, line) in got:
                covered.setdefault(code, []).append(name)
    return covered


def test_every_code_has_a_ui_test(tmp_path):
    covered = _covered_codes(tmp_path)
    missing = sorted(set(CODES) - set(covered))
    assert not missing, f"codes without a UI test reporting them at the intended line: {missing}"


def test_ui_severity_matches_rule_table(in_repo):
    for case in CASES:
        for d in case_diagnostics(rel(case))[0]:
            assert d.severity == CODES[d.code].severity, (case.name, d.code)


def test_not_utf8_points_at_the_first_bad_byte(tmp_path):
    p = tmp_path / "latin1.nl"
    p.write_bytes(b"# ok line\nmodel X {\n  # caf\xe9\n}\n")
    [d] = analyze_file(p).diagnostics
    assert (d.code, d.line, d.column) == ("NL002", 3, 8)
    assert "0xe9" in d.message
    assert "UTF-8" in (d.help or "")
    rc, out, err = run_cli(["check", str(p)])
    assert rc == 1 and "NL002" in err and "Traceback" not in err


def test_render_without_source_line_still_names_the_place():
    [d] = analyze_text("model X {\n  dim = @\n}\n", "x.nl").diagnostics
    text = render_text([d], {}, color=False)  # no source text: no excerpt, still file:line:col
    assert text.startswith("error[NL001]: unexpected character `@`\n --> x.nl:2:9")
    assert "|" not in text.split("\n")[1]


def test_render_color_only_when_asked():
    [d] = analyze_text("model X {\n  dim = @\n}\n", "x.nl").diagnostics
    sources = {"x.nl": "model X {\n  dim = @\n}\n"}
    assert "\x1b[" not in render_text([d], sources, color=False)
    assert "\x1b[" in render_text([d], sources, color=True)


# ---- the explain examples of the rule table -----------------------------------------------


@pytest.mark.parametrize("code", [c for c in CODES if CODES[c].wrong is not None])
def test_explain_wrong_example_raises_its_code(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # include examples resolve against an empty folder
    a = analyze_text(CODES[code].wrong, "wrong.nl")
    diags = list(a.diagnostics)
    if is_compile_stage(code):  # a compiler code: the spec checks, `nldsl compile` refuses it
        assert a.ok, [str(d) for d in diags]
        diags += compile_diagnostics(a)
    assert code in {d.code for d in diags}, [str(d) for d in diags]


@pytest.mark.parametrize("code", [c for c in CODES if CODES[c].right is not None])
def test_explain_right_example_checks_clean(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = analyze_text(CODES[code].right, "right.nl")
    assert a.ok and not a.diagnostics, [str(d) for d in a.diagnostics]
    if is_compile_stage(code):
        assert compile_diagnostics(a) == []


def test_only_nl002_has_no_examples():
    # A non-UTF-8 example cannot be written as a Python str; every other code shows both.
    assert [c for c in CODES if CODES[c].wrong is None or CODES[c].right is None] == ["NL002"]


@pytest.mark.parametrize("code", sorted(CODES))
def test_explain_prints_every_code(code):
    rc, out, err = run_cli(["explain", code])
    assert rc == 0, err
    assert out.startswith(f"{code} ({CODES[code].severity}): {CODES[code].title}")
    if CODES[code].wrong is not None:
        assert "Wrong:" in out and "Right:" in out


@pytest.mark.parametrize("arg", ["nl104", "104"])
def test_explain_accepts_lowercase_and_bare_numbers(arg):
    rc, out, _ = run_cli(["explain", arg])
    assert rc == 0 and out.startswith("NL104")


@pytest.mark.parametrize("arg", ["NL999", "XYZ", ""])
def test_explain_unknown_code_exits_2(arg):
    rc, out, err = run_cli(["explain", arg])
    assert rc == 2
    assert "unknown diagnostic code" in err and "Traceback" not in err


def test_codes_are_stable_and_well_formed():
    for code, entry in CODES.items():
        assert entry.code == code
        assert code[:2] == "NL" and code[2:].isdigit() and len(code) == 5
        assert entry.severity in ("error", "warning")
        assert entry.title and entry.explanation


# ---- several errors in one file ------------------------------------------------------------

MULTI = """\
model Many {
  vocab = 256
  dim = 128
  heads = 3
  layers = 2
  context = 512

  level pretrain : steps every 1
  level fast : tokens every 16
  level slow : tokens every 40
  level slower : tokens every 0

  memory mem in fast : linear {
    objective l3
  }
  memory long in slow : mlp(depth=2)

  cms chain : sequential { levels fast, slow }

  transfer fast -> slow : init
  transfer pretrain -> mme : init

  block = residual(rmsnorm -> mem) -> residual(rmsnorm -> long) -> residual(rmsnorm -> chain)
}
"""


def test_all_errors_of_a_file_are_reported_sorted_by_position():
    a = analyze_text(MULTI, "many.nl")
    got = [(d.code, d.line) for d in a.diagnostics]
    assert ("NL204", 4) in got  # dim 128 into 3 heads
    assert ("NL108", 10) in got  # 512 is not a multiple of 40
    assert ("NL102", 11) in got  # period 0
    assert ("NL112", 11) in got  # ... and that level holds nothing (a warning)
    assert ("NL006", 14) in got  # objective l3
    assert ("NL107", 10) in got  # in the CMS chain, 40 is not a multiple of 16
    assert ("NL104", 20) in got  # init from a faster level
    assert ("NL110", 21) in got  # unknown endpoint
    assert len({c for c, _ in got}) >= 7
    positions = [(d.line, d.column) for d in a.diagnostics]
    assert positions == sorted(positions)
    rc, _, err = run_cli_text(MULTI)
    assert rc == 1
    assert err.count("error[") == sum(d.is_error for d in a.diagnostics)


def run_cli_text(text: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "many.nl"
        p.write_text(text, encoding="utf-8")
        return run_cli(["check", str(p)])


def test_json_lists_every_diagnostic():
    a = analyze_text(MULTI, "many.nl")
    rows = json.loads(render_json(a.diagnostics))
    assert [(r["code"], r["line"], r["column"]) for r in rows] == [
        (d.code, d.line, d.column) for d in a.diagnostics]


def test_ui_cases_live_in_the_repository():
    assert DIAG_DIR.is_relative_to(REPO) and len(CASES) >= len(CODES) - len(GENERATED)
