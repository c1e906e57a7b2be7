"""The paper's more expressive momenta (section 4.4): delta momentum (Eq. 48-49) and
preconditioned momentum (Eq. 46-47) compile and follow their written-out updates."""
from __future__ import annotations

import pytest
import torch

import nldsl
from nldsl.codegen import CodegenError, compile_spec

from conftest import SPECS, Tiny, assert_params_close, batches, train


def test_delta_momentum_follows_eq_49(compiled):
    lr, alpha, eta, wd = 0.02, 0.9, 0.1, 0.01
    ours, ref = Tiny(matrices_only=True), Tiny(matrices_only=True)
    opt = compiled("delta_momentum.nl").DeltaMomentum(ours.parameters(), lr=lr, momentum=alpha, eta=eta,
                                                    weight_decay=wd)
    train(ours, opt, steps=50)
    ms = [torch.zeros_like(p) for p in ref.parameters()]
    for x, y in batches(50):
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                g = p.grad
                eye = torch.eye(g.shape[1], dtype=g.dtype)
                ms[i] = ms[i] @ (alpha * eye - eta * g.T @ g) + eta * g  # m (alpha I - eta g^T g) + eta g
                p -= lr * ms[i] + lr * wd * p
    assert_params_close(ours, ref)


def test_preconditioned_momentum_reads_v_after_its_write(compiled):
    """Same level, m depends on v: v is written first (the paper's ordering), as RMSprop."""
    import inspect

    code = inspect.getsource(compiled("preconditioned_momentum.nl").PreconditionedMomentum)
    assert code.index("rt.write(states, 'v'") < code.index("v = rt.read(") < code.index("rt.write(states, 'm'")


def test_deep_momentum_checks_but_is_not_compiled_yet():
    assert nldsl.check(SPECS / "deep_momentum.nl") == []
    with pytest.raises(CodegenError, match="mlp") as e:
        compile_spec(SPECS / "deep_momentum.nl")
    assert e.value.diagnostics[0].code == "NL401"
