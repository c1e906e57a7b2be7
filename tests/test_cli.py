"""The command line (in-process ``nldsl.cli.main(argv)``) and the Python API contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import networkx as nx
import pytest

import nldsl
from nldsl.cli import main
from tests.nltest_support import ACCEPT, GOLDEN_DIR, REPO, SHIPPED_SPECS, TINY, rel, run_cli

WARNING_SPEC = TINY.replace("  block =", "  memory spare in fast : linear\n  block =")  # NL302
ERROR_SPEC = TINY.replace("every 16", "every 0")  # NL102
UNFORMATTED = TINY.replace("  dim = 64\n", "  dim=64\n").replace("  layers = 2\n", "  layers = 2 ;")


@pytest.fixture
def spec(tmp_path):
    def write(text: str, name: str = "spec.nl"):
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p
    return write


# ---- check: exit codes ----------------------------------------------------------------------


def test_check_clean_exits_0(spec):
    rc, out, err = run_cli(["check", str(spec(TINY))])
    assert rc == 0
    assert "ok: 1 file(s) checked, no problems" in err


def test_check_all_shipped_specs_exits_0(in_repo):
    rc, out, err = run_cli(["check", *[rel(p) for p in SHIPPED_SPECS]])
    assert rc == 0, err
    assert f"ok: {len(SHIPPED_SPECS)} file(s) checked" in err


def test_check_errors_exit_1(spec):
    rc, out, err = run_cli(["check", str(spec(ERROR_SPEC))])
    assert rc == 1
    assert "error[NL102]" in err and "1 error(s), 0 warning(s)" in err


def test_check_warning_exits_0_and_1_with_werror(spec):
    p = spec(WARNING_SPEC)
    rc, _, err = run_cli(["check", str(p)])
    assert rc == 0 and "warning[NL302]" in err
    rc, _, err = run_cli(["check", "--werror", str(p)])
    assert rc == 1 and "warning[NL302]" in err


def test_check_reports_every_file(spec):
    a, b = spec(ERROR_SPEC, "a.nl"), spec(WARNING_SPEC, "b.nl")
    rc, _, err = run_cli(["check", str(a), str(b)])
    assert rc == 1
    assert f"{a}:" in err and f"{b}:" in err


@pytest.mark.parametrize("argv", [
    pytest.param(["check", "no/such/file.nl"], id="missing-file"),
    pytest.param(["check", "."], id="directory"),
    pytest.param(["fmt", "no/such/file.nl"], id="fmt-missing-file"),
    pytest.param(["graph", "no/such/file.nl"], id="graph-missing-file"),
    pytest.param(["check"], id="no-files"),
    pytest.param(["check", "--format", "xml", "x.nl"], id="bad-option-value"),
    pytest.param(["check", "--frobnicate", "x.nl"], id="unknown-option"),
    pytest.param(["frobnicate"], id="unknown-subcommand"),
    pytest.param([], id="no-subcommand"),
    pytest.param(["explain"], id="explain-without-code"),
])
def test_usage_and_io_errors_exit_2(argv, in_repo, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and err.strip()


def test_missing_file_message(in_repo, capsys):
    assert main(["check", "specs/hop.nl"]) == 2
    assert "nldsl: error: specs/hop.nl: no such file" in capsys.readouterr().err


def test_directory_message(in_repo, capsys):
    assert main(["check", "specs"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_unreadable_file_exits_2(spec, capsys):
    p = spec(TINY)
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):  # running as root: permissions do not apply
            pytest.skip("the file stays readable for this user")
        assert main(["check", str(p)]) == 2
        assert "cannot read" in capsys.readouterr().err
    finally:
        p.chmod(0o644)


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "check" in capsys.readouterr().out


def test_version_in_process(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nldsl {nldsl.__version__}"


# ---- check --format json --------------------------------------------------------------------


def test_json_output_fields(spec):
    rc, out, err = run_cli(["check", "--format", "json", str(spec(ERROR_SPEC))])
    assert rc == 1
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    for key in ("code", "severity", "message", "file", "line", "column", "help"):
        assert key in row
    assert (row["code"], row["severity"], row["line"]) == ("NL102", "error", 8)
    assert row["file"].endswith("spec.nl")
    assert isinstance(row["column"], int) and row["column"] >= 1
    assert err == ""  # JSON goes to stdout; nothing human-readable is mixed in


def test_json_output_clean_is_an_empty_list(spec):
    rc, out, _ = run_cli(["check", "--format", "json", str(spec(TINY))])
    assert rc == 0 and json.loads(out) == []


def test_json_output_syntax_error(spec):
    rc, out, _ = run_cli(["check", "--format", "json", str(spec("model M {\n  dim = @\n}\n"))])
    [row] = json.loads(out)
    assert rc == 1 and row["code"] == "NL001" and (row["line"], row["column"]) == (2, 9)


# ---- fmt --------------------------------------------------------------------------------------


def test_fmt_prints_canonical_text(spec):
    rc, out, _ = run_cli(["fmt", str(spec(UNFORMATTED))])
    assert rc == 0 and out == TINY


def test_fmt_check(spec):
    rc, out, err = run_cli(["fmt", "--check", str(spec(UNFORMATTED, "messy.nl"))])
    assert rc == 1 and "would be reformatted" in err and out == ""
    rc, out, err = run_cli(["fmt", "--check", str(spec(TINY, "clean.nl"))])
    assert rc == 0 and out == "" and err == ""


def test_fmt_on_a_spec_with_a_syntax_error_exits_1(spec):
    rc, out, err = run_cli(["fmt", str(spec("model M {\n"))])
    assert rc == 1 and "NL001" in err and out == ""


def test_fmt_keeps_comments(spec):
    text = "# header\nmodel M {  \n  dim=1   # width\n}\n"
    rc, out, _ = run_cli(["fmt", str(spec(text))])
    assert rc == 0 and out == "# header\nmodel M {\n  dim = 1  # width\n}\n"


def test_fmt_resolved_shows_every_default(spec):
    rc, out, err = run_cli(["fmt", "--resolved", str(spec(TINY))])
    assert rc == 0, err
    for default in ("heads = 1", "partial = strict", "level fast : tokens every 16 read anchor reset",
                    "retention none", "read anchor", "momentum none", "signal values",
                    "writes differentiable", "init zeros", "inputs k=static, v=static, q=static"):
        assert default in out, default
    assert nldsl.loads(out).ir == nldsl.loads(TINY).ir


def test_fmt_resolved_refuses_a_spec_with_errors(spec):
    rc, out, err = run_cli(["fmt", "--resolved", str(spec(ERROR_SPEC))])
    assert rc == 1 and out == "" and "NL102" in err


def test_fmt_write_rewrites_in_place(spec):
    p = spec(UNFORMATTED)
    rc, out, err = run_cli(["fmt", "--write", str(p)])
    assert rc == 0 and out == "" and f"reformatted {p}" in err
    assert p.read_text(encoding="utf-8") == TINY
    assert sorted(x.name for x in p.parent.iterdir()) == ["spec.nl"]  # no temporary file left


def test_fmt_write_leaves_formatted_files_alone(spec):
    p = spec(TINY)
    before = p.stat()
    rc, _, err = run_cli(["fmt", "-w", str(p)])
    assert rc == 0 and err == ""
    after = p.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_fmt_write_is_atomic_when_the_rename_fails(spec, monkeypatch):
    p = spec(UNFORMATTED)

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    rc, _, err = run_cli(["fmt", "--write", str(p)])
    assert rc == 2 and "Traceback" not in err
    assert p.read_text(encoding="utf-8") == UNFORMATTED  # the original is intact
    assert sorted(x.name for x in p.parent.iterdir()) == ["spec.nl"]  # and the temp file is gone


# ---- graph ------------------------------------------------------------------------------------



@pytest.mark.parametrize("fmt", ["dot", "mmd"])
def test_graph_text_is_deterministic_and_matches_the_golden(fmt, tmp_path, in_repo):
    first, second = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    assert run_cli(["graph", "specs/hope.nl", "-o", str(first)])[0] == 0
    assert run_cli(["graph", "specs/hope.nl", "-o", str(second)])[0] == 0
    text = first.read_text(encoding="utf-8")
    assert text == second.read_text(encoding="utf-8")
    golden = GOLDEN_DIR / f"hope.{fmt}"
    if ACCEPT:
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), "run with NLDSL_ACCEPT=1 to create the golden"
    assert text == golden.read_text(encoding="utf-8"), "graph output changed; NLDSL_ACCEPT=1 to accept"


def test_graph_dot_does_not_depend_on_hash_seed(in_repo):
    outs = set()
    for seed in ("0", "1", "2"):
        proc = subprocess.run([sys.executable, "-m", "nldsl", "graph", "specs/hope.nl"], cwd=REPO,
                              env=dict(os.environ, PYTHONHASHSEED=seed), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        outs.add(proc.stdout)
    assert len(outs) == 1


def test_graph_dot_to_stdout_by_default(in_repo):
    rc, out, _ = run_cli(["graph", "specs/hope.nl"])
    assert rc == 0 and out.startswith('digraph "Hope" {') and out.endswith("}\n")


def test_graph_format_option_overrides_the_suffix(in_repo):
    rc, out, _ = run_cli(["graph", "specs/hope.nl", "--format", "mermaid"])
    assert rc == 0 and out.startswith("flowchart TB")


def test_graph_png_without_system_graphviz(tmp_path, in_repo, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` binary can be found
    out = tmp_path / "hope.png"
    rc, _, err = run_cli(["graph", "specs/hope.nl", "-o", str(out)])
    assert rc == 0, err
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hope.png"]


@pytest.mark.parametrize("fmt", ["dot", "png"])
def test_graph_writes_through_links_and_into_pipes(fmt, tmp_path, in_repo):
    """The output goes to the file a symlink points to (the link stays), and into a target that
    is no regular file (a pipe, /dev/stdout) directly: the temporary file and rename that keep a
    regular file whole would put a file in the pipe's or the device's place."""
    import threading

    real = tmp_path / f"real.{fmt}"
    real.write_text("old")
    link = tmp_path / f"link.{fmt}"
    link.symlink_to(real)
    rc, _, err = run_cli(["graph", "specs/hope.nl", "-o", str(link), "--format", fmt])
    assert rc == 0, err
    assert link.is_symlink() and real.read_bytes()[:4] in (b"digr", b"\x89PNG")
    fifo = tmp_path / f"pipe.{fmt}"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    rc, _, err = run_cli(["graph", "specs/hope.nl", "-o", str(fifo), "--format", fmt])
    reader.join(timeout=60)
    assert rc == 0, err
    assert got and got[0] == real.read_bytes()
    assert fifo.is_fifo()
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"link.{fmt}", f"pipe.{fmt}", f"real.{fmt}"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device every write to fails)")
def test_graph_output_errors_and_suffixless_targets(in_repo):
    rc, _, err = run_cli(["graph", "specs/hope.nl", "-o", "/dev/full"])
    assert rc == 2 and "cannot write /dev/full: No space left on device" in err
    assert not os.path.isfile("/dev/full")  # still the device
    rc, _, err = run_cli(["graph", "specs/hope.nl", "-o", "/dev/null"])  # no suffix: DOT
    assert rc == 0 and "wrote /dev/null" in err and not os.path.isfile("/dev/null")


def test_compile_into_a_path_it_cannot_create(tmp_path, in_repo):
    (tmp_path / "afile").write_text("x")
    for out, why in ((tmp_path / "afile", "exists and is not a directory"),
                     (tmp_path / "afile" / "sub", "cannot write (Not a directory)")):
        rc, _, err = run_cli(["compile", "specs/deltanet.nl", "-o", str(out)])
        assert rc == 2 and why in err and "internal error" not in err, err


def test_graph_named_optimizer(tmp_path, in_repo):
    rc, out, _ = run_cli(["graph", "specs/adam.nl", "--name", "AdamW"])
    assert rc == 0 and out.startswith('digraph "AdamW"')


@pytest.mark.parametrize("argv", [
    pytest.param(["graph", "specs/hope.nl", "-o", "out.svg"], id="unknown-format"),
    pytest.param(["graph", "specs/hope.nl", "--format", "png"], id="png-to-stdout"),
    pytest.param(["graph", "specs/hope.nl", "-o", "no/such/dir/hope.dot"], id="missing-directory"),
    pytest.param(["graph", "specs/hope.nl", "--name", "Nope"], id="unknown-name"),
])
def test_graph_usage_errors_exit_2(argv, in_repo):
    rc, _, err = run_cli(argv)
    assert rc == 2 and "nldsl: error:" in err


def test_graph_of_a_spec_with_errors_exits_1(spec):
    rc, out, err = run_cli(["graph", str(spec(ERROR_SPEC))])
    assert rc == 1 and out == "" and "NL102" in err


# ---- subprocess: entry points, and no torch ---------------------------------------------------


def test_python_m_nldsl_version():
    proc = subprocess.run([sys.executable, "-m", "nldsl", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"nldsl {nldsl.__version__}"


def test_console_script_check():
    script = os.path.join(os.path.dirname(sys.executable), "nldsl")
    if not os.path.exists(script):
        pytest.skip("the nldsl console script is not installed next to this interpreter")
    proc = subprocess.run([script, "check", "specs/hope.nl"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_import_and_check_do_not_import_torch():
    code = ("import nldsl, sys; from nldsl.cli import main; rc = main(['check', 'specs/hope.nl']); "
            "print('torch' in sys.modules, rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False 0"


def test_fmt_and_graph_do_not_import_torch():
    code = ("import sys; from nldsl.cli import main; "
            "main(['fmt', '--resolved', 'specs/hope.nl']); main(['graph', 'specs/hope.nl']); "
            "sys.stderr.write(str('torch' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip().endswith("False"), proc.stderr


def test_check_is_fast(in_repo):
    """`nldsl check` on a spec takes well under a second (here: the parse+check part)."""
    import time

    from nldsl.spec import analyze_file
    from nldsl.syntax.parser import get_parser

    get_parser()  # built once per process (and cached on disk between processes)
    for path in SHIPPED_SPECS:
        start = time.perf_counter()
        analyze_file(rel(path))
        assert time.perf_counter() - start < 1.0, rel(path)


# ---- the Python API contract ---------------------------------------------------------------------


def test_load_returns_a_spec(in_repo):
    s = nldsl.load("specs/hope.nl")
    assert isinstance(s, nldsl.Spec)
    assert [m.name for m in s.models] == ["Hope"]
    assert s.diagnostics == []  # warnings only; hope has none


def test_check_returns_diagnostics(spec):
    assert nldsl.check(spec(TINY)) == []
    diags = nldsl.check(spec(ERROR_SPEC, "bad.nl"))
    assert [d.code for d in diags] == ["NL102"]
    assert all(isinstance(d, nldsl.Diagnostic) for d in diags)


def test_check_does_not_raise_on_bad_specs(spec):
    assert nldsl.check(spec("\x00 not a spec {{{")) != []


def test_load_raises_spec_error_with_diagnostics(spec):
    with pytest.raises(nldsl.SpecError) as info:
        nldsl.load(spec(ERROR_SPEC))
    e = info.value
    assert [d.code for d in e.diagnostics] == ["NL102"]
    assert "1 error(s)" in str(e)
    assert "error[NL102]" in e.render()


def test_load_keeps_warnings_on_the_spec(spec):
    s = nldsl.load(spec(WARNING_SPEC))
    assert [d.code for d in s.diagnostics] == ["NL302"]


def test_diagnostic_fields(spec):
    [d] = nldsl.check(spec(ERROR_SPEC))
    assert (d.code, d.severity, d.line) == ("NL102", "error", 8)
    assert d.file.endswith("spec.nl") and d.column == 29
    assert d.message
    assert d.help is None or isinstance(d.help, str)
    assert d.is_error
    assert str(d) == f"{d.file}:8:29: error[NL102]: {d.message}"
    with pytest.raises(Exception):
        d.code = "NL000"  # frozen


def test_level_graph_contract(in_repo):
    g = nldsl.load("specs/hope.nl").level_graph()
    assert isinstance(g, nx.DiGraph)
    levels = {n: a for n, a in g.nodes(data=True) if a["kind"] == "level"}
    memories = {n: a for n, a in g.nodes(data=True) if a["kind"] == "memory"}
    assert set(levels) == {f"level:{n}" for n in ("pretrain", "gen", "fast", "cms1", "cms2", "cms3")}
    for a in list(levels.values()) + list(memories.values()):
        for key in ("clock", "period", "frequency"):
            assert key in a
        assert a["frequency"] == pytest.approx(1 / a["period"])
    assert levels["level:cms3"]["period"] == 2048 and levels["level:cms3"]["clock"] == "tokens"
    assert memories["memory:titans"]["level"] == "fast"
    kinds = {d["kind"] for _, _, d in g.edges(data=True)}
    assert {"holds", "init", "generate", "condition", "flow"} <= kinds
    assert g.edges["level:pretrain", "level:fast"]["kind"] == "init"
    assert g.edges["level:gen", "level:gen"]["self_referential"] is True


def test_level_graph_of_an_optimizer(in_repo):
    s = nldsl.load("specs/m3.nl")
    g = s.level_graph("M3")
    assert g.graph["kind"] == "optimizer"
    assert g.nodes["level:slow"]["period"] == 8 and g.nodes["level:slow"]["clock"] == "steps"
    with pytest.raises(KeyError):
        s.level_graph("Nope")


def test_loads_text(in_repo):
    assert nldsl.loads(TINY).ir.models[0].name == "Tiny"
    with pytest.raises(nldsl.SpecError):
        nldsl.loads(ERROR_SPEC)


def test_public_names():
    for name in ("Diagnostic", "Spec", "SpecError", "check", "load", "loads", "__version__"):
        assert hasattr(nldsl, name)
