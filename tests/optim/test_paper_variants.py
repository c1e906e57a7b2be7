"""The paper's more expressive momenta (section 4.4): delta momentum (Eq. 48-49) with the
gradient as the memory's key, elementwise (specs/delta_momentum.nl) and as matrices, and
preconditioned momentum (Eq. 46-47), against their written-out updates. Deep momentum
(Eq. 50) is tests/optim/test_deep_momentum.py."""
from __future__ import annotations

import pytest
import torch

from nldsl.codegen import compile_spec

from optim_support import Tiny, assert_params_close, batches, train


def test_delta_momentum_follows_its_elementwise_update(compiled):
    lr, alpha, eta, wd = 0.02, 0.9, 0.1, 0.01
    ours, ref = Tiny(), Tiny()  # every rank: the association is elementwise
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
                ms[i] = ms[i] * (alpha - eta * g * g) + eta * g  # one step on 1/2 ||m * g - 1||^2
                p -= lr * ms[i] + lr * wd * p
    assert_params_close(ours, ref, rel=1e-10)


@pytest.mark.parametrize("shape", [(3, 4), (5,), (2, 3, 2), ()])
def test_delta_momentum_closed_form_on_a_constant_gradient(compiled, shape):
    """With a constant gradient g the write is the affine recursion m <- r m + eta g, r = alpha -
    eta g^2, so m_t = eta g (1 - r^t) / (1 - r) and W_t = W_0 - lr sum_{s<=t} m_s =
    W_0 - lr eta g / (1 - r) (t - r (1 - r^t) / (1 - r))."""
    lr, alpha, eta = 0.05, 0.9, 0.5
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = compiled("delta_momentum.nl").DeltaMomentum([w], lr=lr, momentum=alpha, eta=eta)
    r = alpha - eta * g * g
    for t in range(1, 13):
        w.grad = g.clone()
        opt.step()
        m_t = eta * g * (1 - r ** t) / (1 - r)
        w_t = w0 - lr * eta * g / (1 - r) * (t - r * (1 - r ** t) / (1 - r))
        torch.testing.assert_close(opt.state[w]["m"], m_t, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(w.detach(), w_t, rtol=1e-12, atol=1e-14)


_MATRIX = """
optimizer MatrixDeltaMomentum {
  lr = 0.02
  momentum = 0.9
  eta = 0.1
  level step : steps every 1
  memory m in step : linear {
    key grad; input 1; objective OBJECTIVE; rule RULE; retention constant(momentum); lr constant(eta)
  }
  update = lr * m
}
"""


@pytest.mark.parametrize("objective,rule,erases", [("l2", "gd", 1), ("dot", "dgd", 1), ("l2", "dgd", 2),
                                                   ("dot", "gd", 0)])
def test_matrix_delta_momentum_follows_eq_49(tmp_path, objective, rule, erases):
    """Eq. 48 read with m and g as matrices: one step on 1/2 ||m g^T - I||^2 (`l2`) gives Eq. 49,
    m (alpha I - eta g^T g) + eta g; `dot` with delta gradient descent's erase is the same
    write, `l2` with it erases twice, `dot` alone is momentum."""
    path = tmp_path / "matrix.nl"
    path.write_text(_MATRIX.replace("OBJECTIVE", objective).replace("RULE", rule))
    lr, alpha, eta = 0.02, 0.9, 0.1
    ours, ref = Tiny(matrices_only=True), Tiny(matrices_only=True)
    train(ours, compile_spec(path).MatrixDeltaMomentum(ours.parameters()), steps=30)
    ms = [torch.zeros_like(p) for p in ref.parameters()]
    for x, y in batches(30):
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                g = p.grad
                eye = torch.eye(g.shape[1], dtype=g.dtype)
                ms[i] = ms[i] @ (alpha * eye - erases * eta * g.T @ g) + eta * g
                p -= lr * ms[i]
    assert_params_close(ours, ref, rel=1e-10)


def test_matrix_delta_momentum_refuses_vectors(tmp_path):
    path = tmp_path / "matrix.nl"
    path.write_text(_MATRIX.replace("OBJECTIVE", "l2").replace("RULE", "gd"))
    with pytest.raises(ValueError, match="a linear memory with a key treats each parameter as a matrix"):
        compile_spec(path).MatrixDeltaMomentum([torch.nn.Parameter(torch.zeros(3))])


def test_preconditioned_momentum_reads_v_after_its_write(compiled):
    """Same level, m depends on v: v is written first (the paper's ordering), as RMSprop."""
    import inspect

    code = inspect.getsource(compiled("preconditioned_momentum.nl").PreconditionedMomentum)
    assert code.index("rt.write(states, 'v'") < code.index("v = rt.read(") < code.index("rt.write(states, 'm'")

