"""Training and evaluation of compiled models: embedded tasks, the loop, checkpoints, many
processes. ``nldsl run`` (``nldsl/run_cmd.py``) is the command line over this package.

The names below load on first use, so ``nldsl --help`` and ``nldsl check`` never import torch.
"""
import importlib

_EXPORTS = {
    "BuildError": "build", "build_model": "build", "make_optimizer": "build", "optimizer_class": "build",
    "PRESETS": "config", "RunConfig": "config", "lr_at": "config",
    "RunError": "loop", "RunResult": "loop", "evaluate": "loop", "stream_evaluate": "loop", "train": "loop",
    "TASKS": "tasks", "Batch": "tasks", "TaskError": "tasks", "make_task": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"nldsl.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'nldsl.train' has no attribute {name!r}")
