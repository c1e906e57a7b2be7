"""Native CPU kernels: C files beside the Python they stand in for, built on first use by the
system's C compiler (``$CC``, else ``cc``) into a per-user cache and loaded with ctypes.

A kernel is built for the machine it runs on (``-march=native``), once per source (with the
headers beside it), compiler, CPU and OpenMP runtime: the cache key holds all four, so a home
directory shared by different machines keeps one build per CPU. The build goes to a temporary
file renamed into place, so an interrupted or concurrent build never leaves a half-written
library behind. Without a compiler, or when the build fails, :func:`library` warns once and
returns None, and the callers run their torch ops; ``NLDSL_NATIVE=0`` turns the kernels off (the
torch ops then run everywhere).

Threads: a kernel splits its rows over threads where torch runs on GNU OpenMP (libgomp, torch's
Linux builds). The build links the very runtime torch loaded, so a kernel's threads are torch's
intra-op pool, as many as ``torch.set_num_threads`` gives it, not a second pool competing with
it for the cores (threads of Python's own, tried before, lost to torch's spinning workers).
Elsewhere, or where the compiler has no OpenMP, a kernel runs on one thread.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ACTIVATIONS", "library", "enabled", "runs", "cache_dir", "check", "empty", "pointer", "pointers"]

_HERE = Path(__file__).parent
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c11", "-fPIC")
_REALS = {torch.float32: "float", torch.float64: "double"}
#: the activations the kernels compute, by their index there (``_native.h``)
ACTIVATIONS = ("identity", "gelu", "silu", "relu", "tanh")


def enabled() -> bool:
    return os.environ.get("NLDSL_NATIVE", "1") != "0"


def runs(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether a kernel runs a call on these tensors: not turned off, CPU tensors, float32 or
    float64, all of x's dtype (None entries skipped)."""
    return (enabled() and x.device.type == "cpu" and x.dtype in _REALS
            and all(t is None or t.dtype == x.dtype for t in others))


def cache_dir() -> Path:
    """``$NLDSL_CACHE``, else ``$XDG_CACHE_HOME/nldsl``, else ``~/.cache/nldsl``."""
    root = os.environ.get("NLDSL_CACHE")
    if root:
        return Path(root)
    try:
        home = Path.home()
    except RuntimeError:  # no home directory known: a per-user folder in the temporary directory
        return Path(tempfile.gettempdir()) / f"nldsl-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "nldsl"


def _cpu() -> str:
    """What identifies this CPU's instruction set: its flags on Linux, else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def library(name: str, dtype: torch.dtype) -> Optional[ctypes.CDLL]:
    """The built ``<name>.c`` for ``dtype`` (float32 / float64), or None (see the module docstring)."""
    real = _REALS.get(dtype)
    if real is None or not enabled():
        return None
    return _build(name, real)


@functools.cache
def _openmp() -> Optional[str]:
    """The GNU OpenMP runtime torch loaded (its path), or None (another runtime, none, not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith("libgomp"):
            return path
    return None


@functools.cache
def _build(name: str, real: str) -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        warnings.warn(f"nldsl: no C compiler (set CC): {name} runs as torch ops, slower on a CPU", stacklevel=3)
        return None
    source = _HERE / f"{name}.c"
    headers = [h.read_bytes() for h in sorted(_HERE.glob("*.h"))]  # what the sources include
    gomp = _openmp()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, repr((cc, _FLAGS, real, gomp)).encode(),
                                      _cpu().encode()]))
    target = cache_dir() / f"{name}-{real}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # with OpenMP if it builds (a compiler without omp.h: on one thread)
            if not (gomp and _compile(cc, source, real, target, gomp)):
                _compile(cc, source, real, target, None, check=True)
        except OSError as err:
            warnings.warn(f"nldsl: building {source.name} failed ({err}): {name} runs as torch ops, slower on a "
                          "CPU", stacklevel=3)
            return None
    return ctypes.CDLL(str(target))


def _compile(cc: str, source: Path, real: str, target: Path, gomp: Optional[str], check: bool = False) -> bool:
    """Build ``source`` into ``target`` (through a temporary file renamed into place); with ``gomp``,
    compiled for OpenMP and linked against that runtime file, not the compiler's own (``-fopenmp``
    at the link would add it: two runtimes, two thread pools). Whether it built; ``check``: an
    OSError with the compiler's last line when it did not."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    try:
        define = f"-DREAL={real}"
        if gomp:
            steps = [[cc, *_FLAGS, "-fopenmp", define, "-c", str(source), "-o", obj],
                     [cc, "-shared", obj, gomp, f"-Wl,-rpath,{Path(gomp).parent}", "-o", tmp, "-lm"]]
        else:
            steps = [[cc, *_FLAGS, "-shared", define, str(source), "-o", tmp, "-lm"]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                if not check:
                    return False
                err = done.stderr.strip()
                raise OSError(err.splitlines()[-1] if err else f"{Path(cc).name} exited with {done.returncode}")
        os.replace(tmp, target)
        return True
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)


def pointers(tensors) -> ctypes.Array:
    """The tensors' data pointers as a C array (NULL for None). A pointer keeps no tensor alive:
    the caller holds every tensor until the kernel returns (no ``t.contiguous()`` made inline)."""
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


def longs(values) -> ctypes.Array:
    """Integers as a C ``int64_t`` array (a kernel's dimensions, strides, codes)."""
    values = [int(v) for v in values]
    return (ctypes.c_int64 * len(values))(*values)


def pointer(tensor: Optional[torch.Tensor]) -> ctypes.c_void_p:
    """A tensor's data pointer as one argument (NULL for None; a bare int would pass as a C int)."""
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def empty(like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A contiguous tensor of ``like``'s shape (None for None): a kernel's output."""
    return None if like is None else torch.empty_like(like, memory_format=torch.contiguous_format)


def check(kernel: str, status: int) -> None:
    """A kernel's status: 0 done, 1 out of memory, 2 its temporaries overran their block."""
    if status == 1:
        raise MemoryError(f"{kernel}: no memory for the C kernel's temporaries")
    if status:
        raise RuntimeError(f"{kernel}: the C kernel's temporaries overran their block (a bug in {kernel}.c)")
