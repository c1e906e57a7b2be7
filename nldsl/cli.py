"""The ``nldsl`` command line.

Exit codes: 0 clean, 1 diagnostics (or a failed ``fmt --check``), 2 usage, I/O or internal
error. Set ``NLDSL_DEBUG=1`` to see the Python traceback of an internal error.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _color(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ


def _analyze(path: str):
    from nldsl.spec import analyze_file

    try:
        return analyze_file(path)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a spec file") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None


def _print_diagnostics(diags, sources, fmt: str) -> None:
    from nldsl.diagnostics import render_json, render_text

    if fmt == "json":
        print(render_json(diags))
    elif diags:
        print(render_text(diags, sources, color=_color(sys.stderr)), file=sys.stderr)


def cmd_check(args) -> int:
    all_diags, sources = [], {}
    for path in args.files:
        a = _analyze(path)
        all_diags += a.diagnostics
        sources.update(a.sources)
    failing = [d for d in all_diags if d.is_error or (args.werror and d.severity == "warning")]
    _print_diagnostics(all_diags, sources, args.format)
    if args.format == "text" and not all_diags:
        print(f"ok: {len(args.files)} file(s) checked, no problems", file=sys.stderr)
    return EXIT_DIAGNOSTICS if failing else EXIT_OK


def _formatted(path: str, resolved: bool) -> tuple[str | None, object]:
    from nldsl.ir.resolved import resolved_tree
    from nldsl.syntax.printer import format_file

    a = _analyze(path)
    if a.ast is None or (resolved and not a.ok):
        return None, a
    tree = resolved_tree(a.ir, a.ast) if resolved else a.ast
    return format_file(tree), a


def cmd_fmt(args) -> int:
    status = EXIT_OK
    for path in args.files:
        text, a = _formatted(path, args.resolved)
        if text is None:
            _print_diagnostics(a.diagnostics, a.sources, "text")
            status = EXIT_DIAGNOSTICS
            continue
        if args.check:
            if text != a.text:
                print(f"{path}: would be reformatted", file=sys.stderr)
                status = EXIT_DIAGNOSTICS
        elif args.write:
            if text != a.text:
                _atomic_write(Path(path), text)
                print(f"reformatted {path}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    return status


def _atomic_write(path: Path, data: str | bytes) -> None:
    """:func:`nldsl.files.write_atomic`, its failure a usage error naming the file."""
    from nldsl.files import write_atomic

    try:
        write_atomic(path, data)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_graph(args) -> int:
    from nldsl.graph import build
    from nldsl.graph_render import to_dot, to_mermaid, to_png

    a = _analyze(args.file)
    if not a.ok:
        _print_diagnostics(a.diagnostics, a.sources, "text")
        return EXIT_DIAGNOSTICS
    owners = list(a.ir.models) + list(a.ir.optimizers)
    if args.name:
        owners = [o for o in owners if o.name == args.name]
        if not owners:
            raise UsageError(f"{args.file} has no model or optimizer named {args.name!r}")
    if not owners:
        raise UsageError(f"{args.file} defines no model or optimizer")
    g = build(owners[0])
    out = args.output
    fmt = args.format or (Path(out).suffix.lstrip(".") if out else "") or "dot"  # no suffix (/dev/stdout): DOT
    fmt = {"mermaid": "mmd"}.get(fmt, fmt)
    if fmt not in ("dot", "mmd", "png"):
        raise UsageError(f"unknown graph format {fmt!r}: use .dot, .mmd or .png")
    if fmt == "png":
        if not out:
            raise UsageError("PNG output needs -o FILE.png")
        target = Path(out)
        if not target.parent.exists():
            raise UsageError(f"{target.parent}: no such directory")
        _atomic_write(target, to_png(g))
        print(f"wrote {out}", file=sys.stderr)
        return EXIT_OK
    text = to_dot(g) if fmt == "dot" else to_mermaid(g)
    if out:
        target = Path(out)
        if not target.parent.exists():
            raise UsageError(f"{target.parent}: no such directory")
        _atomic_write(target, text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_compile(args) -> int:
    from nldsl.diagnostics import SpecError

    try:
        from nldsl.codegen import write_package
    except ImportError as e:  # torch or jinja2 missing
        raise UsageError(f"compiling needs {e.name}: install it (torch: pip install torch==2.13.0)") from None
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    try:
        _analyze(args.file)  # readable? (a usage error, not a diagnostic)
        paths = write_package(args.file, out)
    except SpecError as e:
        _print_diagnostics(e.diagnostics, e.sources or {}, "text")
        return EXIT_DIAGNOSTICS
    except OSError as e:  # no permission, a file where a folder must be, a full disk
        raise UsageError(f"{out}: cannot write ({e.strerror or e})") from None
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return EXIT_OK


def cmd_explain(args) -> int:
    from nldsl.checks.codes import CODES, explain

    code = args.code.upper()
    if code.isdigit():
        code = f"NL{int(code):03d}"
    if code not in CODES:
        from nldsl.diagnostics import suggest

        raise UsageError(f"unknown diagnostic code {args.code!r}; {suggest(code, CODES, 'codes')}")
    print(explain(code))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from nldsl import __version__

    p = argparse.ArgumentParser(prog="nldsl", description="Compile nested systems of associative memories.")
    p.add_argument("--version", action="version", version=f"nldsl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check", help="parse and check spec files")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--format", choices=("text", "json"), default="text")
    c.add_argument("--werror", action="store_true", help="treat warnings as errors")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fmt", help="print specs in canonical form")
    f.add_argument("files", nargs="+", metavar="FILE")
    f.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    f.add_argument("--write", "-w", action="store_true", help="rewrite files in place")
    f.add_argument("--resolved", action="store_true", help="write out every default")
    f.set_defaults(func=cmd_fmt)

    g = sub.add_parser("graph", help="draw the level graph (DOT, Mermaid or PNG)")
    g.add_argument("file", metavar="FILE")
    g.add_argument("-o", "--output", help="output file: .dot, .mmd or .png (default: DOT on stdout)")
    g.add_argument("--format", choices=("dot", "mmd", "mermaid", "png"))
    g.add_argument("--name", help="the model or optimizer to draw (default: the first)")
    g.set_defaults(func=cmd_graph)

    k = sub.add_parser("compile", help="generate the PyTorch package of a spec")
    k.add_argument("file", metavar="FILE")
    k.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    k.set_defaults(func=cmd_compile)

    from nldsl import ablate_cmd

    ablate_cmd.build_subparser(sub)

    from nldsl import run_cmd

    run_cmd.build_subparser(sub)

    from nldsl import sample_cmd

    sample_cmd.build_subparser(sub)

    e = sub.add_parser("explain", help="explain a diagnostic code")
    e.add_argument("code", metavar="CODE")
    e.set_defaults(func=cmd_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as e:
        print(f"nldsl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nldsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # an internal error: say so plainly, never a raw traceback
        if os.environ.get("NLDSL_DEBUG"):
            traceback.print_exc()
        print(f"nldsl: internal error: {type(e).__name__}: {e}\n"
              "this is a bug in nldsl; set NLDSL_DEBUG=1 to see the traceback", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
