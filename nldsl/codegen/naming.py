"""Identifiers for generated code: spec names made safe, unique and stable.

Spec names are validated by the checker (identifiers, no leading underscore, no keywords),
but generated code does not rely on that: :func:`sanitize` turns any string into a valid
identifier, and a :class:`Namer` keeps names clear of Python keywords, builtins and the
names generated code itself uses, adding ``_`` suffixes (deterministically) until unique.
"""
from __future__ import annotations

import builtins
import keyword
import re
import unicodedata

_NOT_IDENT = re.compile(r"[^0-9A-Za-z_]")

PYTHON_RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))


def sanitize(name: str) -> str:
    """A valid ASCII identifier derived from ``name`` (same name when already one)."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    text = _NOT_IDENT.sub("_", text)
    if not text or text[0].isdigit():
        text = "n_" + text
    if keyword.iskeyword(text) or keyword.issoftkeyword(text):
        text += "_"
    return text


def is_safe_identifier(name: str) -> bool:
    return name.isidentifier() and name.isascii() and not keyword.iskeyword(name)


class Namer:
    """Maps spec names (per namespace) to unique identifiers, avoiding ``reserved``."""

    def __init__(self, reserved=()):
        self.taken: set[str] = set(PYTHON_RESERVED) | set(reserved)
        self.names: dict[tuple[str, str], str] = {}

    def name(self, spec_name: str, namespace: str = "") -> str:
        key = (namespace, spec_name)
        if key in self.names:
            return self.names[key]
        base = sanitize(spec_name)
        ident = base
        while ident in self.taken:
            ident += "_"
        self.taken.add(ident)
        self.names[key] = ident
        return ident

    def fresh(self, hint: str) -> str:
        """A new identifier not tied to a spec name."""
        ident = sanitize(hint)
        while ident in self.taken:
            ident += "_"
        self.taken.add(ident)
        return ident
