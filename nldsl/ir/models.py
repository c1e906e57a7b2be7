"""The IR: frozen pydantic models with every default resolved.

The IR says what the spec means, not how it was written: no comments, no positions (those
live in :class:`nldsl.ir.sourcemap.SourceMap`, keyed by IR paths such as
``("models", "Hope", "memories", "titans", "rule")``), no references left to resolve.
``nldsl fmt --resolved`` prints it back as spec text.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- values: literals, references to parameters, calls and operators ----------------------


class Ref(Node):
    """A name: a model/optimizer parameter, a memory, a level, a builtin like ``grad``."""

    kind: Literal["ref"] = "ref"
    name: str


class Call(Node):
    kind: Literal["call"] = "call"
    func: str
    args: tuple["Value", ...] = ()
    kwargs: tuple[tuple[str, "Value"], ...] = ()


class Op(Node):
    """Operators: ``+ - * / **``, ``neg``, ``index``, ``tuple`` and ``->`` (sequential)."""

    kind: Literal["op"] = "op"
    op: Literal["+", "-", "*", "/", "**", "neg", "index", "tuple", "->"]
    args: tuple["Value", ...]


class Text(Node):
    """A string literal (names are :class:`Ref`)."""

    kind: Literal["text"] = "text"
    value: str


Value = Union[bool, int, float, Text, Ref, Call, Op]


# ---- levels ------------------------------------------------------------------------------

Clock = Literal["tokens", "steps"]


class Level(Node):
    """A set of memories that update together every ``period`` units of ``clock``.

    ``scope``: ``sequence`` resets the level's state at each new sequence; ``carry`` keeps it
    across calls (learning continues at deployment). ``read``: ``anchor`` reads the state as of
    the last update boundary (the chunk-start state; with period 1, read-before-write: M_{t-1});
    ``running`` lets token t see the writes of the tokens of its chunk up to and including its
    own (with period 1, read-after-write: M_t). Gradients are taken at the chunk-start state
    in both modes.
    """

    name: str
    clock: Clock
    period: int
    scope: Literal["sequence", "carry"] = "sequence"
    read: Literal["anchor", "running"] = "anchor"

    @property
    def frequency(self) -> float:
        return 1.0 / self.period


# ---- memories ----------------------------------------------------------------------------

Activation = Literal["gelu", "silu", "relu", "tanh", "identity"]


class Structure(Node):
    kind: Literal["linear", "mlp", "attention", "elementwise"]
    depth: Optional[int] = None  # mlp: number of layers
    expansion: Optional[float] = None  # mlp: hidden width / input width
    residual: Optional[bool] = None  # mlp: M(x) = x + f(x)
    activation: Optional[Activation] = None  # mlp
    norm: Optional[Literal["none", "l2"]] = None  # mlp: L2-normalise the hidden activations
    prenorm: Optional[Literal["none", "rms"]] = None  # CMS blocks: RMS-normalise the block input
    window: Optional[int] = None  # attention: sliding window (None: global causal)


class Objective(Node):
    """The inner loss L~(M(k); v) the memory descends."""

    kind: Literal["dot", "l2", "l1", "lp", "huber"]
    p: Optional[float] = None  # lp
    delta: Optional[float] = None  # huber


class Rule(Node):
    """How one step on the objective is taken: gd, delta gradient descent, Omega window."""

    kind: Literal["gd", "dgd", "omega"]
    window: Optional[int] = None  # omega: number of cached inputs c >= 1


def moves_along_key(objective: str, rule: str, structure: str = "linear") -> bool:
    """Whether a memory's step moves M(k) along its key by about eta ||k||^2: every objective that
    compares M(k) with a target, DGD's erase, and any step of an MLP (the Hebbian `dot` adds
    v k^T to a matrix and erases nothing, but an MLP's inner layers learn from errors that pass
    through its state, whatever the objective). Such a step diverges on unbounded keys once
    eta ||k||^2 passes 2, so in-context memories of this kind normalise keys (and an MLP its
    hidden layers) by default."""
    return objective != "dot" or rule == "dgd" or structure == "mlp"


class Momentum(Node):
    kind: Literal["none", "constant", "gate", "delta", "deep"]
    beta: Optional[Value] = None  # constant decay of the momentum


class Precondition(Node):
    kind: Literal["none", "newton_schulz"]
    steps: Optional[int] = None
    coefficients: Optional[tuple[float, float, float]] = None


class Retention(Node):
    """How much of the previous state is kept (alpha): none=1, a constant, a gate alpha_t."""

    kind: Literal["none", "constant", "gate"]
    value: Optional[Value] = None


class LearningRate(Node):
    """The inner step size eta: a constant or a gate eta_t (source given by ``inputs.eta``)."""

    kind: Literal["constant", "gate"]
    value: Optional[Value] = None


Source = Literal["static", "generated"]


class Inputs(Node):
    """Where k, v, q, eta, alpha come from: a static projection (trained by the outer level)
    or a memory updated in context (self-modifying)."""

    k: Source = "static"
    v: Source = "static"
    q: Source = "static"
    eta: Source = "static"
    alpha: Source = "static"

    def generated(self) -> tuple[str, ...]:
        return tuple(n for n in ("k", "v", "q", "eta", "alpha") if getattr(self, n) == "generated")


class Init(Node):
    """The state before the first write: zeros, random, meta-learned by a slower level, a
    pretrained MLP (CMS ad-hoc level stacking), a constant, or the first input itself (how
    torch.optim.SGD starts its momentum buffer)."""

    kind: Literal["zeros", "random", "meta", "pretrained", "constant", "first"]
    path: Optional[str] = None  # pretrained: a safetensors file
    value: Optional[Value] = None  # constant


class Memory(Node):
    """An associative memory: a structure, an objective, a learning rule, in one level.

    Fields that do not apply to a memory's structure (attention is non-parametric) or to its
    owner (optimizer memories have no k/v/q) are ``None``.
    """

    name: str
    level: str
    structure: Structure
    objective: Optional[Objective] = None
    rule: Optional[Rule] = None
    momentum: Optional[Momentum] = None
    precondition: Optional[Precondition] = None
    retention: Optional[Retention] = None
    lr: Optional[LearningRate] = None
    read: Optional[Literal["anchor", "running"]] = None
    inputs: Optional[Inputs] = None
    generators: Optional[str] = None  # the level of the memories that generate its inputs
    signal: Optional[Literal["values", "self", "surprise"]] = None
    writes: Optional[Literal["differentiable", "detached"]] = None
    init: Optional[Init] = None
    heads: Optional[int] = None
    qk_norm: Optional[Literal["l2", "none"]] = None
    v_norm: Optional[Literal["l2", "none"]] = None  # L2-normalise the values (self-modifying memories)
    conv: Optional[int] = None  # causal depthwise convolution width on q/k/v, 0 = none
    input: Optional[Value] = None  # optimizer memories: the stream compressed (grad, grad**2): the value
    # optimizer memories: the key the memory associates with its input (None: no key, the state
    # itself is compared with the input). Elementwise memories predict m * key, linear ones
    # m key^T (the delta rule, Eq. 48-49), MLP memories m(key) (deep momentum, Eq. 50).
    key: Optional[Value] = None
    bias_correction: Optional[bool] = None  # optimizer memories


class Cms(Node):
    """A Continuum Memory System: one MLP memory per level, fast to slow (paper section 7)."""

    name: str
    variant: Literal["sequential", "nested", "independent"]
    levels: tuple[str, ...]
    memories: tuple[Memory, ...]  # one per level, named ``{cms}_{level}``
    aggregate: Optional[Literal["sum", "weighted"]] = None  # independent variant


TransferKind = Literal["condition", "context", "backprop", "init", "generate"]


class Transfer(Node):
    """Knowledge transfer between levels or memories (paper section 3.3)."""

    source: str
    target: str
    kind: TransferKind
    self_referential: bool = False


class Model(Node):
    name: str
    doc: str = ""
    params: tuple[tuple[str, Value], ...] = ()
    levels: tuple[Level, ...] = ()
    memories: tuple[Memory, ...] = ()
    cms: tuple[Cms, ...] = ()
    transfers: tuple[Transfer, ...] = ()
    block: Optional[Value] = None
    optimizer: Optional[str] = None

    def param(self, name: str, default=None):
        return dict(self.params).get(name, default)

    def all_memories(self) -> tuple[Memory, ...]:
        return self.memories + tuple(m for c in self.cms for m in c.memories)


class Optimizer(Node):
    name: str
    doc: str = ""
    params: tuple[tuple[str, Value], ...] = ()
    levels: tuple[Level, ...] = ()
    memories: tuple[Memory, ...] = ()
    update: Optional[Value] = None

    def param(self, name: str, default=None):
        return dict(self.params).get(name, default)

    def all_memories(self) -> tuple[Memory, ...]:
        return self.memories


class Edit(Node):
    op: Literal["set", "remove", "add"]
    path: tuple[str, ...]
    value: Optional[Value] = None


class Ablation(Node):
    name: str
    target: str
    edits: tuple[Edit, ...]


class SpecIR(Node):
    """Everything one spec file defines (includes resolved into ``includes``)."""

    file: str
    models: tuple[Model, ...] = ()
    optimizers: tuple[Optimizer, ...] = ()
    ablations: tuple[Ablation, ...] = ()
    includes: tuple[str, ...] = ()


for _cls in (Call, Op):
    _cls.model_rebuild()
