"""A training step of every shipped model neither reads a device value on the host nor copies
host data to the device: what a GPU step needs to run without stalls, and to be captured whole
in a CUDA graph (``benchmarks/bench_models.py --cuda-graph``). Checked without a GPU on the meta
device, where a host read fails (a meta tensor has no values), with ``torch.tensor`` and
``torch.as_tensor`` watched for the device copies a meta run would not notice."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_compile_models import LINEAR_FAMILY, build
from tests.models.test_deep_models import DEEP


@pytest.mark.parametrize("spec", sorted(LINEAR_FAMILY + list(DEEP)))
def test_training_step_stays_on_the_device(spec, monkeypatch):
    with torch.device("meta"):
        model = build(spec, dim=16, vocab=32)
    copies = []
    for name in ("tensor", "as_tensor"):
        def watched(*args, _make=getattr(torch, name), _name=name, **kwargs):
            t = _make(*args, **kwargs)
            if t.device.type != "cpu":
                copies.append(_name)
            return t
        monkeypatch.setattr(torch, name, watched)
    ids = torch.randint(0, 32, (2, 40), device="meta")
    labels = ids.roll(-1, 1)
    out = model(ids, labels=labels)       # with labels: surprise-driven levels write, as in training
    F.cross_entropy(out.logits.reshape(-1, 32), labels.reshape(-1)).backward()
    assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())
    assert not copies, f"host data copied to the device by torch.{copies[0]} during the step"
