"""The embedded tasks: layouts, determinism by (seed, step), errors."""
from __future__ import annotations

import pytest
import torch

from nldsl.train.tasks import IGNORE, LM, MQAR, NIAH, Continual, TaskError, make_task, stdlib_corpus


def _pairs_of(row, pairs):
    return {int(row[2 * i]): int(row[2 * i + 1]) for i in range(pairs)}


def test_mqar_layout_and_targets():
    t = MQAR(256, 64, seed=3, pairs=8)
    b = t.train_batch(0, 16)
    assert b.inputs.shape == b.targets.shape == (16, 64)
    for x, y in zip(b.inputs, b.targets):
        kv = _pairs_of(x, 8)
        assert len(kv) == 8  # distinct keys
        assert all(t.key_lo <= k < t.key_hi for k in kv) and all(t.value_lo <= v < t.value_hi for v in kv.values())
        pos = (y != IGNORE).nonzero().flatten().tolist()
        assert len(pos) == 8 and all(p >= 16 for p in pos)
        assert sorted(int(x[p]) for p in pos) == sorted(kv)  # every key queried once
        for p in pos:
            assert int(y[p]) == kv[int(x[p])]
        others = [i for i in range(16, 64) if i not in pos]
        assert all(int(x[i]) == MQAR.FILLER for i in others)
    assert b.scored == 16 * 8
    assert t.chance() == pytest.approx(1 / 128)


def test_batches_are_a_function_of_seed_and_step():
    a, b = MQAR(256, 64, seed=1), MQAR(256, 64, seed=1)
    assert torch.equal(a.train_batch(7, 4).inputs, b.train_batch(7, 4).inputs)
    assert not torch.equal(a.train_batch(7, 4).inputs, a.train_batch(8, 4).inputs)
    assert not torch.equal(a.train_batch(7, 4).inputs, MQAR(256, 64, seed=2).train_batch(7, 4).inputs)
    e1, e2 = a.eval_batches(8, 4), b.eval_batches(8, 4)
    assert len(e1) == 2 and all(torch.equal(x.inputs, y.inputs) for x, y in zip(e1, e2))
    assert not torch.equal(e1[0].inputs, a.train_batch(0, 4).inputs)


def test_mqar_key_sets_are_disjoint():
    a, b = MQAR(256, 64, 0, key_set="A"), MQAR(256, 64, 0, key_set="B")
    assert a.key_hi <= b.key_lo
    ka = set(a.train_batch(0, 32).inputs[:, 0:16:2].flatten().tolist())
    kb = set(b.train_batch(0, 32).inputs[:, 0:16:2].flatten().tolist())
    assert ka and kb and not (ka & kb)


@pytest.mark.parametrize("kw, words", [
    (dict(vocab=256, seq_len=20, seed=0, pairs=8), "at least 32 tokens"),
    (dict(vocab=16, seq_len=64, seed=0, pairs=12), "distinct keys"),
])
def test_mqar_sizes_that_do_not_fit(kw, words):
    with pytest.raises(TaskError, match=words):
        MQAR(**kw)


def test_mqar_stream_queries_every_segment():
    t = MQAR(256, 32, seed=0, pairs=4)
    b = t.stream_batch(3, segments=4, seg_len=32)
    assert b.inputs.shape == (3, 128)
    for s in range(4):
        seg = b.targets[:, s * 32:(s + 1) * 32]
        assert int((seg != IGNORE).sum()) == 3 * 4
    kv = _pairs_of(b.inputs[0], 4)
    for p in (b.targets[0] != IGNORE).nonzero().flatten().tolist():
        assert kv[int(b.inputs[0, p])] == int(b.targets[0, p])


def test_niah_needle_and_query():
    t = NIAH(256, 96, seed=0, needles=2)
    b = t.train_batch(0, 8)
    for x, y in zip(b.inputs, b.targets):
        starts = (x[:-4] == NIAH.NEEDLE).nonzero().flatten().tolist()
        needles = {int(x[p + 1]): int(x[p + 2]) for p in starts}
        assert len(needles) == 2
        pos = (y != IGNORE).nonzero().flatten().tolist()
        assert pos == [93, 95]
        assert all(int(x[p - 1]) == NIAH.QUERY and needles[int(x[p])] == int(y[p]) for p in pos)
        marks = (x == NIAH.NEEDLE) | (x == NIAH.QUERY)
        assert sorted(marks.nonzero().flatten().tolist()) == sorted(starts + [92, 94])  # markers only there


def test_lm_stdlib_corpus_is_deterministic_and_split_by_file():
    tr, he, info = stdlib_corpus()
    assert info["files"] > 50 and len(tr) > 1_000_000 and len(he) > 50_000
    assert 0.02 < len(he) / (len(tr) + len(he)) < 0.15
    t = LM(256, 64, seed=0)
    b = t.train_batch(0, 4)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert torch.equal(b.inputs, LM(256, 64, seed=0).train_batch(0, 4).inputs)
    text = bytes(b.inputs[0].tolist())
    assert text.decode("utf-8", errors="replace")  # bytes of Python source
    assert t.metric == "bpb"


def test_lm_user_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_bytes(b"hello world, " * 400)
    t = LM(256, 32, seed=0, data=str(f))
    assert t.train_batch(0, 2).inputs.shape == (2, 32)
    with pytest.raises(TaskError, match="no such file"):
        LM(256, 32, 0, data=str(tmp_path / "missing.txt"))
    small = tmp_path / "small.txt"
    small.write_bytes(b"abc")
    with pytest.raises(TaskError, match="too little text"):
        LM(256, 32, 0, data=str(small))
    with pytest.raises(TaskError, match="256 tokens"):
        LM(64, 32, 0, data=str(f))


def test_continual_phases():
    t = Continual(256, 32, 0, steps=9, phases="mqar:A,mqar:B", pairs=4)
    assert t.ends == [4, 9]
    assert [t.phase_of(s) for s in range(9)] == [0] * 4 + [1] * 5
    ka = set(t.train_batch(0, 8).inputs[:, 0:8:2].flatten().tolist())
    kb = set(t.train_batch(5, 8).inputs[:, 0:8:2].flatten().tolist())
    assert max(ka) < min(kb)
    with pytest.raises(TaskError, match="unknown continual phase"):
        Continual(256, 32, 0, steps=9, phases="mqar:A,qa")


def test_unknown_task_suggests():
    with pytest.raises(TaskError, match="did you mean `mqar`"):
        make_task("mqr", vocab=256, seq_len=32, seed=0, steps=1)


def test_which_targets_are_the_next_tokens(tmp_path):
    """lm's targets are its next inputs (the last one the next call's): surprise-driven memories
    learn from them; mqar's and niah's answers are never inputs, so nothing learns from them."""
    f = tmp_path / "text.txt"
    f.write_bytes(bytes(range(32, 127)) * 40)
    lm = LM(256, 16, seed=0, data=str(f))
    batches = (lm.train_batch(0, 4), lm.eval_batches(4, 2)[0], lm.stream_batch(2, 3, 8),
               lm.train_batch(1, 4).shard(1, 2))
    for b in batches:
        assert b.next_tokens
        assert torch.equal(b.targets[:, :-1], b.inputs[:, 1:])
    for task in (MQAR(64, 32, 0, pairs=4), NIAH(256, 32, 0)):
        assert not task.train_batch(0, 2).next_tokens and not task.stream_batch(2, 2, 32).next_tokens
    both = Continual(256, 32, 0, steps=8, phases="mqar:A,lm", pairs=4, data=str(f))
    assert [both.train_batch(s, 2).next_tokens for s in (0, 7)] == [False, True]
