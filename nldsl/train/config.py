"""The settings of one training run, and the presets that fill what the user did not set."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

DTYPES = ("float32", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_WEIGHT_DECAY = 0.01  # on the matrices, for an optimizer with weight decay

# What a preset sets. Explicit flags and key=value overrides always win over a preset.
PRESETS: dict[str, dict[str, Any]] = {
    # small enough to train and evaluate a model on a 2-core CPU in a few minutes: 4-pair MQAR
    # in 64 tokens on a 64-token vocabulary (31 keys, 32 values) at lr 1e-2, where Gated DeltaNet
    # passes its phase transition after 150 to 500 steps depending on the seed (at vocab 256,
    # 8 pairs, 128 tokens or lr 3e-3, no model tried did within 400 steps). Batch 16: Hope's step
    # time grows with the batch, and in a fixed time it leaves MQAR's first plateau sooner with
    # twice the steps at half the batch (measured: 0.25 accuracy after 1000 steps at batch 16,
    # chance after 371 at batch 32); Gated DeltaNet and the Transformer end where they did at 32.
    "cpu-demo": {
        "model": {"dim": 64, "layers": 2},
        "task_model": {"mqar": {"vocab": 64}},  # per task, under the user's key=value overrides
        "seq_len": 64, "batch": 16, "steps": 2000, "lr": 1e-2, "warmup": 40,
        "pairs": 4, "eval_every": 100, "eval_seqs": 256, "log_every": 10,
        # the demo's budget: training stops after 4.5 minutes at the latest, then evaluates
        # (only when --steps is not given; --time-limit 0 turns it off)
        "time_limit": 270.0,
        # few threads: for models this small, a second thread buys little on an idle machine,
        # and when another process holds a core, spinning OpenMP threads make every step 10-20x
        # slower (measured on the 2-core dev machine: 46k vs 2k tokens/s)
        "threads": "half-the-cores",
    },
    # the spec's own sizes and context; for a GPU
    "full": {
        "model": {},
        "seq_len": None, "batch": 64, "steps": 5000, "lr": 1e-3, "warmup": 250,
        "pairs": 32, "eval_every": 250, "eval_seqs": 1024, "log_every": 25,
        "time_limit": None, "threads": None,
    },
}


def preset_threads(value) -> int | None:
    """A preset's thread count: ``"half-the-cores"`` is half the CPU cores (1 to 4), else as is."""
    import os

    if value == "half-the-cores":
        return max(1, min(4, (os.cpu_count() or 2) // 2))
    return value


@dataclass
class RunConfig:
    spec: str
    model: str | None = None  # the model class, when the spec defines several
    overrides: dict = field(default_factory=dict)  # keyword arguments of the model class
    task: str = "mqar"
    phases: str | None = None  # continual: comma-separated phases (mqar:A,mqar:B,lm)
    pairs: int = 8
    needles: int = 1
    data: str | None = None
    seq_len: int | None = 128  # None: the model's context
    batch: int = 32  # global batch (split across ranks)
    steps: int = 400
    lr: float = 3e-3
    warmup: int | None = None  # None: min(100, steps // 10)
    schedule: str | None = None  # cosine | constant; None: cosine (constant for continual)
    min_lr: float = 0.1  # the cosine schedule ends at min_lr * lr
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY, where the optimizer has weight decay
    clip: float = 1.0
    eval_every: int = 50
    eval_seqs: int = 256
    log_every: int = 10
    ckpt_every: int | None = None  # None: every evaluation
    keep: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    out: str = "runs/run"
    resume: bool = False
    carry_state: bool = False
    segments: int = 6
    fsdp: bool = False
    time_limit: float | None = None  # seconds; stop (and evaluate, save) after this long
    threads: int | None = None  # CPU threads of torch (None: torch's default)
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    plot: bool = True
    preset: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # settings that must be the same to resume a run (the data and the model depend on them)
    IDENTITY = ("model", "overrides", "task", "phases", "pairs", "needles", "data", "seq_len",
                "batch", "lr", "warmup", "schedule", "min_lr", "weight_decay", "clip", "seed", "dtype")

    def identity(self) -> dict:
        """The IDENTITY settings, defaults resolved (a run that left --weight-decay out and one that
        gave the default are the same run)."""
        out = {k: getattr(self, k) for k in self.IDENTITY}
        out["weight_decay"] = DEFAULT_WEIGHT_DECAY if self.weight_decay is None else self.weight_decay
        return out

    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)

    def schedule_name(self) -> str:
        return self.schedule or ("constant" if self.task == "continual" else "cosine")


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate for step ``step`` (0-based): linear warmup, then cosine (or constant)."""
    import math

    warm = cfg.warmup_steps()
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule_name() == "constant":
        return cfg.lr
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
