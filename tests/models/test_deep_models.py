"""Deep memories, CMS, self-modifying Titans and Hope compiled from their specs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nldsl
from nldsl.nn.model import map_state
from tests.models.test_compile_models import copy_task_losses, falls, variant

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
SMALL = dict(dim=16, heads=2, layers=2, vocab=32)
DEEP = {"hope": "Hope", "cms": "HopeAttention", "titans": "Titans"}


def build(spec: str, path: Path | None = None, **overrides):
    mod = nldsl.compile(path or SPECS / f"{spec}.nl")
    return getattr(mod, DEEP[spec])(**{**SMALL, **overrides})


@pytest.mark.parametrize("spec", sorted(DEEP))
def test_forward_backward_with_surprise(spec):
    torch.manual_seed(0)
    model = build(spec)
    ids = torch.randint(0, 32, (2, 40))
    out = model(ids, labels=ids.roll(-1, 1))
    out.logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any("initial" in n or "weights" in n or "memories" in n or "blocks" in n for n in trained)


@pytest.mark.parametrize("spec", sorted(DEEP))
@pytest.mark.parametrize("split", [5, 16, 33])
def test_stream_split_equals_one_pass(spec, split):
    torch.manual_seed(0)
    model = build(spec).double()
    ids = torch.randint(0, 32, (2, 45))
    labels = ids.roll(-1, 1)
    full = model(ids, labels=labels).logits
    first = model(ids[:, :split], labels=labels[:, :split])
    second = model(ids[:, split:], state=first.state, labels=labels[:, split:])
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-9, atol=1e-9)



@pytest.mark.parametrize("spec", ["hope", "cms"])
def test_first_layer_prefix_runs_once_per_call(spec):
    """With labels the model goes through a call in surprise segments; the first layer's parts
    before its CMS (the block's ``prefix``: Titans, attention) run over the whole call at once.
    Outputs, state and gradients equal running the whole layer segment by segment."""
    torch.manual_seed(0)
    model = build(spec).double()
    ids = torch.randint(0, 32, (2, 45))
    labels = ids.roll(-1, 1)
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))  # forward, not prefix + rest

    def run():
        model.zero_grad()
        out = model(ids, labels=labels)
        out.logits.square().sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    hoisted, grads = run()
    assert calls == []
    block, cls = model.blocks[0], type(model.blocks[0])

    def whole_layer(x, state=None):
        h, made = cls.prefix(block, x, state)
        return cls.rest(block, h, state, made)

    block.forward, block.prefix = whole_layer, None  # the model sees no prefix: segment by segment
    plain, plain_grads = run()
    assert len(calls) > 1
    torch.testing.assert_close(hoisted.logits, plain.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(_tensors(hoisted.state), _tensors(plain.state)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert grads.keys() == plain_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-8, atol=1e-10, msg=n)


_FFN = """  memory ffn in fast : linear {
    objective dot
    rule gd
    lr constant(1.0)
    heads 1
  }
  transfer attn -> ffn : context
"""


@pytest.mark.parametrize("block, prefix", [
    ("residual(rmsnorm -> attn -> chain)", None),                      # the CMS in the first part
    ("residual(rmsnorm -> chain) -> residual(rmsnorm -> attn)", None),
    # the attention's keys and values serve a memory after the CMS: no split
    ("residual(rmsnorm -> attn) -> residual(rmsnorm -> chain) -> residual(rmsnorm -> ffn)", None),
    ("residual(rmsnorm -> attn) -> residual(rmsnorm -> ffn) -> residual(rmsnorm -> chain)", {"attn", "ffn"}),
])
def test_where_a_block_splits(tmp_path, block, prefix):
    """A block splits before the top-level part holding its first surprise-driven memory, only
    when everything the prefix hands on is its output and its state; split or not, a stream split
    anywhere equals one pass."""
    text = (SPECS / "cms.nl").read_text()
    text = text.replace("block = residual(rmsnorm -> attn) -> residual(rmsnorm -> chain)", f"block = {block}")
    text = text.replace("  memory attn in fast : attention\n", "  memory attn in fast : attention\n" + _FFN)
    (tmp_path / "adam.nl").write_text((SPECS / "adam.nl").read_text())
    (tmp_path / "cms.nl").write_text(text)
    torch.manual_seed(0)
    model = build("cms", path=tmp_path / "cms.nl").double()
    first = model.blocks[0]
    assert hasattr(first, "prefix") == (prefix is not None)
    if prefix is not None:
        assert set(first.prefix(torch.zeros(1, 3, 16, dtype=torch.float64))[1]) == prefix
    ids = torch.randint(0, 32, (2, 40))
    labels = ids.roll(-1, 1)
    full = model(ids, labels=labels).logits
    a = model(ids[:, :13], labels=labels[:, :13])
    b = model(ids[:, 13:], state=a.state, labels=labels[:, 13:])
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec", ["hope", "cms"])
def test_a_given_state_is_never_written(spec):
    """Learners accumulate in place only into states this call made: the state a call starts
    from (here with a CMS gradient sum pending) stays as it was, and serves again."""
    torch.manual_seed(0)
    model = build(spec).double()
    ids = torch.randint(0, 32, (2, 90))
    labels = ids.roll(-1, 1)
    state = model(ids[:, :37], labels=labels[:, :37]).state
    before = [t.clone() for t in _tensors(state)]
    again = [model(ids[:, 37:], state=state, labels=labels[:, 37:]).logits for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(_tensors(state), before))
    torch.testing.assert_close(again[0], again[1], rtol=0, atol=0)


def _tensors(state):
    out = []
    map_state(state, out.append)
    return out

@pytest.mark.parametrize("spec", sorted(DEEP))
def test_batch_invariance(spec):
    torch.manual_seed(0)
    model = build(spec).double()
    ids = torch.randint(0, 32, (3, 21))
    labels = ids.roll(-1, 1)
    together = model(ids, labels=labels).logits
    alone = torch.cat([model(ids[i:i + 1], labels=labels[i:i + 1]).logits for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-9)


def test_cms_levels_write_only_at_their_periods():
    """Probe the state: each CMS level's weights change exactly at its chunk boundaries."""
    torch.manual_seed(0)
    model = build("cms", layers=1).double()
    chain = model.blocks[0].chain
    ids = torch.randint(0, 32, (1, 80))
    labels = ids.roll(-1, 1)
    state, history = None, []
    for t in range(80):  # one token per call: the state after every token
        state = model(ids[:, t:t + 1], state=state, labels=labels[:, t:t + 1]).state
        history.append([w[0].clone() for w in state.layers[0]["chain"].weights])
    for level, period in enumerate(chain.periods):
        changed = [t + 1 for t in range(1, 80) if not torch.equal(history[t][level], history[t - 1][level])]
        assert all(n % period == 0 for n in changed), (period, changed)
        if period <= 80:
            assert changed == list(range(period, 81, period))[: len(changed)] and changed


def test_cms_blocks_with_momentum_and_weight_decay(tmp_path):
    """`momentum constant(B)` and `retention constant(A)` on Hope-Attention's chain: the blocks
    step with them (the recurrence is tested on the runtime), the momentum is carried in the
    state, a stream split with labels equals one pass, `new_sequence` keeps only the carry
    level's momentum, and the model learns."""
    text = (SPECS / "cms.nl").read_text().replace(
        "    lr constant(0.01)\n", "    lr constant(0.01)\n    momentum constant(0.9)\n    retention 0.99\n", 1)
    text = text.replace("level cms3 : tokens every 256", "level cms3 : tokens every 256 carry")
    (tmp_path / "adam.nl").write_text((SPECS / "adam.nl").read_text())
    (tmp_path / "cms.nl").write_text(text)
    torch.manual_seed(0)
    model = build("cms", path=tmp_path / "cms.nl").double()
    chain = model.blocks[0].chain
    assert (chain.momentum, chain.retention) == (0.9, 0.99)
    ids = torch.randint(0, 32, (2, 70))
    labels = ids.roll(-1, 1)
    full = model(ids, labels=labels)
    first = model(ids[:, :37], labels=labels[:, :37])
    second = model(ids[:, 37:], state=first.state, labels=labels[:, 37:])
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full.logits, rtol=1e-9, atol=1e-9)
    for a, b in zip(_tensors(second.state), _tensors(full.state)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    moms = full.state.layers[0]["chain"].momentum
    assert moms is not None and moms[0][0].abs().sum() > 0  # the fastest level (16 tokens) stepped
    kept = chain.new_sequence(full.state.layers[0]["chain"]).momentum
    scopes = chain.scopes
    assert scopes == ("sequence", "sequence", "carry")
    for level, scope in enumerate(scopes):
        assert (kept[level][0] is moms[level][0]) == (scope == "carry"), (level, scope)
        assert scope == "carry" or not kept[level][0].any()
    plain = build("cms").double()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(ids, labels=labels).logits, full.logits)
    torch.manual_seed(0)
    losses = copy_task_losses(build("cms", path=tmp_path / "cms.nl", vocab=16), with_labels=True)
    assert falls(losses), losses


def test_cms_with_zero_learning_rate_is_the_static_mlp(tmp_path):
    """A CMS with lr 0 never moves from its (pretrained) initial blocks: outputs do not depend on
    the surprise it sees."""
    path = variant(tmp_path, "cms", "frozen")
    torch.manual_seed(0)
    model = build("cms", path=path).double()
    ids = torch.randint(0, 32, (2, 40))
    with_surprise = model(ids, labels=ids.roll(-1, 1)).logits
    without = model(ids).logits
    torch.testing.assert_close(with_surprise, without, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ablation", ["no_dgd", "no_momentum", "no_weight_decay", "no_cms", "static_k",
                                      "static_v", "static_q"])
def test_table6_ablations_compile_and_run(tmp_path, ablation):
    torch.manual_seed(0)
    model = build("hope", path=variant(tmp_path, "hope", ablation))
    ids = torch.randint(0, 32, (2, 24))
    out = model(ids, labels=ids.roll(-1, 1))
    assert torch.isfinite(out.logits).all()


def hope_variant(tmp_path, *edits: tuple[str, str]) -> Path:
    """specs/hope.nl with each (old, new) text edit made (each old text must be there), beside a
    copy of adam.nl."""
    text = (SPECS / "hope.nl").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "adam.nl").write_text((SPECS / "adam.nl").read_text())
    (tmp_path / "hope.nl").write_text(text)
    return tmp_path / "hope.nl"


def runs_and_streams(model, ids):
    """Forward with labels and backward give finite gradients; two calls with the state carried
    equal one pass."""
    model(ids, labels=ids.roll(-1, 1)).logits.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    first = model(ids[:, :9])
    second = model(ids[:, 9:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), model(ids).logits,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("depth", [1, 3])
def test_self_modifying_memories_of_other_depths(tmp_path, depth):
    """`mlp(depth=N)` on Hope's self-modifying memory builds every memory (the main one and the
    five generating ones) with N layers; the model runs forward and backward and streams exactly
    (the runtime's chunked == reference at these depths is tested in runtime_deep)."""
    path = hope_variant(tmp_path, ("mlp(depth=2, expansion=1,", f"mlp(depth={depth}, expansion=1,"))
    torch.manual_seed(0)
    model = build("hope", path=path).double()
    assert {len(ws) for ws in model.blocks[0].titans.memories.values()} == {depth}
    runs_and_streams(model, torch.randint(0, 32, (2, 24)))


def test_self_modifying_linear_memories(tmp_path):
    """`titans.structure = linear` on Hope: self-modifying Titans over matrix memories, every one
    (the main memory and the five generating ones) a single matrix M(x) = W x; the model streams
    exactly and learns (its runtime equals the written-out matrix recurrence, tested in
    runtime_deep), and it has no Triton kernel, said so rather than run without one."""
    path = hope_variant(tmp_path, ("mlp(depth=2, expansion=1, residual=true, activation=gelu, norm=l2)", "linear"))
    torch.manual_seed(0)
    model = build("hope", path=path).double()
    titans = model.blocks[0].titans
    D = SMALL["dim"] // SMALL["heads"]
    assert {n: [tuple(w.shape) for w in ws] for n, ws in titans.memories.items()} == {
        "memory": [(SMALL["heads"], D, D)], **{n: [(SMALL["heads"], D if n in "kvq" else 1, D)]
                                                 for n in ("k", "v", "q", "eta", "alpha")}}
    runs_and_streams(model, torch.randint(0, 32, (2, 24)))
    torch.manual_seed(0)
    losses = copy_task_losses(build("hope", path=path, vocab=16), with_labels=True)
    assert falls(losses), losses
    from nldsl.codegen.kernels import generate_kernels
    from nldsl.spec import analyze_file

    missing = generate_kernels(analyze_file(path)).missing
    assert "self-modifying memory (generated inputs) has no Triton kernel for one-layer" in missing["Hope.titans"]


@pytest.mark.parametrize("signal", ["self", "values"])
def test_self_modifying_constant_rates(tmp_path, signal):
    """A static eta and alpha may be constants (`lr constant(...)`, `retention constant(...)`):
    the model has no gates of x for them and runs with those rates (the runtime's constant rates
    equal gates squashed to them, tested in runtime_deep); without M_eta and M_alpha the memories
    may also learn v itself (`signal values`). A constant with a generated eta, or `signal values`
    with one, is refused at the property, with the fix."""
    lr, signal_self = ("lr gate         # eta_t", "signal self  # v^ = M(v): values it generates itself")
    path = hope_variant(tmp_path, ("q=generated, eta=generated, alpha=generated", "q=generated"),
                        ("retention gate  # alpha_t: weight decay", "retention constant(0.99)"),
                        (lr, "lr constant(0.01)"), (signal_self, f"signal {signal}"))
    torch.manual_seed(0)
    model = build("hope", path=path).double()
    titans = model.blocks[0].titans
    assert (titans.lr_value, titans.retention_value, titans.signal) == (0.01, 0.99, signal)
    assert "lr=0.01, retention=0.99" in repr(titans) and ("signal=values" in repr(titans)) == (signal == "values")
    assert titans.eta_gate is None and titans.alpha_gate is None and set(titans.memories) == {"memory", "k", "v", "q"}
    runs_and_streams(model, torch.randint(0, 32, (2, 24)))
    (tmp_path / "bad").mkdir()
    for edit, error in (((lr, "lr constant(0.01)"), "a constant `lr` with `eta=generated`"),
                        ((signal_self, "signal values"), "not v itself, which M_eta")):
        with pytest.raises(nldsl.SpecError, match=error):
            nldsl.compile(hope_variant(tmp_path / "bad", edit))


@pytest.mark.parametrize("ablation", ["static_k", "static_v"])
def test_static_inputs_are_convolved_and_stream(tmp_path, ablation):
    """A static k (v) passes its own causal convolution: it sees the previous tokens (so it can
    bind a key to the next token's value), and its convolution state carries across calls."""
    torch.manual_seed(0)
    model = build("hope", path=variant(tmp_path, "hope", ablation)).double()
    titans = model.blocks[0].titans
    name = ablation[-1]
    assert set(titans.static_conv) == {name}
    ids = torch.randint(0, 32, (2, 24))
    full = model(ids).logits
    first = model(ids[:, :7])
    second = model(ids[:, 7:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        titans.static_conv[name].weight[:, :-1] = 0.0          # only the current token
    assert (model(ids).logits - full).abs().max() > 1e-6


def test_generated_rates_start_like_titans_gates():
    """At a zero input, Hope's generated retention starts where Titans' retention gate does
    (0.99 per token) and its step at half the bound 1 / chunk."""
    hope, titans = build("hope").blocks[0].titans, build("titans").blocks[0].mem
    zero = torch.zeros(1, 1, SMALL["dim"])
    alpha = torch.sigmoid(hope.alpha_gate(zero) + hope.alpha_bias)
    eta = hope.eta_max * torch.sigmoid(hope.eta_gate(zero) + hope.eta_bias)
    torch.testing.assert_close(alpha, torch.sigmoid(titans.retention_gate(zero)))
    torch.testing.assert_close(alpha, torch.full_like(alpha, 0.99))
    torch.testing.assert_close(eta, torch.full_like(eta, 0.5 / hope.chunk_size))


@pytest.mark.parametrize("spec", sorted(DEEP))
def test_loss_falls_on_copy_task(spec):
    torch.manual_seed(0)
    losses = copy_task_losses(build(spec, vocab=16), with_labels=True)
    assert falls(losses), losses


@pytest.mark.parametrize("spec", sorted(DEEP))
def test_mixed_precision_training_step(spec):
    """Under torch.autocast to bfloat16 (how `nldsl run --dtype bfloat16` trains) the memories
    compute in float32 (the runtime turns autocast off inside its ops; their float32 states met
    bfloat16 products in in-place sums before): forward with labels and backward run, finite,
    near the float32 logits."""
    torch.manual_seed(0)
    model = build(spec)
    ids = torch.randint(0, 32, (2, 40))
    labels = ids.roll(-1, 1)
    ref = model(ids, labels=labels).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
    out.logits.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.logits.float(), ref, atol=0.05, rtol=0.05)
