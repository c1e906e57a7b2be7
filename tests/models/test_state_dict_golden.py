"""state_dict keys of compiled models are stable (golden files; NLDSL_ACCEPT=1 rewrites them)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import nldsl
from nldsl.nn.model import NSAMModel

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "state_dict"
SPECS = ["transformer", "linear_attention", "deltanet", "gated_deltanet", "adatransformer", "titans", "cms",
         "hope"]


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_keys(spec):
    mod = nldsl.compile(ROOT / "specs" / f"{spec}.nl")
    (cls,) = [getattr(mod, n) for n in mod.__all__ if issubclass(getattr(mod, n), NSAMModel)]
    model = cls(dim=16, heads=2, layers=2, vocab=32)
    keys = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()) + "\n"
    path = GOLDEN / f"{spec}.txt"
    if os.environ.get("NLDSL_ACCEPT"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(keys)
    assert path.exists(), f"no golden for {spec}: run with NLDSL_ACCEPT=1"
    assert keys == path.read_text(), f"state_dict keys of {spec} changed; if intended, NLDSL_ACCEPT=1"
