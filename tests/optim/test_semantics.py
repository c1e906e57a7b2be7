"""The compiled semantics on a spec that uses every feature at once, against a plain
transcription: derived constants and per-step scalars, bias correction, `init constant`,
two slow levels with different periods, a Newton-Schulz precondition on a slow memory, and
an amortised value that depends on both slow levels."""
from __future__ import annotations

import torch

import nldsl.optim as rt
from nldsl.codegen import compile_spec

from optim_support import Tiny, batches

SINK = """
# every feature of the optimizer compiler at once
optimizer Sink {
  lr = 0.05
  beta = 0.5
  half = lr / 2
  clr = lr / step
  level fast : steps every 1
  level s4 : steps every 4
  level s6 : steps every 6
  memory a in fast : elementwise { input grad; objective l2; lr constant(1 - beta); bias_correction true }
  memory b in s4 : linear { input grad; objective l2; lr constant(beta); bias_correction true; init constant(0.25) }
  memory c in s6 : linear { input grad * 2; objective dot; lr constant(1.0); precondition newton_schulz(steps=3) }
  update = half * a + clr * b + lr * newton_schulz(b + c, steps=2) + lr * c
}
"""


def ns(x, steps):
    return rt.orthogonalize(x, steps=steps).to(x.dtype)


def test_kitchen_sink_matches_a_transcription(tmp_path):
    path = tmp_path / "sink.nl"
    path.write_text(SINK)
    mod = compile_spec(path)
    ours, ref = Tiny(matrices_only=True), Tiny(matrices_only=True)
    opt = mod.Sink(ours.parameters(), lr=0.03)  # overriding lr changes `half` and `clr` too
    lr, beta = 0.03, 0.5
    params = list(ref.parameters())
    a = [torch.zeros_like(p) for p in params]
    b = [torch.full_like(p, 0.25) for p in params]
    c = [torch.zeros_like(p) for p in params]
    acc_b = [torch.zeros_like(p) for p in params]
    acc_c = [torch.zeros_like(p) for p in params]

    def b_read(i, writes):
        return b[i] / (1 - (1 - beta) ** writes) if writes else b[i]

    def slow(i, completed):
        return ns(b_read(i, completed // 4) + ns(c[i], 3), 2)

    cache = [slow(i, 0) for i in range(len(params))]
    for t, (x, y) in enumerate(batches(25), start=1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ours(x), y).backward()
        opt.step()
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad
                a[i] = a[i] + (1 - beta) * (g - a[i])
                acc_b[i] += g
                acc_c[i] += 2 * g
                upd = (lr / 2) * a[i] / (1 - beta ** t) + (lr / t) * b_read(i, (t - 1) // 4) \
                    + lr * cache[i] + lr * ns(c[i], 3)
                p -= upd
                if t % 4 == 0:
                    b[i] = b[i] - beta * (b[i] - acc_b[i])
                    acc_b[i].zero_()
                if t % 6 == 0:
                    c[i] = c[i] + acc_c[i]
                    acc_c[i].zero_()
                if t % 4 == 0 or t % 6 == 0:
                    cache[i] = slow(i, t)
        for p, q in zip(ours.parameters(), params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6 * float(q.detach().abs().max()),
                                       msg=lambda m: f"step {t}: {m}")
