"""Deep momentum (section 4.4, Eq. 50): specs/deep_momentum.nl against a plain-Python
transcription of its equations, coordinate by coordinate in float64 with hand-derived
gradients of the memory's MLP; state_dict, param groups, closures; its degenerate linear
ablation against torch.optim.SGD; the MLP memory's write against finite differences."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import nldsl
from nldsl.ablate import ablation_edits, apply, without_ablations
from nldsl.codegen import CodegenError, compile_spec
from nldsl.optim.deep import CoordinateMLP
from nldsl.optim.tensorlist import TensorList
from nldsl.syntax import ast as A
from nldsl.syntax.parser import parse
from nldsl.syntax.printer import format_file

from optim_support import SPECS, Tiny, assert_params_close, batches, train

# ---- the transcription: one MLP per coordinate, in plain Python floats ----------------------


def _gelu(z: float) -> float:
    return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))


def _gelu_slope(z: float) -> float:  # d/dz of the exact GELU: Phi(z) + z phi(z)
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))) + z * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


ACTS = {"gelu": (_gelu, _gelu_slope), "tanh": (math.tanh, lambda z: 1.0 - math.tanh(z) ** 2)}


class CoordinateMemory:
    """m(x) = x + W_D s(... s(W_1 x)) for one coordinate, as nested lists (rows of each layer)."""

    def __init__(self, depth: int, hidden: int, residual: bool, activation: str):
        widths = [1] + [hidden] * (depth - 1) + [1]
        self.layers = []
        for i in range(depth):
            rows, cols = widths[i + 1], widths[i]
            if i == depth - 1:  # the learned part starts at zero
                w = [[0.0] * cols for _ in range(rows)]
            elif i == 0:  # the fan of slopes +-1/n, ..., +-1, n = ceil(hidden / 2)
                n = math.ceil(rows / 2)
                w = [[(-1) ** j * (j // 2 + 1) / n] for j in range(rows)]
            else:
                w = [[1.0 if r == c else 0.0 for c in range(cols)] for r in range(rows)]
            self.layers.append(w)
        self.residual = residual
        self.act, self.slope = ACTS[activation]

    def forward(self, x: float):
        acts, pre = [[x]], []
        for i, w in enumerate(self.layers):
            z = [sum(wr[c] * acts[-1][c] for c in range(len(wr))) for wr in w]
            pre.append(z)
            acts.append([self.act(v) for v in z] if i < len(self.layers) - 1 else z)
        y = acts[-1][0] + (x if self.residual else 0.0)
        return y, acts, pre

    def __call__(self, x: float) -> float:
        return self.forward(x)[0]

    def write(self, key: float, value: float, objective: str, lr: float, retention: float) -> None:
        """theta <- retention theta - lr dL/dtheta, backpropagated by hand."""
        y, acts, pre = self.forward(key)
        dy = -value if objective == "dot" else y - value  # dot: L = -m(k) v; l2: L = (m(k) - v)^2 / 2
        delta = [dy]  # dL/d(output of the last layer)
        grads = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            w = self.layers[i]
            grads[i] = [[delta[r] * acts[i][c] for c in range(len(w[0]))] for r in range(len(w))]
            if i > 0:
                back = [sum(w[r][c] * delta[r] for r in range(len(w))) for c in range(len(w[0]))]
                delta = [b * self.slope(z) for b, z in zip(back, pre[i - 1])]
        for w, g in zip(self.layers, grads):
            for r in range(len(w)):
                for c in range(len(w[0])):
                    w[r][c] = retention * w[r][c] - lr * g[r][c]


class ReferenceDeepMomentum:
    """Eq. 50 with this spec's conventions, for one parameter group:
    write m with key u = grad and value 1, then W <- W - lr m(u)."""

    def __init__(self, params, lr, momentum, eta, depth=2, hidden=8, residual=True, activation="gelu",
                 objective="dot"):
        self.params = list(params)
        self.lr, self.momentum, self.eta, self.objective = lr, momentum, eta, objective
        self.memories = [[CoordinateMemory(depth, hidden, residual, activation) for _ in range(p.numel())]
                         for p in self.params]

    def step(self):
        for p, mems in zip(self.params, self.memories):
            flat = p.detach().reshape(-1)
            grad = p.grad.reshape(-1).tolist()
            new = []
            for j, (mem, u) in enumerate(zip(mems, grad)):
                mem.write(u, 1.0, self.objective, self.eta, self.momentum)
                new.append(flat[j].item() - self.lr * mem(u))
            with torch.no_grad():
                p.copy_(torch.tensor(new, dtype=p.dtype).reshape(p.shape))


def _run_reference(model, groups, steps):
    opts = [ReferenceDeepMomentum(ps, **hp) for ps, hp in groups]
    for x, y in batches(steps):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for o in opts:
            o.step()
    return model


# ---- the compiled spec against the transcription --------------------------------------------


@pytest.mark.parametrize("hp", [dict(lr=0.05, momentum=0.9, eta=0.1), dict(lr=0.2, momentum=0.5, eta=1.0)])
def test_deep_momentum_follows_eq_50_step_by_step(compiled, hp):
    ours, ref = Tiny(), Tiny()  # matrices, a vector, a 3-D tensor and a scalar
    opt = compiled("deep_momentum.nl").DeepMomentum(ours.parameters(), **hp)
    train(ours, opt, steps=6)
    _run_reference(ref, [(ref.parameters(), hp)], steps=6)
    assert_params_close(ours, ref, rel=1e-10)
    assert not torch.equal(ours.w1, Tiny().w1)


def test_param_groups_and_closures(compiled):
    ours, ref = Tiny(), Tiny()
    fast = dict(lr=0.1, momentum=0.8, eta=0.5)
    slow = dict(lr=0.02, momentum=0.95, eta=0.05)

    def split(m):
        return [m.w1, m.w2, m.b1], [m.w3, m.k, m.s]

    a, b = split(ours)
    opt = compiled("deep_momentum.nl").DeepMomentum([{"params": a, **fast}, {"params": b}], **slow)
    train(ours, opt, steps=5, closure=True)
    ra, rb = split(ref)
    _run_reference(ref, [(ra, fast), (rb, slow)], steps=5)
    assert_params_close(ours, ref, rel=1e-10)


@pytest.mark.parametrize("kw", [dict(depth=3, hidden=3, activation="tanh"),
                                dict(depth=1, hidden=1, residual=False, objective="l2")])
def test_other_memory_shapes_and_objectives(tmp_path, kw):
    depth, hidden = kw["depth"], kw["hidden"]
    residual, activation = kw.get("residual", True), kw.get("activation", "gelu")
    objective = kw.get("objective", "dot")
    text = (SPECS / "deep_momentum.nl").read_text().split("\nablation ")[0]
    text = text.replace("mlp(depth=2, expansion=8)", f"mlp(depth={depth}, expansion={hidden}, "
                        f"residual={str(residual).lower()}, activation={activation})")
    text = text.replace("objective dot", f"objective {objective}")
    path = tmp_path / "variant.nl"
    path.write_text(text)
    hp = dict(lr=0.1, momentum=0.9, eta=0.3)
    ours, ref = Tiny(), Tiny()
    train(ours, compile_spec(path).DeepMomentum(ours.parameters(), **hp), steps=5)
    _run_reference(ref, [(ref.parameters(), dict(hp, depth=depth, hidden=hidden, residual=residual,
                                                 activation=activation, objective=objective))], steps=5)
    assert_params_close(ours, ref, rel=1e-10)


def test_state_dict_mid_run_equals_an_uninterrupted_run(compiled):
    cls = compiled("deep_momentum.nl").DeepMomentum
    data = list(batches(8))

    def run(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    whole = Tiny()
    run(whole, cls(whole.parameters(), lr=0.1, eta=0.3), data)
    first = Tiny()
    opt = cls(first.parameters(), lr=0.1, eta=0.3)
    run(first, opt, data[:4])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    assert {"m.layers.0", "m.layers.1", "step"} <= set(saved_opt["state"][0])
    resumed = Tiny()
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.parameters(), lr=0.1, eta=0.3)
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, data[4:])
    for x, y in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(x, y)


def test_chunked_passes_equal_one_pass(compiled, monkeypatch):
    """Large parameters are processed a chunk of coordinates at a time: chunk borders change
    nothing (here chunks of 5 cut every tensor of the model, and the scalar stays whole)."""
    import nldsl.optim.deep as deep

    cls = compiled("deep_momentum.nl").DeepMomentum
    whole, parts = Tiny(), Tiny()
    train(whole, cls(whole.parameters(), lr=0.1, eta=0.5), steps=4)
    monkeypatch.setattr(deep, "CHUNK", 5)
    train(parts, cls(parts.parameters(), lr=0.1, eta=0.5), steps=4)
    for x, y in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_memory_state_shapes_follow_every_rank(compiled):
    model = Tiny()
    opt = compiled("deep_momentum.nl").DeepMomentum(model.parameters())
    train(model, opt, steps=1)
    for p in model.parameters():
        st = opt.state[p]
        assert st["m.layers.0"].shape == p.shape + (8, 1) and st["m.layers.1"].shape == p.shape + (1, 8)
        assert st["m.layers.0"].dtype == p.dtype


def _variant(name: str) -> str:
    f = parse((SPECS / "deep_momentum.nl").read_text(), "deep_momentum.nl")
    ab = next(it for it in f.items if isinstance(it, A.Ablation) and it.name == name)
    return format_file(apply(without_ablations(f), ablation_edits(ab)))


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_linear_ablation_is_torch_sgd_with_momentum(tmp_path, momentum):
    path = tmp_path / "linear_momentum.nl"
    path.write_text(_variant("linear_momentum"))
    assert nldsl.check(path) == []
    ours, ref = Tiny(), Tiny()
    opt = compile_spec(path).DeepMomentum(ours.parameters(), lr=0.05, momentum=momentum)
    train(ours, opt, steps=40)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum), steps=40)
    assert_params_close(ours, ref, rel=1e-10)


# ---- the runtime memory against finite differences -----------------------------------------


def _loss(mlp, weights, key, value, objective):
    y = mlp.forward(weights, key)
    d = y - value
    return {"dot": -(y * value).sum(), "l2": 0.5 * (d ** 2).sum(), "l1": d.abs().sum(),
            "huber": torch.nn.functional.huber_loss(y, value, delta=0.5, reduction="sum")}[objective]


@pytest.mark.parametrize("objective", ["dot", "l2", "l1", "huber"])
@pytest.mark.parametrize("depth,activation,residual", [(1, "identity", False), (2, "gelu", True),
                                                       (3, "silu", False), (2, "relu", True)])
def test_mlp_write_is_one_gradient_step(objective, depth, activation, residual):
    """The write equals retention * theta - lr * dL/dtheta, the gradient by central differences."""
    mlp = CoordinateMLP(depth=depth, hidden=3, residual=residual, activation=activation)
    g = torch.Generator().manual_seed(depth)
    shape = (2, 3)
    state = {k: torch.randn(shape + w.shape[-2:], generator=g, dtype=torch.float64)
             for k, w in mlp.initial_state("m", torch.zeros(shape, dtype=torch.float64)).items()}
    key = torch.randn(shape, generator=g, dtype=torch.float64)
    value = torch.randn(shape, generator=g, dtype=torch.float64)
    before = {k: v.clone() for k, v in state.items()}
    mlp.write([state], "m", TensorList([value]), key=TensorList([key]), objective=objective, lr=0.3,
              retention=0.9, delta=0.5)
    h = 1e-6
    for name, w0 in before.items():
        grad = torch.zeros_like(w0)
        for i in range(w0.numel()):
            plus, minus = dict(before), dict(before)
            plus[name], minus[name] = w0.clone(), w0.clone()
            plus[name].view(-1)[i] += h
            minus[name].view(-1)[i] -= h
            lp = _loss(mlp, [plus[k] for k in mlp.keys("m")], key, value, objective)
            lm = _loss(mlp, [minus[k] for k in mlp.keys("m")], key, value, objective)
            grad.view(-1)[i] = (lp - lm) / (2 * h)
        torch.testing.assert_close(state[name], 0.9 * w0 - 0.3 * grad, rtol=1e-6, atol=1e-7)


def test_mlp_initial_state_is_the_identity_or_zero():
    p = torch.randn(4, 5, dtype=torch.float64)
    for residual in (True, False):
        mlp = CoordinateMLP(depth=3, hidden=4, residual=residual, activation="gelu")
        state = mlp.initial_state("m", p)
        read = mlp.read([state], "m", TensorList([p])).values()[0]
        torch.testing.assert_close(read, p if residual else torch.zeros_like(p))
        assert state["m.layers.0"][0, 0].flatten().tolist() == [0.5, -0.5, 1.0, -1.0]


def test_mlp_structure_is_validated():
    with pytest.raises(ValueError, match="whole hidden width"):
        CoordinateMLP(depth=2, hidden=2.5, residual=True, activation="gelu")
    with pytest.raises(ValueError, match="depth"):
        CoordinateMLP(depth=0, hidden=2, residual=True, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        CoordinateMLP(depth=2, hidden=2, residual=True, activation="swish")


# ---- what the compiler refuses ----------------------------------------------------------------

_HEAD = "optimizer Bad {\n  lr = 0.1\n  level s : steps every 1\n  level slow : steps every 4\n"


@pytest.mark.parametrize("body,match", [
    ("memory m in s : mlp(depth=2, expansion=2.5) { key grad; input 1 }\n  update = lr * m(grad)",
     "whole number"),
    ("memory m in s : mlp(depth=2) { key grad; input 1; init constant(0.5) }\n  update = lr * m(grad)",
     "init zeros"),
    ("memory m in s : mlp(depth=2) { key grad; input 1; rule dgd }\n  update = lr * m(grad)", "rule `dgd`"),
    ("memory m in s : mlp(depth=2) { key grad; input 1; precondition newton_schulz }\n"
     "  update = lr * m(grad)", "precondition"),
    ("memory m in slow : elementwise { key grad; input 1 }\n  update = lr * m", "once per chunk"),
    ("memory m in s : elementwise { key grad; input 1; bias_correction true }\n  update = lr * m",
     "bias correction"),
    ("memory m in s : elementwise { key grad; input grad; init first }\n  update = lr * m", "init first"),
    ("memory m in s : linear { key grad; input grad; objective l2 }\n  update = lr * m", "must be a number"),
    ("memory m in s : linear { key 2; input 1; objective l2 }\n  update = lr * m", "not a number"),
    ("memory m in s : mlp(depth=2) { key grad + m(grad); input 1 }\n  update = lr * m(grad)", "cycle"),
])
def test_unsupported_keyed_memories_are_compile_errors(tmp_path, body, match):
    path = tmp_path / "bad.nl"
    path.write_text(_HEAD + "  " + body + "\n}\n")
    assert not [d for d in nldsl.check(path) if d.is_error]
    with pytest.raises(CodegenError, match=match) as e:
        compile_spec(path)
    assert e.value.diagnostics[0].code == "NL401" and e.value.diagnostics[0].line > 4


@pytest.mark.parametrize("body,code", [
    ("memory m in s : mlp(depth=2) { input 1 }\n  update = lr * m(grad)", "NL205"),
    ("memory m in s : linear { input grad; rule dgd }\n  update = lr * m", "NL205"),
    ("memory m in s : mlp(depth=2) { key grad }\n  update = lr * m", "NL308"),
    ("memory m in s : mlp(depth=2) { key grad; input 1 }\n  update = lr * m(grad, 2)", "NL308"),
    ("memory m in s : linear { key grad; input 1 }\n  update = lr * m(grad)", "NL308"),
    ("memory m in s : elementwise { key gard }\n  update = lr * m", "NL307"),
    ("memory m in s : elementwise { key grad }\n  update = lr * mm(grad)", "NL307"),
])
def test_key_and_read_mistakes_are_checker_diagnostics(tmp_path, body, code):
    path = tmp_path / "bad.nl"
    path.write_text(_HEAD + "  " + body + "\n}\n")
    assert code in {d.code for d in nldsl.check(path)}


def test_key_is_an_optimizer_property_only(tmp_path):
    path = tmp_path / "model.nl"
    path.write_text("model M {\n  vocab = 8; dim = 8; layers = 1; context = 16\n  level fast : tokens every 1\n"
                    "  memory mem in fast : linear { key grad }\n  block = residual(norm -> mem)\n}\n")
    assert "NL005" in {d.code for d in nldsl.check(path)}
