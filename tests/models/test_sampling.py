"""Sampling from compiled models: the state carried token by token equals re-reading the whole
sequence at every step (float64), and the sampling rules against hand-derived distributions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nldsl
from nldsl.nn.sampling import IGNORE, next_token
from tests.models.test_deep_models import _tensors

SPECS = Path(__file__).resolve().parents[2] / "specs"
SMALL = dict(dim=16, heads=2, layers=2, vocab=32)
# attention (a KV cache), a linear memory, a deep one, Hope (surprise-driven CMS with a carry level),
# Hope-Attention, AdaTransformer
MODELS = ["transformer", "gated_deltanet", "titans", "hope", "cms", "adatransformer"]


def build(spec: str):
    mod = nldsl.compile(SPECS / f"{spec}.nl")
    torch.manual_seed(0)
    return getattr(mod, mod.__all__[0])(**SMALL).double()


def refeed(model, prompt, n, learn=True, **sampling):
    """The continuation by re-reading prompt + tokens so far from no state at every step, with
    the prompt's next tokens as labels (IGNORE after them)."""
    seq, known = prompt, prompt[:, 1:]
    for _ in range(n):
        labels = None
        if learn:
            labels = torch.full(seq.shape, IGNORE)
            labels[:, :known.shape[1]] = known
        with torch.no_grad():
            logits = model(seq, labels=labels).logits[:, -1]
        seq = torch.cat([seq, next_token(logits, **sampling)[:, None]], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("spec", MODELS)
def test_greedy_stream_equals_rereading(spec):
    model = build(spec)
    prompt = torch.randint(0, 32, (2, 37), generator=torch.Generator().manual_seed(1))  # ends inside chunks
    out = model.generate(prompt, 30, temperature=0)
    assert out.tokens.shape == (2, 30) and out.tokens.dtype == torch.long
    assert torch.equal(out.tokens, refeed(model, prompt, 30, temperature=0))
    assert out.state.tokens == 37 + 30  # the state covers the prompt and every sampled token
    # no autograd graph grows with the tokens (a view of a shared weight is no graph)
    assert all(t.grad_fn is None for layer in out.state.layers for t in _tensors(layer))


@pytest.mark.parametrize("spec", ["hope", "gated_deltanet"])
def test_sampling_stream_equals_rereading(spec):
    model = build(spec)
    prompt = torch.randint(0, 32, (3, 21), generator=torch.Generator().manual_seed(2))
    settings = dict(temperature=1.5, top_k=12, top_p=0.9)
    out = model.generate(prompt, 25, generator=torch.Generator().manual_seed(3), **settings)
    again = refeed(model, prompt, 25, generator=torch.Generator().manual_seed(3), **settings)
    assert torch.equal(out.tokens, again)
    assert len(set(map(tuple, out.tokens.tolist()))) == 3  # the rows draw apart


def test_surprise_memories_learn_from_the_prompt_only_when_asked():
    model = build("hope")  # its CMS learns from the surprise of the prompt's next tokens
    prompt = torch.randint(0, 32, (2, 70), generator=torch.Generator().manual_seed(4))  # past a 32-token chunk
    learned = model.generate(prompt, 12, temperature=0)
    plain = model.generate(prompt, 12, temperature=0, learn=False)
    assert torch.equal(plain.tokens, refeed(model, prompt, 12, learn=False, temperature=0))
    cms = lambda out: torch.cat([t.flatten() for t in _tensors(out.state.layers[0]["chain"])])  # noqa: E731
    assert not torch.allclose(cms(learned), cms(plain))


def test_a_continued_state_equals_one_prompt():
    """generate(p1) then generate(p2, state=...) reads p1, its continuation and p2 as one stream."""
    model = build("gated_deltanet")
    g = torch.Generator().manual_seed(5)
    p1, p2 = torch.randint(0, 32, (2, 9), generator=g), torch.randint(0, 32, (2, 6), generator=g)
    first = model.generate(p1, 7, temperature=0)
    second = model.generate(p2, 8, temperature=0, state=first.state)
    whole = model.generate(torch.cat([p1, first.tokens, p2], dim=1), 8, temperature=0)
    assert torch.equal(second.tokens, whole.tokens)
    assert second.state.tokens == whole.state.tokens == 9 + 7 + 6 + 8


def test_training_mode_is_restored_and_zero_tokens_read_the_prompt():
    model = build("gated_deltanet").train()
    prompt = torch.randint(0, 32, (1, 5))
    out = model.generate(prompt, 0)
    assert model.training and out.tokens.shape == (1, 0) and out.state.tokens == 5
    seen = []
    model.eval().generate(prompt, 3, on_token=seen.append)
    assert not model.training and len(seen) == 3 and all(t.shape == (1,) for t in seen)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an int from 1 to the vocabulary's 32"),
    (dict(top_k=33), "top_k must be an int from 1 to the vocabulary's 32"),
    (dict(top_p=0.0), "top_p must be a number in (0, 1]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(input_ids=torch.tensor([[3, 32]])), "token id 32 is outside the model's vocabulary of 32"),
    (dict(input_ids=torch.tensor([[-1]])), "token id -1 is outside the model's vocabulary of 32"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "at least one token"),
    (dict(input_ids=torch.tensor([1, 2])), "must be a [batch, time] tensor"),
])
def test_bad_arguments_are_clear_errors(kwargs, words):
    model = build("gated_deltanet")
    args = dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError) as err:
        model.generate(args.pop("input_ids"), args.pop("max_new_tokens"), **args)
    assert words in str(err.value)


def test_float_prompts_are_refused():
    with pytest.raises(TypeError, match="token ids"):
        build("gated_deltanet").generate(torch.tensor([[1.0]]), 2)


# -- the sampling rules -----------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]], dtype=torch.float64)


def frequencies(n=40000, **settings):
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([next_token(LOGITS.expand(n // 8, -1), generator=g, **settings) for _ in range(8)])
    return torch.bincount(draws, minlength=5).double() / draws.numel()


def expected(logits, keep):
    p = torch.zeros(5, dtype=torch.float64)
    p[keep] = logits[0, keep].softmax(-1)
    return p


def test_greedy_and_limits_that_keep_one_token_are_the_argmax():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    for settings in (dict(temperature=0), dict(top_k=1), dict(top_p=1e-6)):
        assert torch.equal(next_token(logits, **settings), logits.argmax(-1))


@pytest.mark.parametrize("settings, keep, scale", [
    (dict(), [0, 1, 2, 3, 4], 1.0),
    (dict(temperature=0.5), [0, 1, 2, 3, 4], 2.0),
    (dict(top_k=2), [0, 1], 1.0),
    # softmax(LOGITS) = .563 .207 .126 .028 .076 (sorted: 0 1 2 4 3): the likelier ones before 2
    # hold .770 < .85, before 4 .896: {0, 1, 2}
    (dict(top_p=0.85), [0, 1, 2], 1.0),
    (dict(top_k=4, top_p=0.95, temperature=2.0), [0, 1, 2, 4], 0.5),
])
def test_draws_follow_the_restricted_softmax(settings, keep, scale):
    freq = frequencies(**settings)
    want = expected(LOGITS * scale, keep)
    assert torch.all(freq[[i for i in range(5) if i not in keep]] == 0)
    assert torch.allclose(freq, want, atol=0.01)  # 40k draws: standard error below 0.0025
