"""Checkpoints that a crash can never leave broken.

Layout under ``OUT/checkpoints/``::

    step_0000200/model.safetensors   model weights (safetensors)
    step_0000200/optimizer.pt        optimizer state and RNG states (torch.save)
    step_0000200/state.json          step, config, data position, history, sha256 of the files
    latest                           the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder next to the others; every file is
fsynced, then the folder is renamed into place (``os.replace``, atomic on POSIX) and only then
does ``latest`` move (also written to a temporary file and renamed). Older checkpoints are
removed only after that, keeping the last ``keep``. A failed write (disk full, permissions)
removes the temporary folder and leaves every earlier checkpoint as it was. Loading verifies
the sha256 of every file and falls back to the newest complete checkpoint when ``latest`` is
missing or points at something damaged.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = "model.safetensors", "optimizer.pt", "state.json", "latest"


class CheckpointError(Exception):
    """Writing or reading a checkpoint failed; earlier checkpoints are intact."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def _write_bytes(path: Path, data: bytes) -> None:
    """Writes and fsyncs one file (the single place bytes reach the disk: tests patch it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """``path`` gets ``data`` completely or keeps what it had."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    tensors, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().cpu()
        if t.data_ptr() in seen or not t.is_contiguous():
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[k] = t.contiguous()
    return save(tensors, metadata=metadata)


def rng_state() -> dict[str, Any]:
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:
            pass


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(root: Path, step: int, model_state: dict, optim_state: dict, state: dict,
                    keep: int = 2) -> Path:
    """Writes checkpoint ``step`` under ``root`` (``OUT/checkpoints``); returns its folder.

    Raises :class:`CheckpointError` when anything fails; nothing earlier is touched then.
    """
    root = Path(root)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists() and verify(final) is not None:
            _set_latest(root, final.name)  # this step is already saved (e.g. Ctrl-C right after a save)
            return final
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        weights = model_bytes(model_state, {"format": "nldsl", "step": str(step)})
        buf = io.BytesIO()
        torch.save({"optimizer": optim_state, "rng": rng_state()}, buf)
        optim = buf.getvalue()
        _write_bytes(tmp / MODEL_FILE, weights)
        _write_bytes(tmp / OPTIM_FILE, optim)
        meta = dict(state)
        meta.update({"format": FORMAT, "step": step,
                     "files": {MODEL_FILE: _sha(weights), OPTIM_FILE: _sha(optim)}})
        _write_bytes(tmp / STATE_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():  # a damaged folder of the same name: move it aside first
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _set_latest(root, final.name)
    except BaseException as e:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}", e.errno) from e
        raise
    _prune(root, keep)
    return final


def _set_latest(root: Path, name: str) -> None:
    atomic_write(root / LATEST, name + "\n")


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def verify(folder: Path) -> dict | None:
    """The checkpoint's state.json when every file is present and matches its sha256."""
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
        for name, digest in meta["files"].items():
            if _sha((folder / name).read_bytes()) != digest:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_latest(root: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under ``root``: ``latest`` if valid, else the newest
    folder that verifies."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = []
    try:
        name = (root / LATEST).read_text().strip()
        if name:
            candidates.append(root / name)
    except OSError:
        pass
    candidates += sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    for c in candidates:
        meta = verify(c)
        if meta is not None:
            return c, meta
    return None


def clean_temporaries(root: Path) -> None:
    """Removes temporary folders a crashed writer left behind (never a complete checkpoint)."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".latest.tmp*"):
            try:
                p.unlink()
            except OSError:
                pass


def load_checkpoint(folder: Path, map_location="cpu") -> tuple[dict, dict, dict]:
    """(model state dict, {"optimizer", "rng"}, state.json) of a verified checkpoint."""
    from safetensors.torch import load

    folder = Path(folder)
    meta = verify(folder)
    if meta is None:
        raise CheckpointError(f"{folder}: checkpoint is incomplete or damaged")
    weights = load((folder / MODEL_FILE).read_bytes())
    extra = torch.load(io.BytesIO((folder / OPTIM_FILE).read_bytes()), map_location=map_location,
                       weights_only=True)
    return weights, extra, meta
