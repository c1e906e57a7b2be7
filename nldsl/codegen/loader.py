"""Loading generated source in process, with tracebacks that show the generated lines."""
from __future__ import annotations

import linecache
import sys
import types


def load_module(source: str, name: str, *, filename: str | None = None) -> types.ModuleType:
    """Compiles and executes ``source`` as module ``name``.

    The source is registered in :mod:`linecache` under ``filename`` (default
    ``<nldsl:NAME>``), so tracebacks and ``inspect.getsource`` show the generated code; the
    module is put in ``sys.modules`` so its classes pickle by reference.
    """
    filename = filename or f"<nldsl:{name}>"
    code = compile(source, filename, "exec", dont_inherit=True)
    lines = source.splitlines(keepends=True)
    # a None mtime marks the entry as not backed by a file: linecache.checkcache keeps it
    linecache.cache[filename] = (len(source), None, lines, filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    module.__loader__ = None
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
