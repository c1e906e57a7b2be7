"""Writing generated files: atomically, and only when their content changed."""
from __future__ import annotations

import os
from pathlib import Path


def write_if_changed(path: str | Path, data: str) -> bool:
    """Writes ``data`` (UTF-8, ``\\n`` newlines) to ``path`` through a temporary file and a
    rename, unless the file already holds exactly that; returns whether it wrote."""
    path = Path(path)
    raw = data.encode("utf-8")
    try:
        if path.read_bytes() == raw:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True
