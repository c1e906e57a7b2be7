"""The skeleton every compiled model shares: embedding, a stack of blocks, norm, head, and
the state that carries in-context memories across calls.

A generated model subclasses :class:`NSAMModel` and supplies its block class; the block's
``forward(x, state) -> (x, state)`` applies the spec's composition of memories.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LevelInfo:
    name: str
    clock: str
    period: int
    scope: str
    read: str

    def __str__(self) -> str:
        extra = " carry" if self.scope == "carry" else ""
        return f"{self.name}: {self.clock} every {self.period}, read {self.read}{extra}"


class ModelState(NamedTuple):
    """In-context state of every memory, per layer; ``tokens`` counts the stream so far.

    Tensors only (never Parameters). Pass it back to ``model(ids, state=...)`` to continue
    the stream exactly; use :meth:`NSAMModel.new_sequence` at a sequence boundary to reset
    the sequence-scoped levels while ``carry`` levels keep learning.
    """

    layers: tuple[dict[str, Any], ...]
    tokens: int


class ModelOutput(NamedTuple):
    logits: Tensor
    state: ModelState


#: what a model's ``impl=`` keyword accepts: the runtime's chunked PyTorch ops, or the spec's
#: generated Triton kernels (attention always runs through torch's SDPA)
MODEL_IMPLS = ("chunked", "triton")


@dataclass
class Config:
    """The model's hyperparameters after keyword overrides (what the blocks are built from).

    ``impl`` is how the in-context memories run (:data:`MODEL_IMPLS`); with ``"triton"``,
    ``kernels`` says where the spec's generated kernels are: ``(module name, module file, spec
    sha256)`` of the generated module (see :func:`nldsl.runtime._triton.spec_kernels`).
    """

    vocab: int
    dim: int
    heads: int
    layers: int
    context: int
    extra: dict = field(default_factory=dict)
    impl: str = "chunked"
    kernels: tuple | None = None
    spec_dir: str | None = None  # where relative paths of the spec (pretrained weights) resolve

    def __post_init__(self):
        for name in ("vocab", "dim", "heads", "layers", "context"):  # as a spec must write them
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.impl not in MODEL_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, MODEL_IMPLS))}, got {self.impl!r}")

    def __getattr__(self, name):
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def kernel(self, name: str):
        """The generated Triton kernels of the memory ``name`` (``Model.memory``) when ``impl`` is
        ``"triton"``, else None. Raises (never falls back) when the memory has none."""
        if self.impl != "triton":
            return None
        from nldsl.runtime._triton import spec_kernels

        if self.kernels is None:
            raise ValueError("impl='triton': this model was built without a generated module's kernels")
        module = spec_kernels(*self.kernels)
        if name in module.KERNELS:
            return module.KERNELS[name]
        reason = module.MISSING.get(name, "no kernel was generated for it")
        raise ValueError(f"impl='triton': `{name}` has no Triton kernel: {reason}; build the model with "
                         "impl='chunked'")


def surprise_learners(module: nn.Module) -> list[nn.Module]:
    """The memories in ``module`` that learn from the outer objective's local surprise (``signal
    surprise``): what a model's ``labels`` are for."""
    return [m for m in module.modules() if getattr(m, "surprise", False) is True]


def map_state(state, fn):
    """Applies ``fn`` to every tensor in a nested state (dicts, tuples, lists, NamedTuples)."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(map_state(v, fn) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(v, fn) for v in state)
    return state


class NSAMModel(nn.Module):
    """embedding -> ``layers`` x block -> RMSNorm -> head. Subclasses set ``levels``."""

    levels: tuple[LevelInfo, ...] = ()
    spec_file: str = ""
    spec_hash: str = ""
    #: the spec's directory, which relative paths in it (``init pretrained("...")``) are relative
    #: to; ``nldsl.compile`` sets it, a package written by ``nldsl compile -o`` leaves it None
    #: (the current directory) unless the user sets it
    spec_dir: str | None = None

    def __init__(self, config: Config, block_cls: type[nn.Module]):
        super().__init__()
        if config.spec_dir is None:
            config.spec_dir = type(self).spec_dir
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.blocks = nn.ModuleList([block_cls(config, i) for i in range(config.layers)])
        if config.impl != "chunked":
            self._check_impl(config.impl)
        self.norm = nn.RMSNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, input_ids: Tensor, state: ModelState | None = None,
                labels: Tensor | None = None) -> ModelOutput:
        """``labels`` (the next tokens, ``-100`` to ignore) let memories that learn from the
        outer objective's local surprise (``signal surprise``, paper Eq. 8) write in context.

        The surprise is ``delta_t = dl_t / dh_t``: the derivative of token t's loss at the top of
        the residual stream (before the final norm and the head, which act per token), the
        signal every such memory adds its output to (a first-order local surprise, computed
        exactly and per token, so it does not depend on how a stream is split into calls). The
        stream is processed in segments on the chunk grid of the fastest such memory; after
        each segment the memories write with its surprise before the next one reads. The first
        layer's parts before its first such memory (a block's ``prefix``, when the compiler split
        it) see only the embedding: they run over the whole call at once.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, time] with at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold token ids (an integer tensor), got {input_ids.dtype}")
        if state is not None and not isinstance(state, ModelState):
            raise TypeError(f"state must be the ModelState a previous call returned (output.state), "
                            f"got {type(state).__name__}")
        if state is not None and len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layers, the model has {len(self.blocks)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        learners = surprise_learners(self)
        if labels is None or not learners:
            logits, _, state = self._forward(input_ids, state)
            return ModelOutput(logits, state)
        period = min(min(m.periods) for m in learners)
        pos = 0 if state is None else state.tokens
        T = input_ids.shape[1]
        cuts = [0]
        while cuts[-1] < T:  # segments end on the fastest surprise level's chunk grid
            cuts.append(min(T, cuts[-1] + period - (pos + cuts[-1]) % period))
        parts = None
        prefix = getattr(self.blocks[0], "prefix", None) if len(self.blocks) else None
        if prefix is not None:  # it reads only the embedding: one pass over the whole call
            h, made = prefix(self.embed(input_ids), None if state is None else state.layers[0])
            parts = h.split([b - a for a, b in zip(cuts, cuts[1:])], dim=1)
        logits = []
        for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
            tape: list = []
            for m in learners:
                m.tape = tape
            try:
                seg_logits, hidden, state = self._forward(input_ids[:, a:b], state,
                                                          None if parts is None else (parts[j], made))
            finally:
                for m in learners:
                    m.tape = None
            delta = self.surprise(hidden, labels[:, a:b])
            # after the first segment every learner's state is one its learn made in this call
            written = {id(module): module.learn(x, before, delta, donate=a > 0) for module, x, _, before in tape}
            layers = []
            for block, layer_state in zip(self.blocks, state.layers):
                layer_state = dict(layer_state)
                for name, module in block.named_children():
                    if id(module) in written:
                        layer_state[name] = written[id(module)]
                layers.append(layer_state)
            state = ModelState(tuple(layers), state.tokens)
            logits.append(seg_logits)
        return ModelOutput(torch.cat(logits, dim=1), state)

    def generate(self, input_ids: Tensor, max_new_tokens: int, **sampling):
        """``GenerateOutput(tokens [B, max_new_tokens], state)``: the prompt ``input_ids``
        continued token by token, the state carried (keywords ``temperature``, ``top_k``,
        ``top_p``, ``state``, ``learn``, ``generator``, ``on_token``: see
        :func:`nldsl.nn.sampling.generate`)."""
        from nldsl.nn.sampling import generate

        return generate(self, input_ids, max_new_tokens, **sampling)

    def in_context_memories(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of each memory of a block that has an ``impl`` to choose (attention,
        which runs through torch's SDPA, has none)."""
        from nldsl.nn.memories import AttentionMemory

        if not len(self.blocks):
            return []
        return [(name, m) for name, m in self.blocks[0].named_children()
                if hasattr(m, "impl") and not isinstance(m, AttentionMemory)]

    def _check_impl(self, impl: str) -> None:
        """Every in-context memory runs with ``impl`` (no memory silently keeps another one)."""
        memories = self.in_context_memories()
        others = [name for name, m in memories if m.impl != impl]
        if others:
            raise ValueError(f"impl={impl!r}: {', '.join(f'`{n}`' for n in others)} of {type(self).__name__} "
                             f"cannot run with it (no {impl} implementation is compiled for "
                             f"{'it' if len(others) == 1 else 'them'}); build the model with impl='chunked'")
        if not memories:
            raise ValueError(f"impl={impl!r}: {type(self).__name__} has no in-context memory to run with it "
                             "(attention runs through torch's SDPA)")

    def surprise(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """``dl_t/dh_t`` for each token's next-token loss, at the top of the residual stream."""
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            logits = self.head(self.norm(h))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
            (delta,) = torch.autograd.grad(loss, h)
        return delta.detach()

    def _forward(self, input_ids: Tensor, state: ModelState | None, prefix: tuple | None = None):
        """``(logits, hidden before the final norm, new state)``. ``prefix``: the first layer's
        ``prefix`` output for these tokens and the state it made (then only its ``rest`` runs)."""
        new_layers = []
        if prefix is None:
            x, first = self.embed(input_ids), 0
        else:
            x, s = self.blocks[0].rest(prefix[0], None if state is None else state.layers[0], prefix[1])
            new_layers.append(s)
            first = 1
        for i in range(first, len(self.blocks)):
            x, s = self.blocks[i](x, None if state is None else state.layers[i])
            new_layers.append(s)
        logits = self.head(self.norm(x))
        tokens = (state.tokens if state is not None else 0) + input_ids.shape[1]
        return logits, x, ModelState(tuple(new_layers), tokens)

    def new_sequence(self, state: ModelState | None) -> ModelState | None:
        """The state for a new sequence: sequence-scoped levels reset, ``carry`` levels kept."""
        if state is None:
            return None
        layers = []
        for block, s in zip(self.blocks, state.layers):
            kept = {}
            for name, sub in (s or {}).items():
                module = getattr(block, name, None)
                reset = getattr(module, "new_sequence", None)
                value = reset(sub) if reset is not None else None
                if value is not None:
                    kept[name] = value
            layers.append(kept)
        return ModelState(tuple(layers), 0)

    @staticmethod
    def detach_state(state: ModelState | None) -> ModelState | None:
        """The same state cut from the autograd graph (for truncated backprop over a stream)."""
        if state is None:
            return None
        return map_state(state, lambda t: t.detach())

    def extra_repr(self) -> str:
        lines = [f"spec={self.spec_file!r}", "levels (fastest first):"]
        lines += [f"  {lv}" for lv in self.levels]
        return "\n".join(lines)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

