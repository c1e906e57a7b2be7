"""Fixtures of the training tests: a tiny hand-written model, tiny run settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread: these models are tiny, and on a busy 2-core machine two spinning threads make
# every small matmul tens of times slower.
torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / 'tiny_model.py'}:TinyAttention"
TINY_REC = f"{HERE / 'tiny_model.py'}:TinyRecurrent"


def small(out=None, **kw):
    """A RunConfig that trains in about a second on one CPU core."""
    from nldsl.train import RunConfig

    base = dict(spec=TINY, overrides={"dim": 32, "layers": 1, "heads": 2}, task="mqar", pairs=4,
                seq_len=32, batch=8, steps=8, lr=3e-3, warmup=2, eval_every=4, eval_seqs=16,
                log_every=1, out=str(out), progress=False, plot=False, seed=0, threads=1)
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(**kw):
        kw.setdefault("out", str(tmp_path / "run"))
        return small(**kw)

    return make
