"""The training loop: determinism, resume, checkpoints, and every bad-input path."""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

from nldsl.train import RunError, train
from nldsl.train import checkpoint as ckpt
from nldsl.train.report import format_table


def losses(res):
    return [r["loss"] for r in res.rows]


def test_same_seed_same_loss_curve(tiny_cfg, tmp_path):
    a = train(tiny_cfg(out=str(tmp_path / "a")), quiet=True)
    b = train(tiny_cfg(out=str(tmp_path / "b")), quiet=True)
    c = train(tiny_cfg(out=str(tmp_path / "c"), seed=1), quiet=True)
    assert a.exit_code == 0 and len(losses(a)) == 8
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0]) and "acc" in rows[3]


def test_resume_gives_the_uninterrupted_result(tiny_cfg, tmp_path):
    full = train(tiny_cfg(out=str(tmp_path / "full"), steps=10, eval_every=5), quiet=True)
    first = train(tiny_cfg(out=str(tmp_path / "split"), steps=10, eval_every=5), (_interrupt_at(5),), quiet=True)
    assert first.exit_code == 130 and first.step == 5
    rest = train(tiny_cfg(out=str(tmp_path / "split"), steps=10, eval_every=5, resume=True), quiet=True)
    assert rest.exit_code == 0 and rest.step == 10
    assert abs(losses(rest)[-1] - losses(full)[-1]) < 1e-6
    assert losses(rest) == pytest.approx(losses(full), abs=1e-6)  # the whole curve, from the jsonl
    assert rest.final["acc"] == pytest.approx(full.final["acc"])
    w_full = ckpt.load_checkpoint(Path(full.checkpoint))[0]
    w_rest = ckpt.load_checkpoint(Path(rest.checkpoint))[0]
    assert all(torch.equal(w_full[k], w_rest[k]) for k in w_full)


def _interrupt_at(k):
    def cb(step, ctx):
        if step == k:
            raise KeyboardInterrupt
    return cb


def test_ctrl_c_saves_and_exits_130(tiny_cfg):
    res = train(tiny_cfg(eval_every=100, steps=20), (_interrupt_at(3),), quiet=True)
    assert res.exit_code == 130 and res.status == "interrupted"
    assert "interrupted at step 3" in res.message and "--resume" in res.message
    folder, meta = ckpt.find_latest(Path(res.out) / "checkpoints")
    assert meta["step"] == 3 and folder.name == "step_0000003"
    assert (Path(res.out) / "results.json").exists()
    assert "interrupted" in json.loads((Path(res.out) / "results.json").read_text())["status"]


@pytest.mark.parametrize("memory, told", [
    ("linear { qk_norm none }", ["the keys of `mem` (`qk_norm l2`)"]),
    ("linear", []),  # keys are normalised by default
    ("mlp(depth=2, expansion=1, norm=none)", ["the hidden layers of `mem` (`mlp(..., norm=l2)`)"]),
    ("mlp(depth=2, expansion=1, norm=none) { qk_norm none }",
     ["the keys of `mem` (`qk_norm l2`) and the hidden layers of `mem`"]),
    ("mlp(depth=2, expansion=1)", []),
    ("mlp(depth=2, expansion=1, norm=none) { objective dot }", ["the hidden layers of `mem`"]),
    ("linear { objective dot }", []),  # Hebbian: nothing to normalise
    # self-modifying: generated values feed every memory's targets M(v)
    ("mlp(depth=2, expansion=1) { inputs k=generated, v=generated; signal self }",
     ["the generated values of `mem` (`v_norm l2`)", "self-generated targets M(v) grow"]),
    ("mlp(depth=2, expansion=1) { inputs k=generated, v=generated; signal self; v_norm l2 }", []),
    ("linear { inputs k=generated, v=generated; signal self; v_norm l2 }", []),  # one layer: no hidden ones
])
def test_a_diverged_memory_on_raw_keys_is_told_to_normalise_them(tiny_cfg, tmp_path, memory, told):
    """An in-context memory on the l2 objective told not to normalise its keys (or an MLP's
    hidden layers) diverges in training once eta ||k||^2 passes 2: the run stops, and its message
    names the memory and the fix; a model that normalises (the default) is not told so."""
    spec = tmp_path / "delta.nl"
    spec.write_text("model Delta {\n  vocab = 64\n  dim = 32\n  heads = 2\n  layers = 1\n  context = 64\n"
                    "  level outer : steps every 1\n  level fast : tokens every 1\n"
                    f"  memory mem in fast : {memory}\n"
                    "  block = residual(rmsnorm -> mem) -> residual(rmsnorm -> swiglu)\n}\n")

    def poison(step, ctx):  # the divergence itself, whatever this seed's keys do
        if step == 2:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.fill_(float("nan"))

    res = train(tiny_cfg(spec=str(spec), overrides={}, steps=4, out=str(tmp_path / "run")), (poison,), quiet=True)
    assert res.status == "diverged"
    assert ("or normalise" in res.message) == bool(told), res.message
    for phrase in told:
        assert phrase in res.message, res.message


@pytest.mark.parametrize("memory, diverges", [
    ("linear { qk_norm none }", True), ("linear", False),
    ("mlp(depth=2, norm=none) { qk_norm none }", True), ("mlp(depth=2)", False),
    ("mlp(depth=2, norm=none) { objective dot; qk_norm none }", True), ("mlp(depth=2) { objective dot }", False),
])
def test_the_default_memories_train_where_raw_keys_diverge(tiny_cfg, tmp_path, memory, diverges):
    """Why in-context l2 memories (and MLP memories on any objective) normalise by default:
    written without a normalisation, the plainest `linear` and `mlp` memories turn NaN within the
    first steps (cpu-demo sizes), an `mlp` on the dot objective too; as written by default they
    train."""
    spec = tmp_path / "plain.nl"
    spec.write_text("model Plain {\n  vocab = 64\n  dim = 64\n  heads = 2\n  layers = 2\n  context = 64\n"
                    "  level outer : steps every 1\n  level fast : tokens every 1\n"
                    f"  memory mem in fast : {memory}\n"
                    "  block = residual(rmsnorm -> mem) -> residual(rmsnorm -> swiglu)\n}\n")
    res = train(tiny_cfg(spec=str(spec), overrides={}, steps=6, seq_len=64, batch=16, eval_every=100), quiet=True)
    assert (res.status == "diverged") == diverges, res.message


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg):
    def poison(step, ctx):
        if step == 6:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.fill_(float("nan"))

    res = train(tiny_cfg(steps=10, eval_every=4), (poison,), quiet=True)
    assert res.exit_code == 1 and res.status == "diverged"
    assert "at step 7" in res.message and "last finite loss" in res.message and "at step 6" in res.message
    assert "step_0000004" in res.message
    folder, meta = ckpt.find_latest(Path(res.out) / "checkpoints")
    assert meta["step"] == 4
    weights = ckpt.load_checkpoint(folder)[0]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["step"] for r in res.rows][-1] == 6  # the metrics up to the last good step are kept


def test_disk_full_while_saving(tiny_cfg, monkeypatch):
    real = ckpt._write_bytes
    def full_after_first_checkpoint(path, data):
        if "step_0000008" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", full_after_first_checkpoint)
    res = train(tiny_cfg(steps=12, eval_every=4), quiet=True)
    assert res.exit_code == 2 and res.status == "io_error"
    assert "No space left on device" in res.message and "step_0000004" in res.message
    root = Path(res.out) / "checkpoints"
    assert not list(root.glob(".tmp-*"))  # no half-written checkpoint left behind
    folder, meta = ckpt.find_latest(root)
    assert meta["step"] == 4 and (root / "latest").read_text().strip() == "step_0000004"
    ckpt.load_checkpoint(folder)  # loads and verifies


def test_crash_mid_write_never_leaves_a_broken_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    sd = {"w": torch.ones(3)}
    ckpt.save_checkpoint(root, 1, sd, {}, {"config": {}})

    def dies(path, data):
        if path.name == ckpt.STATE_FILE:
            raise RuntimeError("power cut")  # not an OSError: a crash in the middle of the write
        path.write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(ckpt, "_write_bytes", dies)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(root, 2, {"w": torch.zeros(3)}, {}, {"config": {}})
    monkeypatch.undo()
    folder, meta = ckpt.find_latest(root)
    assert meta["step"] == 1 and torch.equal(ckpt.load_checkpoint(folder)[0]["w"], sd["w"])
    # a damaged newest folder and a broken pointer are skipped
    ckpt.save_checkpoint(root, 3, {"w": torch.full((3,), 3.0)}, {}, {"config": {}})
    (root / "step_0000003" / ckpt.MODEL_FILE).write_bytes(b"garbage")
    assert ckpt.find_latest(root)[1]["step"] == 1
    (root / "latest").write_text("step_9999999\n")
    assert ckpt.find_latest(root)[1]["step"] == 1


def test_checkpoints_keep_the_last_two(tiny_cfg):
    res = train(tiny_cfg(steps=8, eval_every=2), quiet=True)
    names = sorted(p.name for p in (Path(res.out) / "checkpoints").glob("step_*"))
    assert names == ["step_0000006", "step_0000008"]


def test_unwritable_output_folder(tiny_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError) as e:
        train(tiny_cfg(out=str(blocker / "run")), quiet=True)
    assert e.value.code == 2 and "cannot write to the output folder" in str(e.value)
    assert blocker.read_text() == "not a folder"


def test_resume_notices_a_spec_that_now_resolves_differently(tiny_cfg, tmp_path):
    """The same spec text compiled by an nldsl whose defaults differ (its resolved form's hash
    changed) is not resumed silently; a checkpoint written before the hash existed is."""
    spec = tmp_path / "plain.nl"
    spec.write_text("model Plain {\n  vocab = 64\n  dim = 32\n  heads = 2\n  layers = 1\n  context = 64\n"
                    "  level outer : steps every 1\n  level fast : tokens every 1\n"
                    "  memory mem in fast : linear\n  block = residual(rmsnorm -> mem)\n}\n")
    cfg = dict(spec=str(spec), overrides={})
    res = train(tiny_cfg(steps=4, **cfg), quiet=True)
    state_file = next(Path(res.out).glob("checkpoints/step_*/state.json"))
    meta = json.loads(state_file.read_text())
    assert len(meta["resolved_hash"]) == 64
    state_file.write_text(json.dumps({**meta, "resolved_hash": "0" * 64}))
    with pytest.raises(RunError, match=r"different settings \(the compiled model \(the same spec resolves "
                                       r"differently"):
        train(tiny_cfg(steps=8, resume=True, **cfg), quiet=True)
    del meta["resolved_hash"]
    state_file.write_text(json.dumps(meta))
    assert train(tiny_cfg(steps=8, resume=True, **cfg), quiet=True).status == "ok"


def test_model_that_cannot_be_built_at_this_size(tiny_cfg):
    with pytest.raises(RunError, match=r"cannot build TinyAttention with dim=30 .*heads=4.*not divisible"):
        train(tiny_cfg(overrides={"dim": 30, "heads": 4}), quiet=True)
    with pytest.raises(RunError, match="has no setting 'dimm'; did you mean `dim`"):
        train(tiny_cfg(overrides={"dimm": 32}), quiet=True)


def test_resume_with_other_settings_is_refused(tiny_cfg):
    train(tiny_cfg(steps=4), quiet=True)
    with pytest.raises(RunError, match="different settings.*lr"):
        train(tiny_cfg(steps=8, lr=1e-2, resume=True), quiet=True)
    with pytest.raises(RunError, match="no complete checkpoint"):
        train(tiny_cfg(out=tiny_cfg().out + "-empty", resume=True), quiet=True)


def test_streaming_evaluation_carries_state(tiny_cfg):
    res = train(tiny_cfg(steps=2, carry_state=True, segments=3), quiet=True)
    s = res.stream
    assert s["segments"] == 3 and set(s["modes"]) == {"carry", "reset"}
    carry, reset = s["modes"]["carry"], s["modes"]["reset"]
    # the first call starts from no state either way; later calls differ only through the state
    assert carry[0]["loss"] == pytest.approx(reset[0]["loss"], rel=1e-6)
    assert carry[1]["loss"] != pytest.approx(reset[1]["loss"], rel=1e-6)
    assert "streaming evaluation" in format_table(res)


def test_streaming_with_a_carry_level(tmp_path):
    from train_support import TINY_REC, small

    res = train(small(tmp_path / "r", spec=TINY_REC, overrides={}, steps=2, carry_state=True, segments=2,
                      seq_len=16, pairs=2), quiet=True)
    assert set(res.stream["modes"]) == {"carry", "reset", "new_sequence"}


def test_streaming_matches_one_pass():
    """Feeding a stream in segments with the state passed back equals one call (the model)."""
    from nldsl.train.build import build_model
    from train_support import TINY

    torch.manual_seed(0)
    model, _ = build_model(TINY, {"dim": 32, "layers": 2, "heads": 2})
    model.double()
    ids = torch.randint(0, 256, (2, 48))
    whole = model(ids).logits
    state, parts = None, []
    for s in range(3):
        out = model(ids[:, 16 * s:16 * (s + 1)], state=state)
        parts.append(out.logits)
        state = out.state
    assert torch.allclose(torch.cat(parts, 1), whole, atol=1e-10)


def test_continual_reports_forgetting(tiny_cfg):
    res = train(tiny_cfg(task="continual", phases="mqar:A,mqar:B", steps=8, eval_every=100), quiet=True)
    c = res.continual
    assert c["phases"] == ["mqar:A", "mqar:B"] and len(c["after"]) == 2
    assert len(c["after"][0]) == 1 and len(c["after"][1]) == 2
    table = format_table(res)
    assert "continual learning" in table and "forgetting" in table


def test_lm_task_reports_bits_per_byte(tiny_cfg):
    res = train(tiny_cfg(task="lm", steps=3, eval_every=3, eval_seqs=8), quiet=True)
    assert res.metric == "bpb" and 4 < res.final["bpb"] < 9


def test_bfloat16_and_float64(tiny_cfg, tmp_path):
    a = train(tiny_cfg(out=str(tmp_path / "bf"), dtype="bfloat16", steps=3, eval_every=3), quiet=True)
    b = train(tiny_cfg(out=str(tmp_path / "f64"), dtype="float64", steps=3, eval_every=3), quiet=True)
    assert a.exit_code == b.exit_code == 0
    assert all(math.isfinite(x) for x in losses(a) + losses(b))


def test_outputs_table_and_plot(tiny_cfg):
    res = train(tiny_cfg(plot=True, carry_state=True, segments=2), quiet=True)
    out = Path(res.out)
    for name in ("metrics.jsonl", "results.json", "curves.png", "run.json"):
        assert (out / name).exists(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(res)
    assert "TinyAttention on mqar (4 pairs)" in table and "final accuracy" in table and "chance" in table


def test_a_small_model_learns_mqar(tiny_cfg):
    """The loop trains: a 2-layer attention model (short conv before attention, as Hope has)
    gets well above chance on 4-pair MQAR in 150 steps."""
    res = train(tiny_cfg(overrides={"dim": 64, "layers": 2, "heads": 4, "conv": 4}, pairs=4, batch=32,
                         steps=150, lr=3e-3, warmup=10, eval_every=50, eval_seqs=64, log_every=10), quiet=True)
    evals = [r for r in res.rows if "acc" in r]
    assert res.final["acc"] > 10 * res.chance
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5


def test_progress_bar_shows_loss_and_throughput(tiny_cfg, capsys):
    train(tiny_cfg(progress=True, steps=4), quiet=False)
    err = capsys.readouterr().err
    assert "TinyAttention mqar" in err and "4/4" in err and "tok/s=" in err and "loss=" in err


def test_surprise_driven_memories_learn_from_next_tokens_only():
    """Training and evaluation pass a batch's targets as labels where they are the stream's next
    tokens (lm): Hope-Attention's CMS then writes in context; on mqar, whose answers are never
    inputs, it does not."""
    import nldsl
    from nldsl.train.loop import D, _scored_logits, evaluate
    from nldsl.train.tasks import IGNORE, Batch

    spec = Path(__file__).resolve().parents[2] / "specs" / "cms.nl"
    torch.manual_seed(0)
    model = nldsl.compile(spec).HopeAttention(dim=16, heads=2, layers=1, vocab=32).double()
    ids = torch.randint(0, 32, (2, 40))
    text = Batch(ids[:, :-1], ids[:, 1:], next_tokens=True)
    answers = Batch(ids[:, :-1], torch.where(ids[:, 1:] % 4 == 0, ids[:, 1:], IGNORE))
    with torch.no_grad():
        learned = model(text.inputs, labels=text.targets).logits
        plain = model(text.inputs).logits
        assert not torch.allclose(learned, plain)  # the CMS (16-token chunks) wrote from the surprise
        torch.testing.assert_close(_scored_logits(model, text, "cpu", None)[2].logits, learned)
        torch.testing.assert_close(_scored_logits(model, answers, "cpu", None)[2].logits, plain)
    mask = text.targets != IGNORE
    want = torch.nn.functional.cross_entropy(learned[mask], text.targets[mask])
    assert evaluate(model, [text], D.Dist(), "cpu", None)["loss"] == pytest.approx(float(want), rel=1e-9)


def test_labels_reach_only_models_with_surprise_driven_memories():
    from nldsl.train.loop import _call

    class Plain(torch.nn.Module):  # a hand-written forward that takes no labels
        def forward(self, inputs):
            return inputs * 2

    x = torch.ones(1, 3)
    assert torch.equal(_call(Plain(), x, torch.zeros(1, 3, dtype=torch.long), None), x * 2)


SPECS = Path(__file__).resolve().parents[2] / "specs"


def spec_with_optimizer(tmp_path, include: str, name: str) -> str:
    """specs/gated_deltanet.nl trained by the optimizer ``name`` of specs/``include``."""
    import shutil

    shutil.copy(SPECS / include, tmp_path / include)
    text = (SPECS / "gated_deltanet.nl").read_text()
    text = text.replace('include "adam.nl"', f'include "{include}"').replace("optimizer = AdamW", f"optimizer = {name}")
    (tmp_path / "gdn.nl").write_text(text)
    return str(tmp_path / "gdn.nl")


def test_the_specs_compiled_optimizer_trains(tiny_cfg, tmp_path, monkeypatch):
    """`optimizer = AdamW` (from adam.nl) trains with the compiled AdamW: the loss curve of
    torch.optim.AdamW (the compiled one equals it, tests/optim)."""
    from nldsl.train import build

    cfg = dict(spec=str(SPECS / "gated_deltanet.nl"), overrides={"dim": 32, "layers": 1, "heads": 2, "vocab": 64})
    compiled = train(tiny_cfg(out=str(tmp_path / "compiled"), **cfg), quiet=True)
    assert json.loads((tmp_path / "compiled" / "run.json").read_text())["optimizer"] == "AdamW (compiled from adam.nl)"
    monkeypatch.setattr(build, "spec_optimizer", lambda spec, name: None)
    plain = train(tiny_cfg(out=str(tmp_path / "torch"), **cfg), quiet=True)
    assert json.loads((tmp_path / "torch" / "run.json").read_text())["optimizer"] == "AdamW"
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-5)


def test_a_matrix_only_optimizer_trains_the_matrices_and_resumes(tiny_cfg, tmp_path):
    """`optimizer = Muon`: the compiled Muon takes the hidden matrices, torch.optim.AdamW the
    embedding, the head and the vectors (said in a note); a resumed run gives the uninterrupted
    result (both optimizers' states in the checkpoint)."""
    from nldsl.train.build import WithAux, make_optimizer

    spec = spec_with_optimizer(tmp_path, "muon.nl", "Muon")
    cfg = dict(spec=spec, overrides={"dim": 32, "layers": 1, "heads": 2, "vocab": 64}, steps=10, eval_every=5)
    full = train(tiny_cfg(out=str(tmp_path / "full"), **cfg), quiet=True)
    assert full.exit_code == 0 and any("Muon takes matrices only" in n for n in full.notes)
    first = train(tiny_cfg(out=str(tmp_path / "split"), **cfg), (_interrupt_at(5),), quiet=True)
    rest = train(tiny_cfg(out=str(tmp_path / "split"), resume=True, **cfg), quiet=True)
    assert first.exit_code == 130 and rest.exit_code == 0
    assert losses(rest) == pytest.approx(losses(full), abs=1e-6)

    import nldsl

    model = nldsl.compile(spec).GatedDeltaNet(dim=32, layers=1, heads=2, vocab=64)
    opt, used, note = make_optimizer(model, "Muon", 1e-3, 0.01, spec=spec)
    assert isinstance(opt, WithAux) and used == "Muon (compiled from muon.nl)"
    main, aux = ({id(p) for g in part.param_groups for p in g["params"]} for part in opt.parts)
    outer = {id(p) for p in (model.embed.weight, model.head.weight)}
    assert outer <= aux and not outer & main and all(p.dim() >= 2 for p in model.parameters() if id(p) in main)
    assert main | aux == {id(p) for p in model.parameters()}
    m3 = spec_with_optimizer(tmp_path, "m3.nl", "M3")
    _, _, note = make_optimizer(model, "M3", 1e-3, 0.1, spec=m3)
    assert "--weight-decay does not apply to M3, which has no weight_decay (only to the AdamW beside it)" in note
    assert "weight" not in make_optimizer(model, "M3", 1e-3, None, spec=m3)[2]


def test_an_optimizer_without_weight_decay_says_so(tmp_path):
    import nldsl
    from nldsl.train.build import make_optimizer

    spec = spec_with_optimizer(tmp_path, "deep_momentum.nl", "DeepMomentum")
    model = nldsl.compile(spec).GatedDeltaNet(dim=32, layers=1, heads=2, vocab=64)
    opt, used, note = make_optimizer(model, "DeepMomentum", 1e-3, 0.01, spec=spec)
    assert "--weight-decay does not apply to DeepMomentum" in note
    assert all("weight_decay" not in g for g in opt.param_groups)
    assert make_optimizer(model, "DeepMomentum", 1e-3, 0.0, spec=spec)[2] is None
    assert make_optimizer(model, "DeepMomentum", 1e-3, None, spec=spec)[2] is None  # none given: nothing to say


def test_the_default_weight_decay_is_on_the_matrices_and_resumes_as_given(tiny_cfg):
    """--weight-decay left out: 0.01 on the matrices (AdamW), and a run that gave 0.01 is the same
    run for --resume (checkpoints from before the option's default became None hold 0.01)."""
    from nldsl.train.build import make_optimizer
    from nldsl.train.config import RunConfig

    first = train(tiny_cfg(weight_decay=0.01, eval_every=2), (_interrupt_at(3),), quiet=True)
    rest = train(tiny_cfg(resume=True, eval_every=2), quiet=True)
    assert first.exit_code == 130 and rest.exit_code == 0, rest.message
    with pytest.raises(RunError, match=r"different settings \(weight_decay\)"):
        train(tiny_cfg(resume=True, weight_decay=0.1, eval_every=2), quiet=True)

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt, used, note = make_optimizer(m, None, 1e-3, None)
    assert used == "AdamW" and note is None
    assert sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups) == [(0.0, 3), (0.01, 1)]
    assert RunConfig("m.nl", weight_decay=None).identity() == RunConfig("m.nl", weight_decay=0.01).identity()
    assert RunConfig("m.nl", weight_decay=None).identity() != RunConfig("m.nl", weight_decay=0.1).identity()


def test_a_hand_written_models_optimizer_name_is_torchs():
    from nldsl.train.build import make_optimizer

    m = torch.nn.Linear(3, 3)
    opt, used, note = make_optimizer(m, "SGD", 1e-3, 0.01, spec="model.py:Model")
    assert isinstance(opt, torch.optim.SGD) and used == "SGD" and note is None
    opt, used, note = make_optimizer(m, "Lion", 1e-3, 0.01, spec="model.py:Model")
    assert isinstance(opt, torch.optim.AdamW) and "neither defined by the model's spec nor a torch.optim" in note


def test_resume_refuses_a_checkpoint_of_another_optimizer(tiny_cfg, tmp_path):
    """A checkpoint written before the spec's compiled optimizer trained it (torch.optim's state,
    no optimizer recorded) is refused with a message, not loaded into the other's state."""
    cfg = dict(spec=str(SPECS / "gated_deltanet.nl"), overrides={"dim": 32, "layers": 1, "heads": 2, "vocab": 64},
               steps=4, eval_every=2)
    first = train(tiny_cfg(out=str(tmp_path / "r"), **cfg), (_interrupt_at(2),), quiet=True)
    assert first.exit_code == 130
    folder, meta = ckpt.find_latest(tmp_path / "r" / "checkpoints")
    assert meta["optimizer"] == "AdamW (compiled from adam.nl)"
    del meta["optimizer"]  # as an older nldsl wrote it
    (folder / "state.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match=r"trained by AdamW, and this run trains with AdamW \(compiled from adam.nl\)"):
        train(tiny_cfg(out=str(tmp_path / "r"), resume=True, **cfg), quiet=True)
