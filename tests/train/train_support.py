"""Helpers of the training tests: the tiny hand-written models and tiny run settings.

(Kept apart from conftest.py so test modules can import them by a name no other test folder uses.)
"""
from __future__ import annotations

from pathlib import Path

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
