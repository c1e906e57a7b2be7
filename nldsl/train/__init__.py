"""Training and evaluation of compiled models: embedded tasks, the loop, checkpoints, many
processes. ``nldsl run`` (``nldsl/run_cmd.py``) is the command line over this package.

Importing ``nldsl.train`` imports torch.
"""
from nldsl.train.build import BuildError, build_model, make_optimizer, optimizer_class
from nldsl.train.config import PRESETS, RunConfig, lr_at
from nldsl.train.loop import RunError, RunResult, evaluate, stream_evaluate, train
from nldsl.train.tasks import TASKS, Batch, TaskError, make_task

__all__ = ["BuildError", "Batch", "PRESETS", "RunConfig", "RunError", "RunResult", "TASKS", "TaskError",
           "build_model", "evaluate", "lr_at", "make_optimizer", "make_task", "optimizer_class",
           "stream_evaluate", "train"]
