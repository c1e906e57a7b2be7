"""The hand-written runtime (nldsl.optim): memory writes are gradient steps on their
objectives, the lazy foreach algebra computes what plain tensor math computes, and
Newton-Schulz is torch.optim.Muon's."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nldsl.optim as rt
from nldsl.optim.memory import write
from nldsl.optim.tensorlist import Scalars, TensorList

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _lists(seed: int, n: int = 1, positive: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ts = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        out.append([t.abs() + 0.1 for t in ts] if positive else ts)
    return out


def _objective(kind, pred, x, p=3.0, delta=0.5):
    d = pred - x
    if kind == "dot":
        return -(pred * x).sum()
    if kind == "l2":
        return 0.5 * (d ** 2).sum()
    if kind == "l1":
        return d.abs().sum()
    if kind == "lp":
        return (d.abs() ** p).sum() / p
    return torch.nn.functional.huber_loss(pred, x, delta=delta, reduction="sum")


@pytest.mark.parametrize("objective", ["dot", "l2", "l1", "lp", "huber"])
@pytest.mark.parametrize("retention", [1.0, 0.9])
@pytest.mark.parametrize("keyed", [False, True])
def test_write_is_one_gradient_step_on_the_objective(objective, retention, keyed):
    m0, x, k = _lists(0, 3)
    lr = 0.3
    states = [{"m": t.clone()} for t in m0]
    key = TensorList(k) if keyed else None
    write(states, "m", TensorList(x), objective=objective, lr=lr, retention=retention, key=key,
          p=3.0 if objective == "lp" else None, delta=0.5 if objective == "huber" else None)
    for s, mi, xi, ki in zip(states, m0, x, k):
        m = mi.clone().requires_grad_(True)
        pred = m * ki if keyed else m
        _objective(objective, pred, xi).backward()
        expected = retention * mi - lr * m.grad
        torch.testing.assert_close(s["m"], expected, rtol=1e-12, atol=1e-12)


def test_keyed_l2_with_value_one_is_elementwise_delta_momentum():
    m0, g = _lists(1, 2)
    states = [{"m": t.clone()} for t in m0]
    write(states, "m", 1.0, objective="l2", lr=0.1, retention=0.9, key=TensorList(g))
    for s, m, gi in zip(states, m0, g):
        torch.testing.assert_close(s["m"], m * (0.9 - 0.1 * gi ** 2) + 0.1 * gi)


@pytest.mark.parametrize("objective,rule", [("l2", "gd"), ("dot", "gd"), ("l2", "dgd"), ("dot", "dgd")])
def test_keyed_linear_memory_is_the_delta_rule_on_matrices(objective, rule):
    """One step on obj(m k^T, value I), plus delta gradient descent's erase -lr m k^T k for dgd."""
    g = torch.Generator().manual_seed(2)
    for shape in [(3, 5), (5, 3), (2, 3, 2)]:
        m0 = torch.randn(shape, generator=g, dtype=torch.float64)
        k = torch.randn(shape, generator=g, dtype=torch.float64)
        states = [{"m": m0.clone()}]
        write(states, "m", 0.7, key=TensorList([k]), structure="linear", objective=objective, lr=0.1,
              retention=0.9, rule=rule)
        m2, k2 = m0.reshape(shape[0], -1), k.reshape(shape[0], -1)
        mm = m2.clone().requires_grad_(True)
        target = 0.7 * torch.eye(shape[0], dtype=torch.float64)
        pred = mm @ k2.T
        loss = 0.5 * ((pred - target) ** 2).sum() if objective == "l2" else -(pred * target).sum()
        loss.backward()
        erase = m2 @ k2.T @ k2 if rule == "dgd" else 0
        expected = (0.9 * m2 - 0.1 * erase - 0.1 * mm.grad).reshape(shape)
        torch.testing.assert_close(states[0]["m"], expected)


def test_keyed_linear_memory_refuses_what_it_cannot_do():
    k = TensorList([torch.ones(3, 4)])
    states = [{"m": torch.zeros(3, 4)}]
    with pytest.raises(ValueError, match="needs key="):
        write(states, "m", k, objective="l2", rule="dgd")
    with pytest.raises(ValueError, match="must be a number"):
        write(states, "m", k, key=k, structure="linear", objective="l2")
    with pytest.raises(ValueError, match="l2 or dot"):
        write(states, "m", 1.0, key=k, structure="linear", objective="l1")
    with pytest.raises(ValueError, match="needs a matrix"):
        write([{"m": torch.zeros(4)}], "m", 1.0, key=TensorList([torch.ones(4)]), structure="linear")


def test_init_first_and_bias_correction():
    (x,) = _lists(3)
    states = [{"m": torch.zeros_like(t)} for t in x]
    write(states, "m", TensorList(x), objective="dot", lr=0.5, retention=0.9, first=True, writes=Scalars([1, 1, 1]))
    for s, t in zip(states, x):
        assert torch.equal(s["m"], t)  # the first write stores the input (torch.optim.SGD)
    r = rt.read(states, "m", bias_decay=0.9, writes=Scalars([1, 2, 0])).values()
    torch.testing.assert_close(r[0], x[0] / 0.1)
    torch.testing.assert_close(r[1], x[1] / (1 - 0.81))
    assert torch.equal(r[2], x[2])  # no write yet: read as is
    with pytest.raises(ValueError, match="decay must be below 1"):
        rt.read(states, "m", bias_decay=1.0, writes=Scalars([1, 1, 1]))


def test_chunk_sums_write_once():
    (g,) = _lists(4)
    states = [{"M": torch.zeros_like(t), "M.chunk_sum": torch.zeros_like(t)} for t in g]
    for _ in range(3):
        rt.accumulate(states, "M", TensorList(g))
    assert rt.boundaries(Scalars([3, 4, 6]), 3) == [0, 2]
    rt.write_chunk(states, "M", objective="dot", lr=0.5)
    for s, t in zip(states, g):
        torch.testing.assert_close(s["M"], 1.5 * t)
        assert not s["M.chunk_sum"].any()


def _ref(expr_name, a, b, c, s):
    return {
        "scaled_div": lambda: [2.0 * x / (torch.sqrt(y) + 0.1) for x, y in zip(a, c)],
        "sum_scaled": lambda: [x * si + 0.3 * y - z / si for x, y, z, si in zip(a, b, c, s)],
        "pow_sub": lambda: [(x - y) ** 2 for x, y in zip(a, b)],
        "rdiv": lambda: [3.0 / z for z in c],
        "max_clamp": lambda: [torch.clamp(torch.maximum(x, y), min=-0.5, max=0.5) for x, y in zip(a, b)],
        "abs_sign": lambda: [x.abs() * torch.sign(y) for x, y in zip(a, b)],
        "sqrt_scaled": lambda: [torch.sqrt(z / si) for z, si in zip(c, s)],
        "neg_rsub": lambda: [1 - (-x) for x in a],
    }[expr_name]()


def _ours(expr_name, A, B, C, S):
    return {
        "scaled_div": lambda: 2.0 * A / (rt.sqrt(C) + 0.1),
        "sum_scaled": lambda: A * S + 0.3 * B - C / S,
        "pow_sub": lambda: (A - B) ** 2,
        "rdiv": lambda: 3.0 / C,
        "max_clamp": lambda: rt.clamp(rt.maximum(A, B), min=-0.5, max=0.5),
        "abs_sign": lambda: rt.abs(A) * rt.sign(B),
        "sqrt_scaled": lambda: rt.sqrt(C / S),
        "neg_rsub": lambda: 1 - (-A),
    }[expr_name]()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(
    ["scaled_div", "sum_scaled", "pow_sub", "rdiv", "max_clamp", "abs_sign", "sqrt_scaled", "neg_rsub"]),
    s=st.lists(st.floats(0.1, 4.0), min_size=3, max_size=3))
def test_foreach_algebra_matches_plain_tensors(seed, name, s):
    a, b = _lists(seed, 2)
    (c,) = _lists(seed + 1, positive=True)
    keep = [t.clone() for t in a + b + c]
    got = _ours(name, TensorList(a), TensorList(b), TensorList(c), Scalars(s)).values()
    for x, y in zip(got, _ref(name, a, b, c, s)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for x, y in zip(a + b + c, keep):  # inputs are never modified
        assert torch.equal(x, y)


def test_bound_values_are_not_modified_by_later_ops():
    a, b = _lists(5, 2)
    g = rt.bind(TensorList(a) + 0.5 * TensorList(b))
    before = [t.clone() for t in g.values()]
    _ = (g + 1.0).values(), rt.sqrt(rt.abs(g)).values(), (g * g).values()
    for x, y in zip(g.values(), before):
        assert torch.equal(x, y)


def test_apply_update_decoupled_decay_and_param_terms():
    p0, a = _lists(6, 2)
    params = [t.clone() for t in p0]
    P = TensorList(params)
    # lr * (a / (|param| + 1) + wd * param): the first term reads param too
    rt.apply_update(P, 0.1 * (TensorList(a) / (rt.abs(P) + 1.0) + 0.01 * P))
    for x, p, ai in zip(params, p0, a):
        torch.testing.assert_close(x, p - 0.1 * (ai / (p.abs() + 1) + 0.01 * p))


def test_where_with_a_constant_condition_picks_a_branch():
    a, b = _lists(7, 2)
    assert rt.where(True, TensorList(a), TensorList(b)).a is not None
    assert rt.where(0, 1.0, 2.0) == 2.0
    out = rt.where(TensorList(a), TensorList(b), 0.0).values()
    for o, x, y in zip(out, a, b):
        torch.testing.assert_close(o, torch.where(x != 0, y, torch.zeros_like(y)))


@pytest.mark.parametrize("shape", [(8, 6), (6, 8), (5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_schulz_is_torch_muons(shape, dtype):
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    ours = rt.orthogonalize(g, steps=5, coefficients=(3.4445, -4.775, 2.0315), eps=1e-7)
    assert torch.equal(ours, _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7))
    assert torch.equal(g, torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype))


def test_matrix_shapes():
    assert rt.matrix_shape((4, 2, 3)) == (4, 6) and rt.matrix_shape((5,)) == (5, 1) and rt.matrix_shape(()) == (1, 1)
    rows, cols = rt.rows_cols([torch.zeros(4, 2, 3), torch.zeros(3, 7)])
    assert rows == (4, 3) and cols == (6, 7)
