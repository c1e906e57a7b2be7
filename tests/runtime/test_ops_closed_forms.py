"""Independent references: closed forms derived by hand (stated in each test), checked against
both implementations of each op. float64 on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nldsl.runtime as rt
from runtime_cases import DT, assert_close

B, H, K, V = 2, 2, 8, 6


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _orthonormal_keys(T, seed=0):
    """[B, T, H, K] keys that are orthonormal along T (needs T <= K)."""
    Q, _ = torch.linalg.qr(_rand(B, H, K, K, seed=seed))  # columns orthonormal
    return Q[..., :T].permute(0, 3, 1, 2).contiguous()    # [B, T, H, K]


def _read(q, S, scale):
    """o_t = scale * S_t^T q_t for a stack of states S: [B, T, H, K, V]."""
    return torch.einsum("bthk,bthkv->bthv", q * scale, S)


@pytest.mark.parametrize("read", ["running", "anchor"])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_linear_attention_is_masked_qk_v(impl, read):
    """No decay: o = (scale Q K^T, causal) V + scale Q S_0. Constant decay a: weights a^(t-i)
    on token i and a^(t+1) on S_0 (t, i counted from 0). read="anchor" reads the state before the
    token's write: the mask loses its diagonal and every power of a is one less; that read is
    also the Titans-linear op's on the dot objective, chunk 1."""
    d = 1 if read == "anchor" else 0
    T = 29
    q, k, v = _rand(B, T, H, K, seed=1), _rand(B, T, H, K, seed=2), _rand(B, T, H, V, seed=3)
    S0 = _rand(B, H, K, V, seed=4)
    scale = K ** -0.5
    scores = torch.einsum("bthk,bshk->bhts", q, k) * scale
    t = torch.arange(T, dtype=DT)
    for a in (None, 0.9):
        if a is None:
            weights, w0 = torch.ones(T, T, dtype=DT).tril(-d), torch.ones(T, dtype=DT)
        else:
            weights = (a ** (t[:, None] - t[None, :] - d)).tril(-d)
            w0 = a ** (t + 1 - d)
        expect = torch.einsum("bhts,bshv->bthv", scores * weights, v) \
            + w0[None, :, None, None] * torch.einsum("bthk,bhkv->bthv", q * scale, S0)
        out = rt.linear_attention(q, k, v, decay=a, initial_state=S0, impl=impl, chunk_size=8, read=read,
                                  output_final_state=True)
        assert_close(out.o, expect, f"decay={a}")
        if read == "anchor":
            titans = rt.titans_linear(q, k, v, 1.0, 0.0, 1 - (a or 1.0), initial_state=S0, output_final_state=True,
                                      impl="reference", chunk_size=1, objective="dot", read="anchor")
            assert_close(out.o, titans.o, f"titans decay={a}")
            assert_close(out.final_state, titans.final_state.memory, f"state decay={a}")


def test_linear_attention_kernels_read_after_the_write():
    q = _rand(1, 4, 1, 8)
    with pytest.raises(ValueError, match="read after the write"):
        rt.linear_attention(q, q, q, impl="triton", read="anchor")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gated_linear_attention_log_gate(impl):
    """Data-dependent g: weight exp(sum_{l=i+1}^t g_l) on token i (masked parallel form)."""
    T = 21
    q, k, v = _rand(B, T, H, K, seed=1), _rand(B, T, H, K, seed=2), _rand(B, T, H, V, seed=3)
    g = -0.5 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=DT)
    cum = g.cumsum(1).permute(0, 2, 1)                          # [B, H, T]
    decay = (cum[..., :, None] - cum[..., None, :]).exp().tril()
    expect = torch.einsum("bhts,bhts,bshv->bthv", torch.einsum("bthk,bshk->bhts", q * K ** -0.5, k), decay, v)
    out = rt.linear_attention(q, k, v, g=g, impl=impl, chunk_size=4)
    assert_close(out.o, expect)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_delta_rule_orthonormal_keys_beta_one(impl):
    """beta = 1 and orthonormal keys: each write replaces the memory's answer for its key, so
    S_t = (I - sum_{i<=t} k_i k_i^T) S_0 + sum_{i<=t} k_i v_i^T."""
    T = 7
    k = _orthonormal_keys(T)
    q, v, S0 = _rand(B, T, H, K, seed=1), _rand(B, T, H, V, seed=2), _rand(B, H, K, V, seed=3)
    P = torch.einsum("bihk,bihl->bihkl", k, k).cumsum(1)       # sum_{i<=t} k_i k_i^T
    W = torch.einsum("bihk,bihv->bihkv", k, v).cumsum(1)
    S = S0[:, None] - P @ S0[:, None] + W
    out = rt.delta_rule(q, k, v, 1.0, initial_state=S0, output_final_state=True, impl=impl, chunk_size=4)
    assert_close(out.o, _read(q, S, K ** -0.5))
    assert_close(out.final_state, S[:, -1])


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gated_delta_with_zero_gate_is_delta(impl):
    T = 13
    q, k, v = _rand(B, T, H, K, seed=1), F.normalize(_rand(B, T, H, K, seed=2), dim=-1), _rand(B, T, H, V, seed=3)
    beta = torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT)
    a = rt.gated_delta_rule(q, k, v, beta, torch.zeros(B, T, H, dtype=DT), impl=impl, chunk_size=4)
    b = rt.delta_rule(q, k, v, beta, impl="reference")
    assert_close(a.o, b.o)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_titans_without_momentum_and_forgetting_is_delta_rule(impl):
    """eta = 0, alpha = 0, chunk 1: S_t = -theta_t grad, M_t = M_{t-1} + S_t = delta rule with
    beta = theta (the loss carries the 1/2, so no factor 2)."""
    T = 17
    q, k, v = _rand(B, T, H, K, seed=1), F.normalize(_rand(B, T, H, K, seed=2), dim=-1), _rand(B, T, H, V, seed=3)
    theta = torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT)
    S0 = _rand(B, H, K, V, seed=5)
    a = rt.titans_linear(q, k, v, theta, 0.0, 0.0, initial_state=S0, output_final_state=True, impl=impl, chunk_size=1)
    b = rt.delta_rule(q, k, v, theta, initial_state=S0, output_final_state=True, impl="reference")
    assert_close(a.o, b.o)
    assert_close(a.final_state.memory, b.final_state)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_titans_one_chunk_is_minibatch_gd(impl):
    """One chunk (chunk_size = T), no momentum, no forgetting: every gradient is taken at M_0, so
    M_t = M_0 - sum_{j<=t} theta_j k_j (k_j^T M_0 - v_j^T) (TTT's mini-batch GD). With constant
    momentum eta and no forgetting, M_t = M_0 + sum_{i<=t} S_i, S_i = sum_{j<=i} eta^(i-j) (-G_j)."""
    T = 11
    q, k, v = _rand(B, T, H, K, seed=1), _rand(B, T, H, K, seed=2), _rand(B, T, H, V, seed=3)
    theta = torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT)
    M0 = _rand(B, H, K, V, seed=5)
    G = theta[..., None, None] * torch.einsum("bthk,bthv->bthkv", k, torch.einsum("bthk,bhkv->bthv", k, M0) - v)
    for eta in (0.0, 0.7):
        t = torch.arange(T, dtype=DT)
        mom = (eta ** (t[:, None] - t[None, :])).tril() if eta else torch.eye(T, dtype=DT)
        Smom = -torch.einsum("ts,bshkv->bthkv", mom, G)
        M = M0[:, None] + Smom.cumsum(1)
        out = rt.titans_linear(q, k, v, theta, eta, 0.0, initial_state=M0, output_final_state=True,
                               impl=impl, chunk_size=T)
        assert_close(out.o, _read(q, M, K ** -0.5), f"eta={eta}")
        assert_close(out.final_state.momentum, Smom[:, -1])


@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_titans_dot_objective_is_hebbian(impl, chunk):
    """objective "dot", no momentum: the gradient -k v^T needs no state, so every chunk size gives
    linear attention on theta-scaled values with retention 1 - alpha (read running); the anchor
    read is the state at the start of the token's chunk: o_t = scale q_t^T S_{C floor(t/C)}, S_n
    linear attention's state after n tokens (chunk 1: read before write). Gradients too."""
    T = 13
    inputs = [_rand(B, T, H, K, seed=1), F.normalize(_rand(B, T, H, K, seed=2), dim=-1), _rand(B, T, H, V, seed=3),
              0.1 + 0.5 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT),
              0.2 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=DT),
              _rand(B, H, K, V, seed=6)]
    for x in inputs:
        x.requires_grad_(True)
    q, k, v, theta, alpha, S0 = inputs
    scale = K ** -0.5

    def hebbian(n):  # linear attention over the first n tokens: (o, S_n)
        return rt.linear_attention(q[:, :n], k[:, :n], v[:, :n] * theta[:, :n, :, None], g=(1 - alpha[:, :n]).log(),
                                   initial_state=S0, output_final_state=True, impl="reference")

    running = rt.titans_linear(q, k, v, theta, 0.0, alpha, initial_state=S0, output_final_state=True, impl=impl,
                               chunk_size=chunk, objective="dot")
    expect, S_T = hebbian(T)
    assert_close(running.o, expect, "running")
    assert_close(running.final_state.memory, S_T)
    anchor = rt.titans_linear(q, k, v, theta, 0.0, alpha, initial_state=S0, impl=impl, chunk_size=chunk,
                              objective="dot", read="anchor").o
    starts = torch.stack([S0 if t < chunk else hebbian(t // chunk * chunk).final_state for t in range(T)], dim=1)
    expect_anchor = _read(q, starts, scale)
    assert_close(anchor, expect_anchor, "anchor")
    w = _rand(B, T, H, V, seed=7)
    for got, want in ((running.o, expect), (anchor, expect_anchor)):
        ga = torch.autograd.grad((got * w).sum(), inputs, retain_graph=True)
        gb = torch.autograd.grad((want * w).sum(), inputs, retain_graph=True)
        for a, b, name in zip(ga, gb, ("q", "k", "v", "theta", "alpha", "S0")):
            assert_close(a, b, f"d{name}")


@pytest.mark.parametrize("objective, kw, phi", [
    ("l1", {}, torch.sign),
    ("lp", {"p": 3.0}, lambda r: r.abs() ** 2 * torch.sign(r)),
    ("huber", {"delta": 0.4}, lambda r: r.clamp(-0.4, 0.4)),
])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_titans_robust_objectives_one_chunk(impl, objective, kw, phi):
    """One chunk, no momentum, no forgetting: every gradient at M_0, so M_t = M_0 - sum_{j<=t}
    theta_j k_j phi(k_j^T M_0 - v_j)^T, phi the objective's derivative (l1: sign; lp, 1/p |r|^p:
    |r|^(p-1) sign r; huber: r clipped to +-delta). Gradients too."""
    T = 9
    inputs = [_rand(B, T, H, K, seed=1), F.normalize(_rand(B, T, H, K, seed=2), dim=-1), _rand(B, T, H, V, seed=3),
              0.1 + 0.5 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT),
              _rand(B, H, K, V, seed=5)]
    for x in inputs:
        x.requires_grad_(True)
    q, k, v, theta, M0 = inputs
    e = phi(torch.einsum("bthk,bhkv->bthv", k, M0) - v)
    M = M0[:, None] - (theta[..., None, None] * torch.einsum("bthk,bthv->bthkv", k, e)).cumsum(1)
    expect = _read(q, M, K ** -0.5)
    out = rt.titans_linear(q, k, v, theta, 0.0, 0.0, initial_state=M0, output_final_state=True, impl=impl,
                           chunk_size=T, objective=objective, **kw)
    assert_close(out.o, expect)
    assert_close(out.final_state.memory, M[:, -1])
    w = _rand(B, T, H, V, seed=6)
    for a, b, name in zip(torch.autograd.grad((out.o * w).sum(), inputs),
                          torch.autograd.grad((expect * w).sum(), inputs), ("q", "k", "v", "theta", "M0")):
        assert_close(a, b, f"d{name}")


def test_lp_below_2_at_a_zero_residual():
    """lp with p < 2: the derivative |r|^(p-1) sign r is 0 at r = 0, and its own derivative
    (p-1) |r|^(p-2), infinite there, is taken as 0 (the convention of abs' at 0), so the outer
    gradient through a write stays finite; elsewhere both are the closed forms. The loss as
    the references write it, |r|^p / p, differentiates to the same."""
    from nldsl.runtime._common import objective_gradient, objective_loss

    r = torch.tensor([-2.0, -0.25, 0.0, 0.5, 3.0], dtype=DT, requires_grad=True)
    g = objective_gradient("lp", r, p=1.5)
    assert_close(g, torch.tensor([-2 ** 0.5, -0.5, 0.0, 0.5 ** 0.5, 3 ** 0.5], dtype=DT))
    (dg,) = torch.autograd.grad(g.sum(), r)
    assert_close(dg, torch.tensor([0.5 * 2 ** -0.5, 0.5 * 0.25 ** -0.5, 0.0, 0.5 * 0.5 ** -0.5, 0.5 * 3 ** -0.5],
                                  dtype=DT))
    (dl,) = torch.autograd.grad(objective_loss("lp", r, torch.zeros_like(r), p=1.5), r, create_graph=True)
    assert_close(dl, g)
    assert torch.isfinite(torch.autograd.grad(dl.sum(), r)[0]).all()


def test_titans_objective_arguments_are_checked():
    q = k = _rand(1, 2, 1, 4)
    for kw, bad in (({"objective": "lp"}, "p"), ({"objective": "lp", "p": 0.5}, "p"),
                    ({"objective": "l2", "p": 2.0}, "p"), ({"objective": "huber", "delta": 0.0}, "delta"),
                    ({"objective": "l1", "delta": 1.0}, "delta"), ({"objective": "l3"}, "objective")):
        with pytest.raises(ValueError, match=bad):
            rt.titans_linear(q, k, k, 0.5, 0.0, 0.0, **kw)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_dgd_orthonormal_keys(impl, chunk):
    """alpha = 1, orthonormal keys: the erases act on distinct directions, and k_j^T S_{a(j)} =
    k_j^T S_0 for every anchor (no earlier token touched direction k_j), so for any chunk size
    S_t = S_0 - sum_{j<=t} eta_j k_j (2 k_j^T S_0 - v_j^T)  (erase + gradient = twice the pull)."""
    T = 7
    k = _orthonormal_keys(T)
    q, v, S0 = _rand(B, T, H, K, seed=1), _rand(B, T, H, V, seed=2), _rand(B, H, K, V, seed=3)
    eta = 0.4 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT)
    upd = eta[..., None, None] * torch.einsum(
        "bthk,bthv->bthkv", k, 2 * torch.einsum("bthk,bhkv->bthv", k, S0) - v)
    S = S0[:, None] - upd.cumsum(1)
    out = rt.dgd(q, k, v, eta, 1.0, initial_state=S0, impl=impl, chunk_size=chunk)
    assert_close(out.o, _read(q, S, K ** -0.5))


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_dgd_dot_objective_is_a_gated_delta_rule(impl, chunk):
    """Objective dot: S_t = (alpha I - eta k k^T) S_{t-1} + eta k v^T at any chunk size (no anchor
    in its gradient) = Gated DeltaNet's alpha (I - beta k k^T) S + beta k v'^T with beta = eta /
    alpha and v' = alpha v, read running. Gradients too."""
    T = 19
    inputs = [_rand(B, T, H, K, seed=1), F.normalize(_rand(B, T, H, K, seed=2), dim=-1), _rand(B, T, H, V, seed=3),
              0.05 + 0.35 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT),
              0.8 + 0.2 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=DT),
              _rand(B, H, K, V, seed=6)]
    for x in inputs:
        x.requires_grad_(True)
    q, k, v, eta, alpha, S0 = inputs
    out = rt.dgd(q, k, v, eta, alpha, initial_state=S0, output_final_state=True, impl=impl, chunk_size=chunk,
                 objective="dot")
    ref = rt.gated_delta_rule(q, k, v * alpha[..., None], eta / alpha, alpha.log(), initial_state=S0,
                              output_final_state=True, impl="reference")
    assert_close(out.o, ref.o)
    assert_close(out.final_state.memory, ref.final_state)
    w = _rand(B, T, H, V, seed=7)
    for a, b, name in zip(torch.autograd.grad((out.o * w).sum(), inputs),
                          torch.autograd.grad((ref.o * w).sum(), inputs), ("q", "k", "v", "eta", "alpha", "S0")):
        assert_close(a, b, f"d{name}")
    with pytest.raises(ValueError, match="l2 objective"):
        rt.dgd(q, k, v, eta, alpha, impl="triton", objective="dot")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_dgd_pure_retention(impl):
    """eta = 0: S_t = (prod_{l<=t} alpha_l) S_0."""
    T = 9
    q, k, v = _rand(B, T, H, K, seed=1), _rand(B, T, H, K, seed=2), _rand(B, T, H, V, seed=3)
    S0 = _rand(B, H, K, V, seed=4)
    alpha = 0.5 + 0.5 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=DT)
    S = alpha.cumprod(1)[..., None, None] * S0[:, None]
    out = rt.dgd(q, k, v, 0.0, alpha, initial_state=S0, impl=impl, chunk_size=4)
    assert_close(out.o, _read(q, S, K ** -0.5))


@pytest.mark.parametrize("read", ["running", "anchor"])
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_omega_orthonormal_keys(impl, window, read):
    """alpha = 1, orthonormal keys: along key i the residual r_i = k_i^T S - v_i^T shrinks by
    (1 - gamma_i) at each step whose window holds i, i.e. n_i(t) = min(t - i + 1, c) times:
    k_i^T S_t = v_i^T + (1 - gamma_i)^{n_i(t)} (k_i^T S_0 - v_i^T); other directions keep S_0.
    The anchor read takes S_{t-1}."""
    T = 7
    k = _orthonormal_keys(T)
    q, v, S0 = _rand(B, T, H, K, seed=1), _rand(B, T, H, V, seed=2), _rand(B, H, K, V, seed=3)
    gamma = 0.1 + 0.5 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT)
    r0 = torch.einsum("bihk,bhkv->bihv", k, S0) - v                   # [B, i, H, V]
    t = torch.arange(T)
    n = (t[:, None] - t[None, :] + 1).clamp(min=0, max=window)          # [t, i]
    shrink = (1 - gamma)[:, None] ** n[None, :, :, None]                # [B, t, i, H]
    delta = torch.einsum("btih,bihv->btihv", shrink - 1, r0)            # change of k_i^T S
    S = S0[:, None] + torch.einsum("bihk,btihv->bthkv", k, delta)
    if read == "anchor":
        S = torch.cat([S0[:, None], S[:, :-1]], 1)
    out = rt.omega_rule(q, k, v, gamma, 1.0, window=window, initial_state=S0, impl=impl, chunk_size=4, read=read)
    assert_close(out.o, _read(q, S, K ** -0.5))


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_omega_dot_is_masked_attention_with_window_counts(impl, window):
    """Dot objective, constant retention a: token i is written at each step s of its window,
    i <= s <= i + c - 1, and decays from there, so S_t = a^(t+1) S_0 + sum_{i<=t} w_ti gamma_i k_i v_i^T
    with w_ti = sum_{s=i}^{min(t, i+c-1)} a^(t-s), and o_t = scale q_t^T S_t: a causal
    Q K^T V with weights w. Outputs and the gradients of every input agree."""
    T, a, scale = 11, 0.8, K ** -0.5
    leaves = [_rand(B, T, H, K, seed=1), _rand(B, T, H, K, seed=2), _rand(B, T, H, V, seed=3),
              0.1 + 0.5 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(4), dtype=DT),
              _rand(B, H, K, V, seed=5)]
    for x in leaves:
        x.requires_grad_()
    q, k, v, gamma, S0 = leaves
    t, i = torch.arange(T, dtype=DT)[:, None], torch.arange(T, dtype=DT)[None, :]
    w = torch.zeros(T, T, dtype=DT)
    for s in range(T):  # step s writes the tokens of its window, s - c + 1 <= i <= s
        w += ((i <= s) & (i > s - window) & (t >= s)).to(DT) * a ** (t - s).clamp(min=0)
    scores = torch.einsum("bthk,bihk->bhti", q, k) * w                     # [B, H, t, i]
    expect = scale * (torch.einsum("bhti,bihv->bthv", scores, gamma[..., None] * v)
                      + torch.einsum("t,bthk,bhkv->bthv", a ** (torch.arange(T, dtype=DT) + 1), q, S0))
    out = rt.omega_rule(q, k, v, gamma, a, window=window, initial_state=S0, impl=impl, chunk_size=4,
                        objective="dot")
    assert_close(out.o, expect)
    probe = _rand(B, T, H, V, seed=6)
    for got, want in zip(torch.autograd.grad((out.o * probe).sum(), leaves),
                         torch.autograd.grad((expect * probe).sum(), leaves)):
        assert_close(got, want)


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_softmax_attention_per_query_loop(impl, window):
    """o_t = sum_i softmax_i(scale q_t . k_i) v_i over the allowed keys, one query at a time,
    with a 3-token cache in front of the sequence."""
    T, L = 9, 3
    q, k, v = _rand(B, T, H, K, seed=1), _rand(B, T, H, K, seed=2), _rand(B, T, H, V, seed=3)
    ck, cv = _rand(B, L, H, K, seed=4), _rand(B, L, H, V, seed=5)
    ka, va = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
    expect = torch.empty(B, T, H, V, dtype=DT)
    for t in range(T):
        lo = 0 if window is None else max(0, L + t - window + 1)
        s = torch.einsum("bhk,bshk->bhs", q[:, t], ka[:, lo:L + t + 1]) * K ** -0.5
        expect[:, t] = torch.einsum("bhs,bshv->bhv", s.softmax(-1), va[:, lo:L + t + 1])
    out = rt.softmax_attention(q, k, v, window=window, kv_cache=rt.KVCache(ck, cv), impl=impl)
    assert_close(out.o, expect)
