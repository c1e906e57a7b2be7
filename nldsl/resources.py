"""Files that ship with nldsl: the grammar and the code-generation templates.

In the source tree they sit at the top level (``grammar/``, ``codegen_templates/``); the wheel
installs them as ``nldsl/grammar`` and ``nldsl/codegen_templates``. Both layouts work.
"""
from __future__ import annotations

from importlib import resources as _res
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def directory(name: str) -> Path:
    """The directory of a shipped resource folder (``grammar`` or ``codegen_templates``)."""
    try:
        found = _res.files(f"nldsl.{name}")
        path = Path(str(found))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    path = _SOURCE_ROOT / name
    if path.is_dir():
        return path
    raise FileNotFoundError(f"nldsl resource folder {name!r} is missing from this installation")


def read_text(folder: str, filename: str) -> str:
    return (directory(folder) / filename).read_text(encoding="utf-8")
