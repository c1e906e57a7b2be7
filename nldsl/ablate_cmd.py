"""``nldsl ablate SPEC [@name ...] [OVERRIDE ...] [options]``: variants of a spec, each checked.

``@name`` picks a named ablation of the spec (``@all``: every one; ``@base``: the spec as it
is); overrides are a Hydra subset (``path=value``, ``path=a,b,c``, ``path=range(1,9,2)``,
``~path``, ``+path=value``; see ``nldsl/sweep.py`` and ``docs/ablations.md``). The plan is the
cartesian product in command-line order, printed before anything is written; every variant is
built on the syntax tree (``nldsl.ablate.apply``) and checked by the full checker.

Exit codes: 0 every variant checks (and was written, or run); 1 a variant does not check (or
its run failed); 2 usage: a bad override, an unknown ablation, an unreadable spec, an
unwritable output folder, or ``--run`` without the training command.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from nldsl import ablate, sweep
from nldsl.sweep import Override, OverrideError, Variant
from nldsl.syntax import ast as A

EXIT_OK, EXIT_DIAGNOSTICS, EXIT_USAGE = 0, 1, 2
MAX_VARIANTS = 1000

EPILOG = """\
examples:
  nldsl ablate specs/hope.nl --dry-run             list (and check) the spec's named ablations
  nldsl ablate specs/hope.nl @no_dgd --show-diff   the settings a variant changes
  nldsl ablate specs/titans.nl mem.conv=2,4 fast.every=8,16,32 -o out   a 2x3 sweep
  nldsl ablate specs/hope.nl 'titans.rule=gd,omega(window=4)' ~chain
  nldsl ablate specs/titans.nl 'mem.lr=range(0.01,0.05,0.01)' --dry-run
  nldsl ablate specs/hope.nl @base @no_cms @no_dgd --run --task mqar --steps 200
Overrides are not Python: values are written as in a spec. Everything after --run is passed
to `nldsl run` for every variant.
"""


class _Usage(Exception):
    def __init__(self, message: str, help: str | None = None, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.help = help
        self.details = details or []


# ---- command line --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="the base spec (.nl)")
    p.add_argument("items", nargs="*", metavar="@NAME|OVERRIDE",
                   help="named ablations (@no_dgd, @all, @base) and overrides (path=a,b ~path +path=v)")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: ablations/SPEC-STEM)")
    p.add_argument("--dry-run", action="store_true", help="print and check the plan; write nothing")
    p.add_argument("--show-diff", action="store_true",
                   help="print the flattened `path = value` lines each variant changes")
    p.add_argument("--keep-going", action="store_true",
                   help="write (and run) the variants that check even if others do not")
    p.add_argument("--name", metavar="NAME", help="the model or optimizer to edit, when the spec has several")
    p.add_argument("--max-variants", type=int, default=MAX_VARIANTS, metavar="N",
                   help=f"refuse plans larger than this (default {MAX_VARIANTS})")
    p.add_argument("--run", nargs=argparse.REMAINDER, metavar="RUN_OPTION",
                   help="train every variant with `nldsl run`, passing it the options that follow; "
                        "then write summary.md, summary.csv and summary.png")


def _with_run_tail(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Everything after ``--run`` belongs to ``nldsl run``; before it, options and positionals
    may come in any order (argparse alone takes positionals in one run only)."""
    plain = argparse.ArgumentParser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        if getattr(parser, "_nldsl_inside", False):
            return plain(parser, args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        run = None
        if "--run" in args:
            i = args.index("--run")
            args, run = args[:i], args[i + 1:]
        parser._nldsl_inside = True
        try:
            ns, extra = parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser._nldsl_inside = False
        ns.run = run
        return ns, extra

    parser.parse_known_args = parse_known_args
    return parser


DESCRIPTION = ("Generate variants of a spec (its named ablations, and sweeps of command-line "
               "overrides), check each one with the full checker, and write each as a spec of its own.")


def build_subparser(sub) -> argparse.ArgumentParser:
    """Registers ``ablate`` on the CLI's subparsers (``sub = parser.add_subparsers(...)``)."""
    p = sub.add_parser("ablate", help="generate and check variants of a spec (named ablations, sweeps)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main_ablate)
    return _with_run_tail(p)


def run(argv: list[str] | None = None) -> int:
    """``nldsl ablate`` on its own: parses ``argv`` and returns the exit code."""
    p = argparse.ArgumentParser(prog="nldsl ablate", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    _with_run_tail(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return main_ablate(args)
    except Exception as e:  # the same promise as nldsl.cli: never a raw traceback
        if os.environ.get("NLDSL_DEBUG"):
            raise
        print(f"nldsl: internal error: {type(e).__name__}: {e}\n"
              "this is a bug in nldsl; set NLDSL_DEBUG=1 to see the traceback", file=sys.stderr)
        return EXIT_USAGE


def main_ablate(args) -> int:
    """The ``nldsl ablate`` command; returns the exit code."""
    try:
        return _main(args)
    except _Usage as e:
        for d in e.details:
            print(d + "\n", file=sys.stderr)
        print(f"nldsl: error: {e.message}", file=sys.stderr)
        if e.help:
            print(f"  = help: {e.help}", file=sys.stderr)
        return EXIT_USAGE


# ---- the base spec -------------------------------------------------------------------------


@dataclass
class Base:
    path: Path
    file: str  # as given, the name diagnostics use
    text: str
    analysis: object
    plain: A.File  # without its ablations
    ablations: dict[str, A.Ablation]
    target: str | None
    sha256: str
    _flat: list | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def stack(self) -> tuple[str, ...]:
        return (str(self.path.resolve()),)

    def flat(self):
        if self._flat is None:
            from nldsl.ir.resolved import resolved_tree

            self._flat = sweep.flatten(resolved_tree(self.analysis.ir, self.plain))
        return self._flat


def _load_base(spec: str, target: str | None) -> Base | object:
    """The checked base spec; an Analysis (with errors) when it does not check."""
    from nldsl.spec import analyze_file, analyze_text

    p = Path(spec)
    try:
        if p.is_dir():
            raise _Usage(f"{spec}: is a directory, not a spec file")
        data = p.read_bytes()
    except FileNotFoundError:
        raise _Usage(f"{spec}: no such file") from None
    except OSError as e:
        raise _Usage(f"{spec}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return analyze_file(p)  # reports the undecodable byte
    a = analyze_text(text, spec, base=p.parent, _stack=(str(p.resolve()),), check_ablations=False)
    if not a.ok:
        return a
    plain = ablate.without_ablations(a.ast)
    owners = [it.name for it in plain.items if isinstance(it, (A.Model, A.Optimizer))]
    if target is not None and target not in owners:
        from nldsl.diagnostics import suggest

        raise _Usage(f"{spec} has no model or optimizer named `{target}`", help=suggest(target, owners, "names"))
    if target is None and len(owners) != 1:
        if not owners:
            raise _Usage(f"{spec} defines no model or optimizer to ablate")
        raise _Usage(f"{spec} defines {len(owners)} models and optimizers; choose the one to edit",
                     help=f"add --name {owners[0]} (one of: {', '.join(owners)})")
    ablations = {it.name: it for it in a.ast.items if isinstance(it, A.Ablation)}
    return Base(p, spec, text, a, plain, ablations, target, hashlib.sha256(data).hexdigest())


# ---- selectors and overrides -----------------------------------------------------------------


def _selectors(base: Base, items: list[str]) -> tuple[list[str | None], list[Override], list[OverrideError]]:
    from nldsl.diagnostics import suggest

    names: list[str | None] = []
    overrides: list[Override] = []
    errors: list[OverrideError] = []
    known = list(base.ablations)
    for item in items:
        if item.startswith("@"):
            name = item[1:]
            if name == "all":
                if not known:
                    errors.append(OverrideError(item, f"{base.file} has no named ablations", 2, len(item) + 1,
                                                help="write one in the spec: `ablation NAME { path = value }`"))
                names += known
            elif name == "base":
                names.append(None)
            elif name in base.ablations:
                names.append(name)
            else:
                what = "named ablations" if known else None
                help = suggest(name, known + ["all", "base"], "ablations") if known else \
                    "the spec has no named ablations; `@base` is the spec as it is"
                errors.append(OverrideError(item, f"{base.file} has no ablation `{name}`", 2, len(item) + 1,
                                            help=help if what else help))
            continue
        try:
            overrides.append(sweep.parse_override(item, len(overrides) + 1))
        except OverrideError as e:
            errors.append(e)
            overrides.append(None)  # keep the numbering of the others
    overrides = [o for o in overrides if o is not None]
    seen: dict[str, Override] = {}
    for ov in overrides:
        if ov.key in seen:
            first = seen[ov.key]
            c0, c1 = ov.path_columns
            errors.append(OverrideError(ov.text, f"`{ov.key}` is already overridden by `{first.text}`", c0, c1,
                                        help=f"give one override with several values: `{ov.key}=a,b`"))
        seen[ov.key] = ov
    unique: list[str | None] = []
    for n in names:
        if n not in unique:
            unique.append(n)
    return unique, overrides, errors


def _check_paths(base: Base, overrides: list[Override]) -> list[OverrideError]:
    """Each override alone on the base: paths that name nothing, keys that are not set."""
    errors = []
    for ov in overrides:
        e = sweep.unknown_segment(base.plain, ov, base.target)
        if e is None:
            choice = ov.values[0]
            try:
                sweep.apply_edits(base.plain, [ov.edit(choice)], base.target)
            except ablate.EditError as err:
                e = sweep.edit_error(ov, err, choice)
        if e is not None:
            e.message = f"could not {sweep.VERBS[ov.op]} `{ov.key}`: {e.message}"
            errors.append(e)
    return errors


# ---- building and checking variants ----------------------------------------------------------


def _build(base: Base, v: Variant) -> None:
    from nldsl.diagnostics import Diagnostic
    from nldsl.spec import analyze_ast

    tree = base.plain
    steps = []
    if v.ablation:
        steps += [(None, None, e) for e in ablate.ablation_edits(base.ablations[v.ablation])]
    steps += [(ov, c, ov.edit(c)) for ov, c in v.items]
    for ov, choice, edit in steps:
        try:
            tree = sweep.apply_edits(tree, [edit], base.target)
        except ablate.EditError as e:
            if ov is not None:
                err = sweep.unknown_segment(tree, ov, base.target) or sweep.edit_error(ov, e, choice)
                after = f" (after `@{v.ablation}`)" if v.ablation else ""
                err.message = f"could not {sweep.VERBS[ov.op]} `{ov.key}`{after}: {err.message}"
                v.errors.append(err)
            else:
                v.errors.append(Diagnostic.at("NL305", f"ablation `{v.ablation}`: {e.message}",
                                              e.span or base.ablations[v.ablation].spans.get("name"),
                                              help=e.help, file=base.file))
            return
    v.tree = tree
    a = analyze_ast(tree, base.text, base.file, base=base.folder, _stack=base.stack, check_ablations=False)
    v.analysis = a
    v.errors += [d for d in a.diagnostics if d.is_error]
    if not v.errors:  # what `nldsl compile` would refuse (NL401), known without building anything
        from nldsl.codegen import generate
        from nldsl.diagnostics import SpecError

        try:
            generate(a)
        except SpecError as e:  # a checked spec: only the compiler's own refusals are left
            v.gaps = list(e.diagnostics)


def _override_diag(d, by_index: dict[int, Override]) -> OverrideError | None:
    """A checker diagnostic about an override's value, shown under the override."""
    m = re.fullmatch(r"<override (\d+)>", d.file or "")
    if not m or int(m.group(1)) not in by_index:
        return None
    ov = by_index[int(m.group(1))]
    choice = next((c for c in ov.choices if c.column <= d.column < c.end_column), None)
    msg = d.message
    if choice is not None:
        msg = msg.replace("`None`", f"`{choice.text}`")
    help = d.help
    if help and help.startswith("expected one of the parameters") and "number" in msg:
        help = f"`{ov.key}` expects a number, or {help[len('expected '):]}"
    elif help and help.startswith("expected "):
        help = f"`{ov.key}` expects " + help[len("expected "):]
        for name, form in sweep.CALL_FORMS.items():
            help = help.replace(f"`{name}`", f"`{form}`")
    return OverrideError(ov.text, msg, d.column, d.end_column or d.column + 1, help, code=d.code)


def _render_errors(base: Base, v: Variant, by_index: dict[int, Override], diagnostics=None) -> str:
    """The variant's errors (or the given ``diagnostics`` of it) rendered at the text they are about."""
    from nldsl.diagnostics import render_one

    sources = dict(base.analysis.sources)
    if v.analysis is not None:
        sources.update(v.analysis.sources)
    out = []
    for e in v.errors if diagnostics is None else diagnostics:
        if isinstance(e, OverrideError):
            out.append(e.render())
            continue
        oe = _override_diag(e, by_index)
        if oe is not None:
            out.append(oe.render())
        elif e.end_line is None and (e.line, e.column) == (1, 1):  # a node an edit made: no place
            text = f"{e.severity}[{e.code}]: {e.message}"
            for n in e.notes:
                text += f"\n  = note: {n}"
            if e.help:
                text += f"\n  = help: {e.help}"
            out.append(text)
        else:
            out.append(render_one(e, sources.get(e.file)))
    return "\n\n".join(out)


def _diff(base: Base, v: Variant) -> list[str]:
    from nldsl.ir.resolved import resolved_tree

    return sweep.diff_flattened(base.flat(), sweep.flatten(resolved_tree(v.analysis.ir, v.tree)))


# ---- writing -------------------------------------------------------------------------------


@dataclass
class _Include:
    rel: str  # as written in the spec
    copy: list[tuple[str, bytes]] = field(default_factory=list)  # (path under the variant folder, data)
    target: Path | None = None  # when not copied: the original file


def _closure(analysis) -> list[Path]:
    out = [Path(analysis.file).resolve()]
    for sub in analysis.included.values():
        out += _closure(sub)
    return out


def _includes(base: Base) -> list[_Include]:
    """Included files under the spec's folder are copied next to each variant (keeping their
    relative paths); an include that reaches outside it is rewritten to point at the original."""
    folder = base.folder.resolve()
    out = []
    for rel, sub in base.analysis.included.items():
        files = list(dict.fromkeys(_closure(sub)))
        if all(f.is_relative_to(folder) for f in files):
            out.append(_Include(rel, [(f.relative_to(folder).as_posix(), f.read_bytes()) for f in files]))
        else:
            out.append(_Include(rel, target=Path(sub.file).resolve()))
    return out


def _rewrite_includes(tree: A.File, paths: dict[str, str]) -> A.File:
    if not paths:
        return tree
    items = []
    for it in tree.items:
        if isinstance(it, A.Include) and it.path in paths:
            it = replace(it, path=paths[it.path])
        elif isinstance(it, A.Model):
            stmts = tuple(replace(s, expr=replace(s.expr, value=paths[s.expr.value]))
                          if isinstance(s, A.UseOptimizer) and isinstance(s.expr, A.String)
                          and s.expr.value in paths else s for s in it.stmts)
            it = replace(it, stmts=stmts)
        items.append(it)
    return replace(tree, items=tuple(items))


def _with_header(tree: A.File, lines: list[str]) -> A.File:
    if not tree.items:
        return tree
    first = tree.items[0]
    trivia = replace(first.trivia, comments=tuple(f"# {x}" for x in lines) + ("#",) + first.trivia.comments)
    return replace(tree, items=(replace(first, trivia=trivia),) + tree.items[1:])


def _atomic_write(path: Path, data: str | bytes) -> None:
    from nldsl.cli import _atomic_write as write

    write(path, data)


def _writable(out: Path) -> None:
    """Exit 2 (before anything is written) when ``out`` cannot be made or written."""
    p = out
    while not p.exists() and p != p.parent:
        if p.is_symlink():
            raise _Usage(f"cannot write to {out}: {p} is a broken link")
        p = p.parent
    if not p.is_dir():
        raise _Usage(f"cannot write to {out}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise _Usage(f"cannot write to {out}: {p} is not writable")


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _write(base: Base, variants: list[Variant], out: Path, argv_items: list[str]) -> dict:
    from nldsl import __version__
    from nldsl.ir.resolved import resolved_tree
    from nldsl.syntax.printer import format_file

    includes = _includes(base)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in variants:
        row = {"index": v.index, "name": v.dirname.split("_", 1)[1], "ablation": v.ablation,
               "overrides": v.overrides, "label": v.label, "valid": v.ok, "base_sha256": base.sha256}
        if not v.ok:
            row.update(directory=None, sha256=None, errors=[_one_line(e) for e in v.errors])
            rows.append(row)
            continue
        vdir = out / v.dirname
        vdir.mkdir(exist_ok=True)
        paths = {}
        for inc in includes:
            if inc.target is not None:
                paths[inc.rel] = Path(os.path.relpath(inc.target, vdir.resolve())).as_posix()
            for rel, data in inc.copy:
                dest = vdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(dest, data)
        tree = _rewrite_includes(v.tree, paths)
        header = [f"nldsl ablate: variant {v.dirname} of {base.path.name}", f"overrides: {v.label}"]
        text = format_file(_with_header(tree, header))
        resolved = format_file(_with_header(resolved_tree(v.analysis.ir, tree), header + ["every default written out"]))
        _atomic_write(vdir / "spec.nl", text)
        _atomic_write(vdir / "spec.resolved.nl", resolved)
        row.update(directory=v.dirname, sha256=_sha(text), resolved_sha256=_sha(resolved))
        rows.append(row)
    manifest = {
        "tool": "nldsl ablate", "version": __version__, "spec": base.file, "base_sha256": base.sha256,
        "target": base.target, "arguments": argv_items,
        "includes": [{"path": inc.rel, "copied": inc.target is None,
                      "sha256": _sha(inc.copy[0][1]) if inc.copy else _sha(inc.target.read_bytes())}
                     for inc in includes],
        "variants": rows,
    }
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _one_line(e) -> str:
    if isinstance(e, OverrideError):
        return f"{e.text}: {e.message}"
    return f"{e.code}: {e.message}" if hasattr(e, "code") else str(e)


# ---- --run and its summary -------------------------------------------------------------------


def _load_runner() -> str | None:
    """None when ``nldsl run`` can be used; else why not."""
    try:
        import nldsl.train  # noqa: F401  (imports torch)
        from nldsl import run_cmd  # noqa: F401
    except ImportError as e:
        return str(e) or type(e).__name__
    return None


def _run_variant(spec: Path, run_args: list[str], out: Path) -> dict:
    """Trains one variant with ``nldsl run``; its final metrics from ``results.json``."""
    from nldsl import run_cmd

    argv = [str(spec), *run_args, "--out", str(out)]
    if "--resume" not in run_args and "--overwrite" not in run_args:
        argv.append("--overwrite")
    code = run_cmd.main(argv)
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = {}
    final = {k: v for k, v in (results.get("final") or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    if isinstance(results.get("tokens_per_s"), (int, float)):
        final["tokens_per_s"] = results["tokens_per_s"]
    first = [results.get("metric"), "eval_loss", "tokens_per_s"]  # the task's metric first
    metrics = {k: final[k] for k in first if k in final}
    metrics.update((k, v) for k, v in final.items() if k not in metrics)
    status = results.get("status") or ("ok" if code == 0 else f"failed (exit {code})")
    return {"exit_code": code, "status": status, "metrics": metrics, "metric": results.get("metric")}


def _metric_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in (r.get("metrics") or {}):
            if k not in names:
                names.append(k)
    return names


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _overrides_text(r: dict) -> str:
    o = r.get("overrides")
    return " ".join(o) if isinstance(o, (list, tuple)) else str(o or "")


def summary_markdown(rows: list[dict], title: str = "Ablation summary") -> str:
    """A markdown table, one row per variant: variant, overrides, status, then each metric."""
    names = _metric_names(rows)
    head = ["#", "variant", "overrides", "status"] + names
    rule = "|" + "|".join(["---"] * 4 + ["---:"] * len(names)) + "|"
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", rule]
    for i, r in enumerate(rows):
        cells = [str(r.get("index", i)), f"`{r['variant']}`", _overrides_text(r).replace("|", "\\|") or "-",
                 str(r.get("status", "ok"))]
        for n in names:
            v = _num((r.get("metrics") or {}).get(n))
            cells.append("-" if v is None else f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(rows: list[dict]) -> str:
    names = _metric_names(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "variant", "overrides", "status"] + names)
    for i, r in enumerate(rows):
        vals = []
        for n in names:
            v = _num((r.get("metrics") or {}).get(n))
            vals.append("" if v is None else repr(v))
        w.writerow([r.get("index", i), r["variant"], _overrides_text(r), r.get("status", "ok")] + vals)
    return buf.getvalue()


PREFERRED = ("acc", "eval_loss", "bpb", "tokens_per_s", "loss_avg", "loss")


def summary_chart(rows: list[dict], metrics: list[str] | None = None) -> bytes:
    """A PNG: one panel of horizontal bars per metric (at most four), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metrics or _metric_names(rows)
    names = sorted(names, key=lambda n: (PREFERRED.index(n) if n in PREFERRED else len(PREFERRED), names.index(n)))
    names = [n for n in names if any(_num((r.get("metrics") or {}).get(n)) is not None for r in rows)][:4]
    labels = [str(r["variant"]) for r in rows]
    panels = max(1, len(names))
    height = max(2.8, 1.4 + 0.35 * len(rows))
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 1.5, height), squeeze=False)
    for ax, name in zip(axes[0], names or [None]):
        if name is None:
            ax.text(0.5, 0.5, "no metrics", ha="center", va="center")
            ax.set_axis_off()
            continue
        vals = [_num((r.get("metrics") or {}).get(name)) for r in rows]
        ys = list(range(len(rows)))
        ax.barh(ys, [v if v is not None else 0.0 for v in vals],
                color=["tab:blue" if v is not None else "lightgray" for v in vals])
        for y, v in zip(ys, vals):
            ax.text(v if v is not None else 0.0, y, f" {v:.4g}" if v is not None else " -", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.margins(x=0.2)
    fig.suptitle("final metrics by variant", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_summaries(rows: list[dict], out: Path, title: str = "Ablation summary") -> list[Path]:
    """``summary.md``, ``summary.csv`` and ``summary.png`` in ``out``; each written atomically.

    ``rows``: one dict per variant with ``variant`` (its name), ``overrides`` (a list or text),
    ``metrics`` (name -> number; missing or non-finite values show as ``-``), and optionally
    ``index`` and ``status``.
    """
    paths = [out / "summary.md", out / "summary.csv", out / "summary.png"]
    _atomic_write(paths[0], summary_markdown(rows, title))
    _atomic_write(paths[1], summary_csv(rows))
    _atomic_write(paths[2], summary_chart(rows))
    return paths


def _check_run_args(run_args: list[str]) -> None:
    """The options for `nldsl run`, checked before any variant is written."""
    from nldsl import run_cmd

    for a in run_args:
        if a in ("-o", "--out") or a.startswith("--out="):
            raise _Usage("`--run` options cannot set --out: each variant runs in its own folder",
                         help="the runs go to OUTPUT/NNN_NAME/run; choose OUTPUT with -o before --run")
    try:
        run_cmd.check_argv(run_args)
    except SystemExit as e:  # argparse said why (or printed the help asked for: --run --help)
        if not e.code:
            raise
        raise _Usage("the options after --run do not parse as `nldsl run` options (above); "
                     "nothing was written") from None
    except run_cmd._Usage as e:
        raise _Usage(f"--run: {e}; nothing was written") from None


# ---- the command ---------------------------------------------------------------------------


def _main(args) -> int:
    from nldsl.diagnostics import render_text

    run_args = getattr(args, "run", None)
    if run_args is not None:
        if args.dry_run:
            raise _Usage("--dry-run and --run contradict each other", help="drop one of them")
        why = _load_runner()
        if why is not None:
            raise _Usage(f"--run needs the training command `nldsl run` (the nldsl.train package), "
                         f"which cannot be imported here: {why}",
                         help="generate the variants without --run, then train each one with "
                              "`nldsl run OUTPUT/NNN_NAME/spec.nl`")
        _check_run_args(run_args)
    if args.max_variants < 1:
        raise _Usage(f"--max-variants must be at least 1, got {args.max_variants}")

    base = _load_base(args.spec, args.name)
    if not isinstance(base, Base):
        print(render_text(base.diagnostics, base.sources), file=sys.stderr)
        print(f"nldsl: error: {args.spec} does not check; fix the base spec before ablating it",
              file=sys.stderr)
        return EXIT_DIAGNOSTICS

    names, overrides, errors = _selectors(base, list(args.items))
    errors += _check_paths(base, overrides)
    if errors:
        raise _Usage(f"{len(errors)} of the arguments cannot be used; nothing was written",
                     details=[e.render() for e in errors])
    if not names and not overrides:
        if not base.ablations:
            raise _Usage(f"nothing to ablate: {args.spec} has no named ablations and no override was given",
                         help="give overrides such as `dim=64,128`, or write `ablation NAME { ... }` in the spec")
        names = list(base.ablations)

    count = max(1, len(names)) * math.prod(len(ov.values) for ov in overrides)
    if count > args.max_variants:
        raise _Usage(f"the plan has {count} variants, more than --max-variants {args.max_variants}",
                     help="sweep fewer values, or raise --max-variants")
    variants = sweep.plan(names, overrides)

    print(f"Generating {len(variants)} variant{'s' if len(variants) != 1 else ''}:")
    for v in variants:
        print(f"#{v.index} : {v.label}")
    sys.stdout.flush()

    for v in variants:
        _build(base, v)
    bad = [v for v in variants if not v.ok]
    by_index = {ov.index: ov for ov in overrides}

    diffs: dict[int, list[str]] = {}  # the flattened lines a variant changes, each computed once

    def diff_of(v: Variant) -> list[str]:
        if v.index not in diffs:
            diffs[v.index] = _diff(base, v)
        return diffs[v.index]

    if args.show_diff:
        for v in variants:
            print(f"\n#{v.index} : {v.label}")
            if not v.ok:
                print("  (does not check)")
                continue
            lines = diff_of(v)
            print("\n".join(f"  {x}" for x in lines) if lines else "  (no change)")
        sys.stdout.flush()

    # a removal or a named ablation that changes nothing is likely a slip (a removed property takes its
    # default, which may be what the spec set); a swept value equal to the base's is the usual control
    for v in variants:
        removes = any(x.startswith("~") for x in v.overrides)
        if v.ok and (v.ablation or removes) and not diff_of(v):
            why = "a removed property takes its default, which is what the base has" if removes else \
                "its edits set what the base already has"
            print(f"note: variant #{v.index} ({v.label}) is the base spec once defaults are filled in: {why}",
                  file=sys.stderr)

    for v in bad:
        print(f"\nvariant #{v.index} ({v.label}) does not check:\n{_render_errors(base, v, by_index)}",
              file=sys.stderr)
    gaps = [v for v in variants if v.gaps]
    for v in gaps:
        print(f"\nnote: variant #{v.index} ({v.label}) checks, but the compiler cannot build it yet "
              f"(`nldsl compile` refuses it, `--run` skips it):\n{_render_errors(base, v, by_index, v.gaps)}",
              file=sys.stderr)
    if bad:
        which = ", ".join(f"#{v.index}" for v in bad)
        print(f"\n{len(bad)} of {len(variants)} variants do{'es' if len(bad) == 1 else ''} not check ({which})",
              file=sys.stderr)

    if args.dry_run:
        good = len(variants) - len(bad)
        unbuilt = f" ({len(gaps)} of them not compiled yet: {', '.join(f'#{v.index}' for v in gaps)})" if gaps else ""
        print(f"dry run: {good} of {len(variants)} variants check clean{unbuilt}; nothing was written",
              file=sys.stderr)
        return EXIT_DIAGNOSTICS if bad else EXIT_OK
    if bad and not args.keep_going:
        print("nldsl: error: nothing was written; fix the plan, or pass --keep-going to write the "
              "variants that check", file=sys.stderr)
        return EXIT_DIAGNOSTICS

    out = Path(args.output) if args.output else Path("ablations") / base.path.stem
    _writable(out)
    good = [v for v in variants if v.ok]
    try:
        _write(base, variants, out, list(args.items))
    except OSError as e:
        raise _Usage(f"cannot write to {out}: {e.strerror or e}"
                     + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None
    print(f"wrote {len(good)} variant{'s' if len(good) != 1 else ''} to {out} "
          f"(manifest: {out / 'manifest.json'})", file=sys.stderr)
    current = {v.dirname for v in variants}
    stale = sorted(p.name for p in out.iterdir() if p.is_dir() and re.match(r"\d{3,}_", p.name)
                   and p.name not in current)
    if stale:
        print(f"note: {out} also holds {len(stale)} folder(s) from an earlier plan "
              f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); manifest.json lists this one",
              file=sys.stderr)

    status = EXIT_DIAGNOSTICS if bad else EXIT_OK
    if run_args is not None:
        rows = []
        for v in good:
            if v.gaps:  # said above; `nldsl run` would only repeat the compiler's refusal
                status = EXIT_DIAGNOSTICS
                rows.append({"index": v.index, "variant": v.dirname, "overrides": v.label.split(" "),
                             "metrics": {}, "status": f"not compiled ({v.gaps[0].code})"})
                continue
            print(f"\n== variant #{v.index}: {v.label}", file=sys.stderr, flush=True)
            res = _run_variant(out / v.dirname / "spec.nl", run_args, out / v.dirname / "run")
            if res["exit_code"] != 0:
                status = EXIT_DIAGNOSTICS
            rows.append({"index": v.index, "variant": v.dirname, "overrides": v.label.split(" "),
                         "metrics": res["metrics"], "status": res["status"]})
        try:
            paths = write_summaries(rows, out, title=f"Ablations of {base.path.name}")
        except OSError as e:
            raise _Usage(f"cannot write the summary to {out}: {e.strerror or e}") from None
        print(f"\nwrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
        print(summary_markdown(rows, title=f"Ablations of {base.path.name}"))
    return status
