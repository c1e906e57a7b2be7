"""Code generation: checked specs -> readable PyTorch modules.

Pipeline (one direction): a checked :class:`~nldsl.spec.Analysis` -> one *plan* per block
(every decision made in Python: names, kinds, statement order) -> jinja2 templates from the
shipped ``codegen_templates/`` folder -> one module's source -> ``ast.parse`` -> imported in
process (:func:`compile_spec`) or written out (:func:`write_package`).

A spec whose memories have a Triton path also gets a kernels file (:mod:`nldsl.codegen.kernels`):
``kernels.py`` beside ``module.py``, or registered in process for the generated module, which
imports it on first use of ``impl='triton'``.

Kinds of blocks are registered in :data:`BLOCK_KINDS` (see :func:`register_block_kind`):
each says how to find its blocks in the IR, how to plan one, and which template renders it.
Optimizers are registered by :mod:`nldsl.codegen.optimizer`; models register the same way.

Guarantees: the same spec gives byte-identical output (the header carries the spec's
sha256, never a time or an absolute path); spec text reaches the code only as sanitised
identifiers and ``repr``'d literals; every generated piece has a comment ``file:line``
pointing at the spec line it comes from.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from nldsl.codegen.errors import CodegenError
from nldsl.codegen.loader import load_module
from nldsl.codegen.render import docstring, environment, header, literal, spec_hash
from nldsl.diagnostics import SpecError
from nldsl.files import write_atomic
from nldsl.syntax import ast as A

__all__ = ["BLOCK_KINDS", "KIND_MODULES", "BlockKind", "CodegenError", "Generated", "SpecContext", "compile_spec",
           "generate", "load_module", "register_block_kind", "write_package"]


@dataclass
class SpecContext:
    """What planning a block may look at besides the IR: names and positions in the spec."""

    file: str  # as given (diagnostics)
    label: str  # the file's name only (generated code: no absolute paths)
    spans: dict
    sources: dict[str, str]
    ast: A.File | None
    sha256: str
    resolved: str = ""  # the spec's resolved form (`nldsl fmt --resolved`): what it means, defaults filled in

    @property
    def resolved_sha256(self) -> str:
        return spec_hash([self.resolved])

    def ast_block(self, name: str):
        for it in (self.ast.items if self.ast else ()):
            if isinstance(it, (A.Model, A.Optimizer)) and it.name == name:
                return it
        return None

    def ast_memory(self, owner: str, memory: str):
        block = self.ast_block(owner)
        for s in (block.stmts if block else ()):
            if isinstance(s, A.Memory) and s.name == memory:
                return s
        return None


@dataclass(frozen=True)
class BlockKind:
    """A kind of spec block that compiles to one class of the generated module."""

    name: str
    blocks: Callable[[Any], Sequence[Any]]  # SpecIR -> blocks of this kind
    plan: Callable[[Any, SpecContext], dict]  # block -> template context (``name`` = class name)
    template: str  # in codegen_templates/
    imports: tuple[str, ...] = ()  # import lines the rendered classes need


BLOCK_KINDS: dict[str, BlockKind] = {}

# Modules that register a block kind when imported (they import torch, so they are loaded
# on first use, not with this package). A new kind of block adds its module here.
KIND_MODULES = ("nldsl.codegen.optimizer", "nldsl.codegen.model")


def register_block_kind(kind: BlockKind) -> None:
    BLOCK_KINDS[kind.name] = kind


def _load_kinds() -> None:
    """Imports the modules that register the block kinds (each calls register_block_kind)."""
    import importlib

    for name in KIND_MODULES:
        importlib.import_module(name)


@dataclass
class Generated:
    """One spec's generated module."""

    source: str
    spec_name: str
    sha256: str
    classes: list[dict] = field(default_factory=list)  # {"name", "kind", "line", "hyperparameters"}
    resolved: str = ""  # the spec's resolved form (spec.resolved.nl)

    @property
    def module_name(self) -> str:
        stem = "".join(c if c.isalnum() else "_" for c in Path(self.spec_name).stem)
        return f"nldsl_generated_{stem}_{self.sha256[:12]}"

    @property
    def filename(self) -> str:
        return f"<nldsl:{self.spec_name}:{self.sha256[:12]}>"


def _context(analysis) -> SpecContext:
    from nldsl.ir.resolved import resolved_tree
    from nldsl.syntax.printer import format_file

    texts = [analysis.text or ""] + [sub.text or "" for sub in analysis.included.values()]
    return SpecContext(file=analysis.file, label=Path(analysis.file).name, spans=analysis.spans,
                       sources=analysis.sources, ast=analysis.ast, sha256=spec_hash(texts),
                       resolved=format_file(resolved_tree(analysis.ir, analysis.ast)))


def _module_doc(ctx: SpecContext, classes: list[dict], blocks: list) -> str:
    """What the module holds, and the summary (first paragraph) of the spec's first block; the
    whole of each block's description is its class's docstring, not repeated here."""
    names = ", ".join(f"{c['name']} ({c['kind']})" for c in classes) or "nothing"
    doc = f"Generated from {ctx.label}: {names}."
    first = blocks[0] if blocks else None
    if first is not None and getattr(first, "doc", ""):
        doc += "\n\n" + first.doc.split("\n\n")[0]
    return doc


def generate(analysis) -> Generated:
    """The module for a checked spec (an :class:`~nldsl.spec.Analysis` without errors)."""
    from nldsl import __version__

    _load_kinds()
    if not analysis.ok or analysis.ir is None:
        raise SpecError(analysis.diagnostics, analysis.sources)
    ctx = _context(analysis)
    env = environment()
    found = []
    for kind in BLOCK_KINDS.values():
        for block in kind.blocks(analysis.ir):
            span = ctx.spans.get((block.name,))
            found.append(((span.line if span else 0), kind, block))
    found.sort(key=lambda t: t[0])
    rendered, classes, imports = [], [], []
    for line, kind, block in found:
        plan = kind.plan(block, ctx)
        rendered.append(env.get_template(kind.template).render(**plan).strip("\n"))
        classes.append({"name": plan["name"], "kind": kind.name, "line": line,
                        "hyperparameters": plan.get("defaults", {})})
        imports += [i for i in kind.imports if i not in imports]
    head = env.get_template("header.j2").render(
        header=header(__version__, ctx.label, ctx.sha256),
        doc=docstring(_module_doc(ctx, classes, [b for _, _, b in found])),
        import_groups=[g for g in ([i for i in imports if "nldsl" not in i],
                                   [i for i in imports if "nldsl" in i]) if g],
        all_literal=literal([c["name"] for c in classes]),
    )
    source = head.rstrip("\n") + "\n" + "".join(f"\n\n{r}\n" for r in rendered)
    try:
        ast.parse(source)
    except SyntaxError as e:  # a bug in a template or a plan, never in the user's spec
        raise RuntimeError(f"nldsl generated invalid Python for {ctx.label} (line {e.lineno}): {e.msg}") from e
    return Generated(source=source, spec_name=ctx.label, sha256=ctx.sha256, classes=classes, resolved=ctx.resolved)


_LOADED: dict[str, Any] = {}


def compile_spec(path: str | Path):
    """Generates the module of a spec file, imports it and returns it (one class per block).

    Raises :class:`~nldsl.SpecError` (with diagnostics) for a spec with errors, and
    :class:`CodegenError` (a ``SpecError`` with code NL401) for one the compiler cannot
    compile. The same spec text gives the same (cached) module.
    """
    from nldsl.spec import analyze_file

    analysis = analyze_file(path)
    gen = generate(analysis)
    spec_dir = str(Path(path).resolve().parent)
    key = gen.sha256 + ":" + gen.spec_name + ":" + spec_dir
    if key not in _LOADED:
        kernels, gaps = _kernels(analysis)
        if kernels is not None:  # imported on first use of impl='triton' (no triton needed before)
            from nldsl.runtime._triton import register_kernel_source

            register_kernel_source(gen.module_name, kernels.source, gen.filename[:-1] + ":kernels>")
        elif gaps:  # none: impl='triton' says why, memory by memory
            from nldsl.runtime._triton import register_kernel_gaps

            register_kernel_gaps(gen.module_name, gaps)
        module = load_module(gen.source, gen.module_name, filename=gen.filename)
        from nldsl.nn.model import NSAMModel

        for name in module.__all__:  # relative paths in the spec resolve against its directory
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, NSAMModel):
                cls.spec_dir = spec_dir
        _LOADED[key] = module
    return _LOADED[key]


def _kernels(analysis):
    """The spec's Triton kernels file (see :mod:`nldsl.codegen.kernels`) or None, and why each
    memory without a kernel has none."""
    if not analysis.ir.models:
        return None, {}
    from nldsl.codegen.kernels import kernels_and_gaps

    return kernels_and_gaps(analysis)


def write_package(path: str | Path, out_dir: str | Path) -> list[Path]:
    """Writes ``module.py``, ``spec.resolved.nl`` and ``manifest.json`` for a spec into
    ``out_dir`` (atomically, only files whose content changed), and ``kernels.py`` (the
    generated Triton kernels) when a memory of the spec has a Triton path; returns the paths."""
    from nldsl import __version__
    from nldsl.spec import analyze_file

    analysis = analyze_file(path)
    gen = generate(analysis)
    out = Path(out_dir)
    files = {"module.py": gen.source, "spec.resolved.nl": gen.resolved}
    kernels, gaps = _kernels(analysis)
    if kernels is not None:
        files["kernels.py"] = kernels.source
    import hashlib

    manifest = {
        "nldsl": __version__,
        "spec": gen.spec_name,
        "spec_sha256": gen.sha256,
        "module": "module.py",
        **({"kernels": "kernels.py", "triton": kernels.exports} if kernels is not None else {}),
        **({"no_kernels": gaps} if kernels is None and gaps else {}),  # why, for impl='triton' to say
        "classes": [{**c, "hyperparameters": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in c["hyperparameters"].items()}}
                    for c in gen.classes],
        "files": {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in files.items()},
    }
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        p = out / name
        write_atomic(p, text, if_changed=True)
        paths.append(p)
    return paths
