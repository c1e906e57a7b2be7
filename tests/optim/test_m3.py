"""M3 (specs/m3.nl) follows Algorithm 1 of the paper step by step; its slow level can be
switched off; its slow state survives a state_dict round trip in the middle of a chunk."""
from __future__ import annotations

import copy

import pytest
import torch

import nldsl.optim as rt
from optim_support import Tiny, batches, train


def ns5(G, steps=5, coefficients=(3.4445, -4.775, 2.0315), eps=1e-7):
    """Newton-Schulz_T of Algorithm 1, taken from torch.optim.Muon (the paper does not give
    the polynomial; m3.nl chooses Muon's). Dividing by sqrt(V) amplifies bfloat16 rounding
    differences between NS implementations, so the reference uses torch's own."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(G, coefficients, steps, eps).to(G.dtype)


def algorithm1(model, lr, beta1, beta2, beta3, alpha, eps, f, K, T=5):
    """A plain transcription of Algorithm 1 (M3), one list entry per parameter.

    Yields the parameters after every inner step so the test can compare step by step.
    """
    params = list(model.parameters())
    M1 = [torch.zeros_like(p) for p in params]
    M2 = [torch.zeros_like(p) for p in params]
    V = [torch.zeros_like(p) for p in params]
    data = batches(K * f)
    previous_chunk = []  # the gradients of the finished chunk, one list per step
    for k in range(K):
        # line 3: slow memory, from the gradients of the previous chunk (none for k = 0)
        for i in range(len(params)):
            M2[i] = M2[i] + beta3 * sum((gs[i] for gs in previous_chunk), torch.zeros_like(params[i]))
        # line 4
        O2 = [ns5(m, T) for m in M2]
        previous_chunk = []
        for _t in range(k * f + 1, (k + 1) * f + 1):
            x, y = next(data)
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            g = [p.grad.detach().clone() for p in params]  # line 6
            previous_chunk.append(g)
            with torch.no_grad():
                for i, p in enumerate(params):
                    M1[i] = M1[i] + beta1 * g[i]  # line 7
                    V[i] = V[i] + beta2 * g[i] ** 2  # line 8
                    O1 = ns5(M1[i], T)  # line 9
                    p -= lr * (O1 + alpha * O2[i]) / (torch.sqrt(V[i]) + eps)  # line 10
            yield [p.detach().clone() for p in params]


@pytest.mark.parametrize("hp", [
    dict(lr=0.02, betas=(0.9, 0.999, 0.9), alpha=1.0, eps=1e-8),
    dict(lr=0.01, betas=(0.5, 0.9, 0.3), alpha=0.5, eps=1e-6),
])
def test_m3_follows_algorithm_1_step_by_step(compiled, hp):
    f, K = 8, 4  # m3.nl's slow level updates every 8 steps
    ours, ref = Tiny(matrices_only=True), Tiny(matrices_only=True)
    opt = compiled("m3.nl").M3(ours.parameters(), **hp)
    b1, b2, b3 = hp["betas"]
    reference = algorithm1(ref, hp["lr"], b1, b2, b3, hp["alpha"], hp["eps"], f, K)
    for step, ((x, y), expected) in enumerate(zip(batches(K * f), reference), start=1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ours(x), y).backward()
        opt.step()
        for p, e in zip(ours.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6 * float(e.abs().max()),
                                       msg=lambda m: f"step {step}: {m}")


def test_m3_alpha_zero_is_its_fast_core(compiled, tmp_path):
    """With alpha = 0 the slow level no longer reaches the update: M3 is the spec without it."""
    core = tmp_path / "m3_core.nl"
    core.write_text(
        "optimizer M3Core {\n  lr = 0.02\n  betas = (0.9, 0.999)\n  eps = 1e-8\n  level fast : steps every 1\n"
        "  memory M1 in fast : linear { input grad; objective dot; lr constant(betas[0]) }\n"
        "  memory V in fast : elementwise { input grad ** 2; objective dot; lr constant(betas[1]) }\n"
        "  update = lr * newton_schulz(M1) / (sqrt(V) + eps)\n}\n")
    from nldsl.codegen import compile_spec

    ours, ref = Tiny(matrices_only=True), Tiny(matrices_only=True)
    train(ours, compiled("m3.nl").M3(ours.parameters(), alpha=0.0), steps=40)
    train(ref, compile_spec(core).M3Core(ref.parameters()), steps=40)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_m3_state_dict_round_trip_mid_chunk(compiled):
    M3 = compiled("m3.nl").M3
    a = Tiny(matrices_only=True)
    opt_a = M3(a.parameters(), lr=0.01)
    data = list(batches(21))

    def run(model, opt, chunk):
        for x, y in chunk:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    run(a, opt_a, data[:11])  # 11 = one chunk of 8 and 3 steps into the next
    saved_model = copy.deepcopy(a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    some = next(iter(saved_opt["state"].values()))
    assert some["step"] == 11
    assert some["M2.chunk_sum"].abs().sum() > 0  # the partial chunk is part of the state
    assert some["M2"].abs().sum() > 0  # written once, at step 8

    b = Tiny(matrices_only=True)
    b.load_state_dict(saved_model)
    opt_b = M3(b.parameters(), lr=0.01)
    opt_b.load_state_dict(saved_opt)
    run(a, opt_a, data[11:])
    run(b, opt_b, data[11:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_slow_newton_schulz_is_amortised(compiled, monkeypatch):
    """newton_schulz(M2) runs once per chunk (plus once at the start), newton_schulz(M1) every step."""
    calls = []
    real = rt.newton_schulz

    def counting(x, **kw):
        calls.append(len(x))
        return real(x, **kw)

    monkeypatch.setattr(rt, "newton_schulz", counting)
    model = Tiny(matrices_only=True)
    train(model, compiled("m3.nl").M3(model.parameters()), steps=16)
    assert len(calls) == 16 + 1 + 2


def test_m3_refuses_vectors_with_a_clear_message(compiled):
    model = Tiny()
    with pytest.raises(ValueError, match=r"shape \(8,\).*another optimizer"):
        compiled("m3.nl").M3(model.parameters())
