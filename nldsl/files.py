"""Writing output files so that a crash, a full disk or a signal never leaves half a file."""
from __future__ import annotations

import os
import stat
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, *, if_changed: bool = False) -> bool:
    """Writes ``data`` (text as UTF-8) to ``path`` through a fsynced temporary file and a rename;
    with ``if_changed``, not when the file already holds exactly that. Returns whether it wrote.

    Through a symlink it writes the file the link points to (the link stays); a target that is
    no regular file (``-o /dev/stdout``, a pipe) is written directly, since a rename would put a
    file in the device's place. Raises ``OSError``."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        st = os.stat(path)  # follows links
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(path, "wb") as f:
            f.write(raw)
        return True
    if if_changed and st is not None and st.st_size == len(raw) and path.read_bytes() == raw:
        return False
    real = Path(os.path.realpath(path))
    tmp = real.with_name(f".{real.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True
