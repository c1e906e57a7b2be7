"""Shared helpers of the front-end tests (paths, the spec corpus, running the CLI in-process).

Kept apart from ``conftest.py`` so that test modules can import the constants they need at
collection time (for ``pytest.mark.parametrize``).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SPECS_DIR = REPO / "specs"
DIAG_DIR = TESTS / "diagnostics"
CORPUS_DIR = TESTS / "corpus"
GOLDEN_DIR = TESTS / "golden"

SHIPPED_SPECS = sorted(SPECS_DIR.glob("*.nl"))

ACCEPT = os.environ.get("NLDSL_ACCEPT") == "1"

EXPECT_RE = re.compile(r"#\s*expect:\s*(NL\d{3}(?:\s*,\s*NL\d{3})*)")


def rel(path: Path) -> str:
    """A repository-relative path with forward slashes (how goldens and ids name files)."""
    return path.resolve().relative_to(REPO).as_posix()


def test_spec_files() -> list[Path]:
    """Every ``.nl`` file of the front end's tests (diagnostics cases, corpus, goldens), sorted."""
    out = []
    for folder in (DIAG_DIR, CORPUS_DIR, GOLDEN_DIR):
        out += folder.rglob("*.nl")
    out += TESTS.glob("*.nl")
    return sorted(out)


test_spec_files.__test__ = False  # not a test, despite the name


def all_spec_files() -> list[Path]:
    return SHIPPED_SPECS + test_spec_files()


def expectations(text: str) -> set[tuple[str, int]]:
    """``(code, line)`` for every ``# expect: NLxxx[, NLyyy]`` comment of a spec."""
    out = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = EXPECT_RE.search(line)
        if m:
            for code in re.findall(r"NL\d{3}", m.group(1)):
                out.add((code, lineno))
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Runs ``nldsl.cli.main(argv)`` in-process; returns (exit code, stdout, stderr)."""
    from nldsl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # main() should return, but an escape must not kill the run
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


# ---- the diagnostics UI cases ----------------------------------------------------------------

UI_CASES = sorted(DIAG_DIR.glob("*.nl"))  # include/ holds helper files, not cases

# Cases whose spec is written from bytes at test time: name -> (bytes, {(code, line)}).
# NL002 needs a file that is not UTF-8; it is generated rather than committed as binary.
UI_GENERATED = {
    "NL002_not_utf8": (
        "# Optimiser for the caf\u00e9 demo, saved as Latin-1 by an old editor.\n"
        "optimizer Plain {\n"
        "  lr = 0.1  # r\u00e9glage\n"
        "  level step : steps every 1\n"
        "  memory m in step : elementwise { objective dot }\n"
        "  update = lr * m\n"
        "}\n".encode("latin-1"),
        {("NL002", 1)},
    ),
}


def is_compile_stage(code_or_name: str) -> bool:
    """Codes NL4xx come from the compiler (``nldsl compile``), not from ``nldsl check``."""
    return code_or_name.startswith("NL4")


def compile_diagnostics(analysis) -> list:
    """What ``nldsl compile`` reports for a spec that checks (the compiler's own codes)."""
    from nldsl.codegen import generate
    from nldsl.diagnostics import SpecError

    try:
        generate(analysis)
    except SpecError as e:
        return list(e.diagnostics)
    return []


def case_diagnostics(path) -> tuple[list, dict]:
    """The diagnostics of a UI case: ``nldsl check``'s, and for an NL4xx case that checks,
    the compiler's (torch is not needed to plan the generated code)."""
    from nldsl.spec import analyze_file

    a = analyze_file(path)
    diags = list(a.diagnostics)
    if is_compile_stage(Path(path).name) and a.ok:
        diags += compile_diagnostics(a)
    return diags, a.sources


def render_case(path: str) -> str:
    """Checks ``path`` (relative to the current directory) and renders it as the CLI would."""
    from nldsl.diagnostics import render_text

    diags, sources = case_diagnostics(path)
    return render_text(diags, sources, color=False) + "\n"


def render_all_cases(scratch: str) -> dict[str, str]:
    """Renders every UI case, named ``tests/diagnostics/NAME.nl`` as in the repository.

    Generated cases are written under ``scratch`` with the same relative path.
    """
    old = os.getcwd()
    out = {}
    try:
        os.chdir(REPO)
        for case in UI_CASES:
            out[case.stem] = render_case(rel(case))
        root = Path(scratch)
        for name, (data, _) in UI_GENERATED.items():
            target = root / "tests" / "diagnostics" / f"{name}.nl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            os.chdir(root)
            out[name] = render_case(f"tests/diagnostics/{name}.nl")
    finally:
        os.chdir(old)
    return out


def render_all_cases_in_subprocess(scratch: str, hash_seed: int) -> dict[str, str]:
    """``render_all_cases`` in a fresh interpreter with a fixed ``PYTHONHASHSEED``.

    Golden output must not depend on set/dict hash order, so goldens are rendered under a
    fixed seed and a test compares several seeds.
    """
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from nltest_support import render_all_cases; "
            "print(json.dumps(render_all_cases(sys.argv[2])))")
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS), scratch], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# A small valid model used by several tests (paper terms: one outer level, one in-context level).
TINY = """\
model Tiny {
  vocab = 256
  dim = 64
  layers = 2
  context = 64

  level outer : steps every 1
  level fast : tokens every 16

  memory mem in fast : linear {
    objective l2
  }

  block = residual(rmsnorm -> mem)
}
"""


# Whole-file shapes the grammar allows that a committed file cannot show well (an empty file,
# no final newline, a leading separator). Part of the grammar-coverage corpus.
FILE_SHAPES = {
    "empty": "",
    "only-comment": "\n# only a comment\n",
    "no-final-newline": "model A {}",
    "leading-semicolon": ";model A {}",
    "two-items-no-final-newline": "model A {}\nmodel B {}",
    "leading-semicolon-two-items": ";model A {}\nmodel B {}",
    "crlf": "model A {\r\n  dim = 1\r\n}\r\n",
}
