"""The front half of the pipeline: read, parse, resolve includes, lower, check.

``analyze`` never raises for a bad spec: everything it finds comes back as diagnostics.
``load`` raises :class:`SpecError` when there is an error and returns a :class:`Spec`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nldsl import ablate
from nldsl.checks import rules
from nldsl.diagnostics import Diagnostic, SpecError
from nldsl.ir import models as M
from nldsl.ir.lower import Ctx, Lowerer
from nldsl.syntax import ast as A
from nldsl.syntax.parser import SyntaxFailure, parse

MAX_INCLUDE_DEPTH = 16


@dataclass
class Analysis:
    """Everything known about one spec file after checking it."""

    file: str
    text: str | None = None
    ast: A.File | None = None
    ir: M.SpecIR | None = None
    spans: dict = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    included: dict[str, "Analysis"] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


def read_spec(path: str | Path) -> str:
    """Reads a spec file as UTF-8. OSError propagates (the CLI turns it into exit code 2)."""
    data = Path(path).read_bytes()
    return data.decode("utf-8")


def _decode_error(file: str, data: bytes, e: UnicodeDecodeError) -> Diagnostic:
    before = data[: e.start]
    line = before.count(b"\n") + 1
    col = len(before) - (before.rfind(b"\n") + 1) + 1
    return Diagnostic.at("NL002", f"byte 0x{data[e.start]:02x} is not UTF-8 text",
                         A.Span(file, line, col, line, col + 1),
                         help="spec files are UTF-8 text; re-save the file as UTF-8")


def analyze_file(path: str | Path, *, _stack: tuple[str, ...] = ()) -> Analysis:
    """Checks a file on disk. Raises OSError when the file cannot be read."""
    p = Path(path)
    data = p.read_bytes()
    file = str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Analysis(file=file, diagnostics=[_decode_error(file, data, e)], sources={file: ""})
    return analyze_text(text, file, base=p.parent, _stack=_stack + (str(p.resolve()),))


def analyze_text(text: str, file: str = "<spec>", *, base: Path | None = None,
                 _stack: tuple[str, ...] = (), check_ablations: bool = True) -> Analysis:
    result = Analysis(file=file, text=text, sources={file: text})
    try:
        tree = parse(text, file)
    except SyntaxFailure as e:
        result.diagnostics.append(e.diagnostic)
        return result
    return analyze_ast(tree, text, file, base=base, _stack=_stack, check_ablations=check_ablations,
                       result=result)


def _include(result: Analysis, ctx: Ctx, rel: str, span, base: Path | None, stack) -> Analysis | None:
    target = (base or Path(".")) / rel
    key = str(target.resolve())
    if key in stack:
        ctx.error("NL003", f"`{rel}` includes itself (through {len(stack)} file(s))", span,
                  help="remove one of the includes in the cycle")
        return None
    if len(stack) >= MAX_INCLUDE_DEPTH:
        ctx.error("NL003", "includes nest too deeply", span)
        return None
    try:
        sub = analyze_file(target, _stack=stack)
    except OSError as e:
        ctx.error("NL003", f"cannot read included file `{rel}`: {e.strerror or e}", span,
                  help="paths are relative to the including file")
        return None
    result.included[rel] = sub
    result.sources.update(sub.sources)
    if not sub.ok:
        ctx.error("NL003", f"included file `{rel}` has errors", span,
                  help=f"run `nldsl check {target}` to see them")
    return sub


def analyze_ast(tree: A.File, text: str, file: str, *, base: Path | None = None,
                _stack: tuple[str, ...] = (), check_ablations: bool = True,
                result: Analysis | None = None) -> Analysis:
    result = result or Analysis(file=file, text=text, sources={file: text})
    result.ast = tree
    ctx = Ctx(file)
    known_optimizers: dict[str, str] = {}
    includes = []
    for item in tree.items:
        if isinstance(item, A.Include):
            sub = _include(result, ctx, item.path, item.spans.get("path"), base, _stack)
            includes.append(item.path)
            if sub is not None and sub.ir is not None:
                for o in sub.ir.optimizers:
                    known_optimizers[o.name] = item.path
    # optimizer = "file.nl" is an include of that file, using its one optimizer
    file_refs: dict[str, str] = {}
    for item in tree.items:
        if isinstance(item, A.Model):
            for s in item.stmts:
                if isinstance(s, A.UseOptimizer) and isinstance(s.expr, A.String):
                    sub = result.included.get(s.expr.value) or _include(
                        result, ctx, s.expr.value, s.expr.span, base, _stack)
                    if sub is not None and sub.ir is not None:
                        if len(sub.ir.optimizers) != 1:
                            ctx.error("NL304", f"`{s.expr.value}` defines {len(sub.ir.optimizers)} "
                                      "optimizers; name one with `include` and `optimizer = NAME`",
                                      s.expr.span)
                        else:
                            file_refs[s.expr.value] = sub.ir.optimizers[0].name
                            known_optimizers[sub.ir.optimizers[0].name] = s.expr.value
    try:
        ir = Lowerer(ctx, known_optimizers).file(tree, tuple(includes))
    except RecursionError:
        ctx.error("NL010", "spec nested too deeply to process", None)
        result.diagnostics = sorted(ctx.diags, key=Diagnostic.sort_key)
        return result
    # resolve optimizer = "file.nl" to the optimizer's name
    models = []
    for m in ir.models:
        if m.optimizer and m.optimizer.startswith("file:"):
            m = m.model_copy(update={"optimizer": file_refs.get(m.optimizer[5:])})
        models.append(m)
    ir = ir.model_copy(update={"models": tuple(models)})
    result.ir = ir
    result.spans = ctx.spans
    checker = rules.Checker(file, ctx.spans, known_optimizers)
    try:
        rules.run(ir, checker)
    except RecursionError:
        ctx.error("NL010", "spec nested too deeply to process", None)
    diags = ctx.diags + checker.diags
    if check_ablations and not any(d.is_error for d in diags):
        diags += _check_ablations(tree, text, file, base, _stack)
    result.diagnostics = sorted(_dedupe(diags), key=Diagnostic.sort_key)
    return result


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diags:
        key = (d.code, d.file, d.line, d.column, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _check_ablations(tree: A.File, text: str, file: str, base, stack) -> list[Diagnostic]:
    """Applies each named ablation and checks the variant in full."""
    out: list[Diagnostic] = []
    plain = ablate.without_ablations(tree)
    for ab in (it for it in tree.items if isinstance(it, A.Ablation)):
        try:
            variant = ablate.apply(plain, ablate.ablation_edits(ab))
        except ablate.EditError as e:
            out.append(Diagnostic.at("NL305", f"ablation `{ab.name}`: {e.message}", e.span or ab.spans.get("name"),
                                     help=e.help, file=file))
            continue
        sub = analyze_ast(variant, text, file, base=base, _stack=stack, check_ablations=False)
        errors = [d for d in sub.diagnostics if d.is_error]
        if errors:
            notes = [f"{d.code}: {d.message}" for d in errors]
            out.append(Diagnostic.at("NL306", f"ablation `{ab.name}` gives a spec that does not check",
                                     ab.spans.get("name"), file=file, notes=notes,
                                     help=f"run `nldsl ablate {file} @{ab.name} --dry-run --show-diff` "
                                     "to see the variant"))
    return out


class Spec:
    """A checked spec: its IR, its syntax tree, and views of it."""

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.ir: M.SpecIR = analysis.ir
        self.file = analysis.file
        self.diagnostics = [d for d in analysis.diagnostics if not d.is_error]  # warnings

    @property
    def models(self) -> tuple[M.Model, ...]:
        return self.ir.models

    @property
    def optimizers(self) -> tuple[M.Optimizer, ...]:
        return self.ir.optimizers

    def owner(self, name: str | None = None) -> M.Model | M.Optimizer:
        owners = list(self.ir.models) + list(self.ir.optimizers)
        if name is None:
            if not owners:
                raise ValueError(f"{self.file} defines no model or optimizer")
            return owners[0]
        for o in owners:
            if o.name == name:
                return o
        raise KeyError(f"{self.file} has no model or optimizer named {name!r}; "
                       f"it has {', '.join(o.name for o in owners)}")

    def level_graph(self, name: str | None = None):
        """The level graph (a ``networkx.DiGraph``) of the first model or optimizer, or ``name``."""
        from nldsl.graph import build

        return build(self.owner(name))

    def __repr__(self) -> str:
        names = ", ".join(o.name for o in list(self.ir.models) + list(self.ir.optimizers))
        return f"Spec({self.file!r}: {names})"


def check(path: str | Path) -> list[Diagnostic]:
    """All diagnostics (errors and warnings) of a spec file; never raises for bad specs."""
    return analyze_file(path).diagnostics


def load(path: str | Path) -> Spec:
    """Parses and checks a spec file; raises :class:`SpecError` if it has errors."""
    analysis = analyze_file(path)
    if not analysis.ok:
        raise SpecError(analysis.diagnostics, analysis.sources)
    return Spec(analysis)


def loads(text: str, file: str = "<spec>") -> Spec:
    analysis = analyze_text(text, file)
    if not analysis.ok:
        raise SpecError(analysis.diagnostics, analysis.sources)
    return Spec(analysis)
