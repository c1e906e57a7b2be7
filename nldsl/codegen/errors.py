"""Compile-time errors: a checked spec the compiler cannot turn into code gets a diagnostic
pointing at the spec text, never a torch error when the generated code runs."""
from __future__ import annotations

from nldsl.diagnostics import Diagnostic, SpecError

# The rule table's code for "the compiler cannot build this yet" (nldsl/checks/codes.py).
UNSUPPORTED = "NL401"


def diagnostic(message: str, span, *, file: str, help: str | None = None) -> Diagnostic:
    if span is None:
        return Diagnostic(UNSUPPORTED, "error", message, file, 1, 1, None, None, help, ())
    return Diagnostic(UNSUPPORTED, "error", message, span.file, span.line, span.column, span.end_line,
                      span.end_column, help, ())


class CodegenError(SpecError):
    """The spec checks, but uses something the compiler does not support (code NL401)."""

    def __init__(self, message: str, span=None, *, file: str = "<spec>", help: str | None = None,
                 sources: dict[str, str] | None = None):
        super().__init__([diagnostic(message, span, file=file, help=help)], sources)
        self.message = message
