"""Compiled SGD, Adam, AdamW, Adagrad, Muon (and RMSprop-style preconditioned momentum)
equal their torch.optim counterparts after 100 steps, across hyperparameter settings."""
from __future__ import annotations

import pytest
import torch

from optim_support import Tiny, assert_params_close, train

CASES = [
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.1, momentum=0.0)),
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.5, weight_decay=0.1)),
    ("adam.nl", "Adam", torch.optim.Adam, dict()),
    ("adam.nl", "Adam", torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adam.nl", "Adam", torch.optim.Adam, dict(lr=3e-3, eps=1e-3)),
    ("adam.nl", "AdamW", torch.optim.AdamW, dict()),
    ("adam.nl", "AdamW", torch.optim.AdamW, dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)),
    ("adagrad.nl", "Adagrad", torch.optim.Adagrad, dict()),
    ("adagrad.nl", "Adagrad", torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01)),
    ("adagrad.nl", "Adagrad", torch.optim.Adagrad, dict(initial_accumulator_value=0.5, weight_decay=0.05)),
    ("adagrad.nl", "Adagrad", torch.optim.Adagrad, dict(lr=0.05, eps=1e-6)),
    ("preconditioned_momentum.nl", "PreconditionedMomentum", torch.optim.RMSprop,
     dict(lr=0.01, momentum=0.9)),
    ("preconditioned_momentum.nl", "PreconditionedMomentum", torch.optim.RMSprop,
     dict(lr=0.003, alpha=0.9, momentum=0.5, weight_decay=0.01, eps=1e-6)),
]

MUON_CASES = [
    dict(lr=0.02),
    dict(lr=0.02, nesterov=False),
    dict(lr=0.05, momentum=0.9, weight_decay=0.0),
    dict(lr=0.01, ns_steps=3, ns_coefficients=(2.0, -1.5, 0.5), eps=1e-5),
]


def _ids(c):
    return f"{c[1]}-" + ",".join(f"{k}={v}" for k, v in c[3].items())


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_equals_torch(compiled, case):
    spec, cls, torch_cls, kw = case
    ours, ref = Tiny(), Tiny()
    opt = getattr(compiled(spec), cls)(ours.parameters(), **kw)
    ref_opt = torch_cls(ref.parameters(), **kw)
    train(ours, opt)
    train(ref, ref_opt)
    assert_params_close(ours, ref)


@pytest.mark.parametrize("kw", MUON_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in MUON_CASES])
def test_muon_equals_torch(compiled, kw):
    ours, ref = Tiny(matrices_only=True), Tiny(matrices_only=True)
    opt = compiled("muon.nl").Muon(ours.parameters(), **kw)
    ref_opt = torch.optim.Muon(ref.parameters(), **kw)
    train(ours, opt)
    train(ref, ref_opt)
    assert_params_close(ours, ref)


@pytest.mark.parametrize("spec,cls,torch_cls,kw", [
    ("adam.nl", "Adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, foreach=True)),
    ("adam.nl", "AdamW", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01, foreach=True)),
    ("adagrad.nl", "Adagrad", torch.optim.Adagrad, dict(lr=0.01, weight_decay=0.01, foreach=True)),
    ("sgd_momentum.nl", "SGD", torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.01, foreach=True)),
    ("muon.nl", "Muon", torch.optim.Muon, dict(lr=0.02)),
], ids=["Adam", "AdamW", "Adagrad", "SGD", "Muon"])
def test_float32_bitwise_equal_to_torch(compiled, spec, cls, torch_cls, kw):
    """The runtime emits torch's own op sequences, so in float32 the parameters are identical."""
    matrices = cls == "Muon"
    ours, ref = Tiny(matrices, dtype=torch.float32), Tiny(matrices, dtype=torch.float32)
    ours_kw = {k: v for k, v in kw.items() if k != "foreach"}
    train(ours, getattr(compiled(spec), cls)(ours.parameters(), **ours_kw), dtype=torch.float32)
    train(ref, torch_cls(ref.parameters(), **kw), dtype=torch.float32)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_closure_and_param_groups(compiled):
    ours, ref = Tiny(), Tiny()
    groups = lambda m: [{"params": [m.w1, m.w2], "lr": 0.01}, {"params": [m.w3, m.b1, m.k, m.s]}]  # noqa: E731
    opt = compiled("adam.nl").Adam(groups(ours), lr=0.003, betas=(0.85, 0.995))
    ref_opt = torch.optim.Adam(groups(ref), lr=0.003, betas=(0.85, 0.995))
    train(ours, opt, closure=True)
    train(ref, ref_opt, closure=True)
    assert_params_close(ours, ref)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[1]["lr"] == 0.003


def test_params_without_grad_are_skipped(compiled):
    ours, ref = Tiny(), Tiny()
    ours.s.requires_grad_(False)
    ref.s.requires_grad_(False)
    train(ours, compiled("adam.nl").Adam(ours.parameters(), lr=0.01))
    train(ref, torch.optim.Adam(ref.parameters(), lr=0.01))
    assert_params_close(ours, ref)
