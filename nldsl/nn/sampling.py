"""Autoregressive sampling from a compiled model, its in-context state carried token by token.

The prompt runs as one call; every sampled token is then fed alone, continuing the state the
call before returned (the memories' states, attention's KV cache), so a token costs one step of
every memory instead of a pass over the whole context. Since a stream split anywhere gives the
result of one pass, the tokens equal those of re-reading the whole sequence at every step (the
tests hold the two equal).

Memories that learn from the outer objective's surprise (``signal surprise``) learn from the
prompt, as at deployment: its next tokens are known. A sampled token is the model's own guess,
not a label, so nothing learns from it (its label is ``-100``: zero surprise); such tokens still
advance the memories' chunk grids, so a chunk the prompt began is written when it ends, as in
one pass with the same labels.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

IGNORE = -100  # F.cross_entropy's ignore_index: a token whose next token is unknown


class GenerateOutput(NamedTuple):
    """``tokens [B, max_new_tokens]``: the continuation; ``state``: the state after the prompt
    and every sampled token (pass it back, with the next prompt, to continue the stream)."""

    tokens: Tensor
    state: object


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab: int,
                   label=lambda name: name) -> None:
    """Raises ValueError for settings :func:`next_token` cannot use (``label`` names a setting in
    the message: the command line says ``--top-k``)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{label('temperature')} must be a finite number >= 0 (0: always the likeliest token), "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"{label('top_k')} must be an int from 1 to the vocabulary's {vocab} (or unset), "
                         f"got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"{label('top_p')} must be a number in (0, 1] (or unset), got {top_p!r}")


def next_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``logits [B, V]``: the likeliest at temperature 0; else drawn from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` likeliest tokens and to the
    smallest set of likeliest tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the likelier ones before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, state=None, learn: bool = True, generator: torch.Generator | None = None,
             on_token: Callable[[Tensor], None] | None = None) -> GenerateOutput:
    """Continues ``input_ids [B, T]`` (the prompt) by ``max_new_tokens`` sampled tokens (see the
    module docstring; sampling as in :func:`next_token`).

    ``state``: continue a stream (a previous call's ``output.state``); ``learn=False`` keeps
    surprise-driven memories from learning from the prompt too; ``generator``: the random
    numbers to draw with (on the model's device), for reproducible samples; ``on_token``: called
    with each sampled token ``[B]`` as soon as it is drawn (to stream the text).
    """
    vocab = model.config.vocab
    check_sampling(temperature, top_k, top_p, vocab)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, time] tensor with at least one token, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold token ids (an integer tensor), got {input_ids.dtype}")
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
    if bad.numel():
        raise ValueError(f"token id {int(bad[0])} is outside the model's vocabulary of {vocab} (ids 0 to {vocab - 1})")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    B = ids.shape[0]

    def labels(next_ids: Tensor | None, n: int) -> Tensor | None:
        """The prompt's next tokens, IGNORE where unknown; None when nothing is to learn."""
        if not learn:
            return None
        out = torch.full((B, n), IGNORE, dtype=torch.long, device=device)
        if next_ids is not None:
            out[:, :next_ids.shape[1]] = next_ids
        return out

    was_training = model.training
    model.eval()
    try:
        out = model(ids, state=state, labels=labels(ids[:, 1:], ids.shape[1]))
        state, tokens = out.state, []
        for _ in range(max_new_tokens):
            token = next_token(out.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            out = model(token[:, None], state=state, labels=labels(None, 1))
            state = out.state
    finally:
        model.train(was_training)
    new = torch.stack(tokens, dim=1) if tokens else ids.new_zeros(B, 0)
    return GenerateOutput(new, state)
