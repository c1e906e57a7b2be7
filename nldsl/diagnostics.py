"""Diagnostics: what the parser and the checker say about a spec, and how it is shown.

Text rendering follows rustc: ``error[NL104]: message``, ``--> file:line:col``, the source
line with a gutter, a caret underline, then ``= help: ...``. JSON rendering is one object per
diagnostic with the same fields.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable

from nldsl.syntax.ast import Span


@dataclass(frozen=True)
class Diagnostic:
    code: str
    severity: str  # "error" | "warning"
    message: str
    file: str
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None
    help: str | None = None
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def at(cls, code: str, message: str, span: Span | None, *, help: str | None = None,
           severity: str | None = None, file: str = "<spec>", notes: Iterable[str] = ()):
        from nldsl.checks.codes import CODES  # the rule table knows each code's severity

        sev = severity or CODES[code].severity
        if span is None:
            return cls(code, sev, message, file, 1, 1, None, None, help, tuple(notes))
        return cls(code, sev, message, span.file, span.line, span.column, span.end_line,
                   span.end_column, help, tuple(notes))

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def sort_key(self):
        return (self.file, self.line, self.column, self.code, self.message)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}[{self.code}]: {self.message}"


class SpecError(Exception):
    """Raised by :func:`nldsl.load` when a spec has errors; ``.diagnostics`` lists them all."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None):
        self.diagnostics = list(diagnostics)
        self.sources = sources or {}
        errors = [d for d in self.diagnostics if d.is_error]
        first = errors[0] if errors else (self.diagnostics[0] if self.diagnostics else None)
        head = f"{len(errors)} error(s) in spec" + (f"; first: {first}" if first else "")
        super().__init__(head)

    def render(self, color: bool = False) -> str:
        return render_text(self.diagnostics, self.sources, color=color)


_COLORS = {"error": "\x1b[1;31m", "warning": "\x1b[1;33m", "help": "\x1b[1;36m",
           "bold": "\x1b[1m", "gutter": "\x1b[1;34m", "reset": "\x1b[0m"}


def _c(name: str, text: str, color: bool) -> str:
    return f"{_COLORS[name]}{text}{_COLORS['reset']}" if color else text


def render_one(d: Diagnostic, source: str | None, color: bool = False) -> str:
    out = [_c(d.severity, f"{d.severity}[{d.code}]", color) + _c("bold", f": {d.message}", color)]
    lines = source.splitlines() if source is not None else []
    width = len(str(d.line))
    pad = " " * width
    out.append(f"{pad}{_c('gutter', '-->', color)} {d.file}:{d.line}:{d.column}")
    if 1 <= d.line <= len(lines):
        text = lines[d.line - 1].expandtabs(1)
        end = d.end_column if (d.end_line == d.line and d.end_column and d.end_column > d.column) \
            else d.column + 1
        end = max(min(end, len(text) + 1), d.column + 1)
        out.append(f"{pad} {_c('gutter', '|', color)}")
        out.append(f"{_c('gutter', str(d.line).rjust(width) + ' |', color)} {text}")
        marker = " " * (d.column - 1) + "^" * (end - d.column)
        out.append(f"{pad} {_c('gutter', '|', color)} {_c(d.severity, marker, color)}")
    for note in d.notes:
        out.append(f"{pad} = note: {note}")
    if d.help:
        out.append(f"{pad} {_c('help', '= help:', color)} {d.help}")
    return "\n".join(out)


def render_text(diags: Iterable[Diagnostic], sources: dict[str, str], color: bool = False) -> str:
    diags = list(diags)
    parts = [render_one(d, sources.get(d.file), color) for d in diags]
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    if diags:
        parts.append(f"{errors} error(s), {warnings} warning(s)")
    return "\n\n".join(parts)


def render_json(diags: Iterable[Diagnostic]) -> str:
    rows = []
    for d in diags:
        row = asdict(d)
        row["notes"] = list(d.notes)
        rows.append(row)
    return json.dumps(rows, indent=2)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, when one is close enough to be a typo."""
    import difflib

    choices = sorted(set(choices))
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not match:
        lowered = {c.lower(): c for c in choices}
        if word.lower() in lowered:
            return lowered[word.lower()]
        return None
    return match[0]


def suggest(word: str, choices: Iterable[str], what: str = "") -> str:
    """A help line: a did-you-mean when one is close, else the list of what is allowed."""
    choices = sorted(set(choices))
    near = did_you_mean(word, choices)
    if near:
        return f"did you mean `{near}`?"
    if not choices:
        return f"no {what or 'names'} are defined here"
    shown = ", ".join(f"`{c}`" for c in choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"expected {('one of the ' + what + ': ') if what else 'one of '}{shown}"
