"""Triton kernels generated from specs: ``kernels.py`` beside the generated model.

A spec's kernels file is a list of *parts*, each a template under
``codegen_templates/kernels/`` rendered with its own context (:class:`KernelPart`). This module
plans the parts of two families and renders the file; others add parts the same way (see
:data:`PART_PLANNERS`):

* the linear memories (one :class:`LinearKernelSpec` per memory: its rule, retention, gate
  transforms, chunk size and head sizes become constants of the kernels);
* the deep memories: MLP memories (Titans, self-modifying Titans) and CMS chains get the fused
  per-chunk gradient of a two-layer MLP (one :class:`MlpKernelSpec` per memory or chain: its
  activation, residual, hidden normalisation, dims and token tile are constants).

* :func:`generate_kernels` -- a checked spec's kernels file (``None`` when no memory has a Triton
  path); ``nldsl compile`` writes it as ``kernels.py``, :func:`nldsl.compile` loads it on first
  use of ``impl='triton'``.
* :func:`render_kernels` -- the file for any list of parts (deterministic: the same parts give
  byte-identical text; the torch.library namespace is a hash of the rendered parts).
* :func:`linear_kernel`, :func:`mlp_kernel` -- one specialisation rendered and imported in process
  (cached): what the runtime ops' ``impl='triton'`` and models built with other head sizes than
  their spec's use.

Rendering needs jinja2 only; importing the rendered file needs triton.
"""
from __future__ import annotations

import ast
import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from nldsl.codegen.naming import sanitize
from nldsl.codegen.render import docstring, environment, header

__all__ = ["GeneratedKernels", "KernelPart", "LinearKernelSpec", "MlpKernelSpec", "PART_PLANNERS", "generate_kernels",
           "kernel_residual", "kernels_and_gaps", "linear_kernel", "linear_part", "mlp_kernel", "mlp_part", "mlp_tile",
           "padded_pow2", "render_kernels"]


def kernel_residual(residual: bool, prenorm: str) -> bool:
    """Whether the fused MLP kernel of a block adds the block's input itself: with a pre-norm it
    runs on the normalised input, and the residual (of the raw input) is added outside it."""
    return bool(residual) and (prenorm or "none") == "none"


#: chunk sizes the linear kernels accept: powers of two (tl.dot tiles are >= 16)
CHUNK_SIZES = (16, 32, 64, 128)
RULES = ("hebbian", "delta", "dgd")
GATE_KINDS = ("none", "const", "gate", "tensor")
#: state columns per program of the linear kernels' sequential, output and decoding kernels: on an
#: H200 at K=V=128, the delta rule's forward+backward took 19% / 26% less time with 64 than with 32
#: at 8k / 2k tokens (each program rereads a chunk's keys and W and recomputes Q K^T once per column
#: block), 6% more at 32k with one sequence; 16 and 128 were slower (benchmarks/README.md)
DEFAULT_BLOCK_V = 64


def padded_pow2(n: int) -> int:
    """A block size for n: the next power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << (n - 1).bit_length())


class _CheckedSpec:
    """A kernel specialisation that refuses to exist with problems (see ``problems``)."""

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError(f"{type(self).__name__} {self.name!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class LinearKernelSpec(_CheckedSpec):
    """What the linear-memory kernels are specialised to (every field becomes a constant).

    * ``rule``: ``hebbian`` (``S_t = a_t S_{t-1} + c_t k_t v_t^T``), ``delta`` (erase on the
      decayed state, Gated DeltaNet), ``dgd`` (Delta Gradient Descent with retention: erase and
      gradient at the undecayed state, plus the gradient at the period's anchor).
    * ``lr``: the step size ``c_t``. ``none`` (1), ``const`` (``lr_value``), ``gate`` (the kernels
      take its logit and apply the sigmoid), ``tensor`` (the value).
    * ``decay``: the retention ``a_t``. ``none``, ``const`` (``decay_value``, multiplicative),
      ``gate`` (the kernels take its logit: ``log a_t = logsigmoid(logit)``), ``tensor`` (``log a_t``).
    * ``qk_l2norm``: q and k are L2-normalised inside the kernels (and in their backward).
    * ``head_k``, ``head_v``: head sizes; ``chunk``: tokens per chunk (a power of two, 16 to 128).
    * ``period``, ``read`` (``dgd`` only): tokens between anchors (a power of two dividing
      ``chunk``: 1 is the exact per-token rule) and ``running`` / ``anchor`` reads.
    * ``block_v``: columns of the state one program of the sequential, output and decoding
      kernels holds (a power of two from 16 to the padded ``head_v``); None picks
      :data:`DEFAULT_BLOCK_V` or the whole padded ``head_v`` if smaller.
    """

    name: str
    rule: str
    head_k: int
    head_v: int
    lr: str = "none"
    lr_value: float = 1.0
    decay: str = "none"
    decay_value: float = 1.0
    qk_l2norm: bool = False
    chunk: int = 64
    period: int = 1
    read: str = "running"
    block_v: int | None = None

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            out.append(f"name must be an identifier, got {self.name!r}")
        if self.rule not in RULES:
            out.append(f"rule must be one of {RULES}, got {self.rule!r}")
        for field_name in ("lr", "decay"):
            if getattr(self, field_name) not in GATE_KINDS:
                out.append(f"{field_name} must be one of {GATE_KINDS}, got {getattr(self, field_name)!r}")
        for field_name in ("head_k", "head_v"):
            n = getattr(self, field_name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                out.append(f"{field_name} must be a positive int, got {n!r}")
        if self.chunk not in CHUNK_SIZES:
            out.append(f"chunk must be one of {CHUNK_SIZES} (tl.dot tiles are powers of two >= 16), got {self.chunk!r}")
        for field_name in ("lr_value", "decay_value"):
            x = getattr(self, field_name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                out.append(f"{field_name} must be a finite number, got {x!r}")
        if self.decay == "const" and not (isinstance(self.decay_value, (int, float)) and 0 < self.decay_value <= 1):
            out.append(f"decay_value must be in (0, 1], got {self.decay_value!r}")
        if self.rule == "dgd":
            if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1 \
                    or self.period & (self.period - 1) or self.period > self.chunk:
                out.append(f"period must be a power of two dividing chunk={self.chunk} (the kernels put each "
                           f"anchor period inside one chunk), got {self.period!r}")
            if self.read not in ("running", "anchor"):
                out.append(f"read must be 'running' or 'anchor', got {self.read!r}")
        elif self.read != "running" or self.period != 1:
            out.append("period and read apply to the dgd rule only")
        bv = self.block_v
        if bv is not None and (isinstance(bv, bool) or not isinstance(bv, int) or bv < 16 or bv & (bv - 1)
                               or isinstance(self.head_v, int) and bv > padded_pow2(self.head_v)):
            out.append(f"block_v must be None or a power of two from 16 to head_v padded to a power of two, got {bv!r}")
        return out

    def title(self) -> str:
        rule = {"hebbian": "Hebbian (dot-product) memory", "delta": "delta rule",
                "dgd": f"DGD with period {self.period}, {self.read} reads"}[self.rule]
        bits = [rule]
        if self.decay != "none":
            bits.append({"const": f"constant retention {self.decay_value!r}", "gate": "retention gate (logit)",
                         "tensor": "log retention"}[self.decay])
        if self.lr != "none":
            bits.append({"const": f"learning rate {self.lr_value!r}", "gate": "learning-rate gate (logit)",
                         "tensor": "learning rate"}[self.lr])
        if self.qk_l2norm:
            bits.append("L2-normalised q, k")
        bits.append(f"K={self.head_k}, V={self.head_v}, chunk {self.chunk}")
        return ", ".join(bits)

    def context(self, prefix: str, origin: str = "") -> dict:
        """The template context of ``linear_memory.py.j2``."""
        KP, VP = padded_pow2(self.head_k), padded_pow2(self.head_v)
        BV = self.block_v or min(VP, DEFAULT_BLOCK_V)
        return dict(
            p=prefix, P=prefix.upper(), title=self.title(), origin=origin or "nldsl runtime",
            rule=self.rule, lr=self.lr, lr_value=float(self.lr_value), decay=self.decay,
            decay_value=float(self.decay_value),
            log_decay=math.log(self.decay_value) if self.decay == "const" else 0.0,
            qk_l2norm=self.qk_l2norm, K=self.head_k, V=self.head_v, KP=KP, VP=VP, BT=self.chunk,
            NB=self.chunk // 16, BV=BV, NV=VP // BV, period=self.period, read=self.read,
            spec=asdict(self),
        )


#: activations of the MLP kernels (those of nldsl.runtime.deep_memory)
MLP_ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
#: tokens per program of the MLP kernels: powers of two (tl.dot tiles are >= 16)
MLP_TILES = (16, 32, 64)


def mlp_tile(period: int) -> int:
    """The token tile for chunks of ``period`` tokens: one program per chunk up to 64 tokens (a
    longer chunk is split into tiles whose gradient sums are added)."""
    return min(64, padded_pow2(period))


@dataclass(frozen=True)
class MlpKernelSpec(_CheckedSpec):
    """What the MLP memory kernel is specialised to (every field becomes a constant).

    The memory is ``M(z) = z + W_out act(W_in z)`` per row (a sequence-head), weights in
    application order: ``W_in [d_hidden, d_in]``, ``W_out [d_out, d_hidden]``; ``residual``
    drops or keeps the ``z +`` (it needs ``d_in == d_out``), ``hidden_norm="l2"`` L2-normalises
    the hidden activations across the hidden units. ``chunk``: tokens per program (a power of
    two, 16 to 64; longer chunks take several programs).
    """

    name: str
    d_in: int
    d_hidden: int
    d_out: int
    activation: str = "gelu"
    residual: bool = True
    hidden_norm: str = "none"
    chunk: int = 16

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            out.append(f"name must be an identifier, got {self.name!r}")
        for field_name in ("d_in", "d_hidden", "d_out"):
            n = getattr(self, field_name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                out.append(f"{field_name} must be a positive int, got {n!r}")
        if self.activation not in MLP_ACTIVATIONS:
            out.append(f"activation must be one of {MLP_ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.residual, bool):
            out.append(f"residual must be a bool, got {self.residual!r}")
        elif self.residual and self.d_in != self.d_out:
            out.append(f"residual=True needs d_in == d_out, got {self.d_in} and {self.d_out}")
        if self.hidden_norm not in ("none", "l2"):
            out.append(f"hidden_norm must be 'none' or 'l2', got {self.hidden_norm!r}")
        if self.chunk not in MLP_TILES:
            out.append(f"chunk must be one of {MLP_TILES} (tl.dot tiles are powers of two >= 16), got {self.chunk!r}")
        return out

    def title(self) -> str:
        form = f"z + W_out {self.activation}(W_in z)" if self.residual else f"W_out {self.activation}(W_in z)"
        norm = ", L2-normalised hidden" if self.hidden_norm == "l2" else ""
        return (f"MLP memory {form}{norm}, K={self.d_in}, hidden={self.d_hidden}, V={self.d_out}, "
                f"{self.chunk} tokens per program")

    def context(self, prefix: str, origin: str = "") -> dict:
        """The template context of ``mlp_grad.py.j2``."""
        KP, VP = padded_pow2(self.d_in), padded_pow2(self.d_out)
        BH = min(64, padded_pow2(self.d_hidden))
        # larger tiles keep more [BT, K] accumulators live: more warps to hold them
        num_warps = 4 if self.chunk * max(KP, VP) <= 64 * 64 else 8
        return dict(
            p=prefix, P=prefix.upper(), title=self.title(), origin=origin or "nldsl runtime",
            activation=self.activation, residual=self.residual, hidden_l2=self.hidden_norm == "l2",
            K=self.d_in, H=self.d_hidden, V=self.d_out, KP=KP, VP=VP, BH=BH, NH=-(-self.d_hidden // BH),
            BT=self.chunk, num_warps=num_warps, spec=asdict(self),
        )


@dataclass(frozen=True)
class KernelPart:
    """One piece of a kernels file: ``template`` (under ``codegen_templates/kernels/``) rendered
    with ``context``. ``exports`` lists ``(spec name, identifier)`` of the objects the part
    defines that the generated model looks up (``KERNELS``); ``imports`` adds import lines."""

    template: str
    context: dict
    exports: tuple[tuple[str, str], ...] = ()
    imports: tuple[str, ...] = ()


#: Suffixes a linear part appends to its prefix (the prefix is chosen so that none collides).
_LINEAR_NAMES = ("", "_kkt", "_solve", "_wu", "_states", "_output", "_state_grads", "_chunk_grads", "_wy_grads",
                 "_recurrent", "_chunk", "_chunk_bwd", "_step", "_states_of", "_chunk_backward", "_setup", "_backward")
_FILE_NAMES = frozenset({"Optional", "torch", "triton", "tl", "launch", "LinearKernel", "MlpKernel", "acc_dtype",
                         "contiguous", "define_op", "dot_precision", "is_interpreted", "NAMESPACE", "SPEC_SHA256",
                         "KERNELS", "MISSING"})


#: ... and those an MLP part appends.
_MLP_NAMES = ("", "_act", "_act_grad", "_w_in", "_w_out", "_forward", "_grads", "_grads_op", "_setup", "_backward")


def _prefix(wanted: str, taken: set[str], suffixes: tuple[str, ...] = _LINEAR_NAMES) -> str:
    """A lower-case identifier prefix whose derived names (and upper-case constants) are free."""
    p = sanitize(wanted).lower()
    while any(n in taken or n.lstrip("_") in taken for n in _names(p, suffixes)):
        p += "_"
    taken.update(_names(p, suffixes))
    return p


def _names(p: str, suffixes: tuple[str, ...]) -> list[str]:
    return [p + s for s in suffixes] + [f"_{p}" + s for s in suffixes] + [p.upper() + "_"]


def linear_part(spec: LinearKernelSpec, export: str, *, origin: str = "", taken: set[str] | None = None,
                prefix: str | None = None) -> KernelPart:
    """The part of a kernels file for one linear memory; its identifiers start with ``prefix``
    (default ``spec.name``; made unique against ``taken``, which it updates)."""
    taken = set(_FILE_NAMES) if taken is None else taken
    prefix = _prefix(prefix or spec.name, taken)
    return KernelPart("linear_memory.py.j2", spec.context(prefix, origin), exports=((export, prefix),))


def mlp_part(spec: MlpKernelSpec, export: str, *, origin: str = "", taken: set[str] | None = None,
             prefix: str | None = None) -> KernelPart:
    """The part of a kernels file for one MLP memory (or CMS chain); see :func:`linear_part`."""
    taken = set(_FILE_NAMES) if taken is None else taken
    prefix = _prefix(prefix or spec.name, taken, _MLP_NAMES)
    return KernelPart("mlp_grad.py.j2", spec.context(prefix, origin), exports=((export, prefix),),
                      imports=("from nldsl.runtime._triton import MlpKernel",))


def render_kernels(parts: list[KernelPart], *, label: str, sha256: str, doc: str,
                   missing: dict[str, str] | None = None) -> str:
    """The text of a kernels file made of ``parts`` (see the module docstring)."""
    from nldsl import __version__

    env = _environment()
    rendered = [env.get_template(f"kernels/{part.template}").render(**part.context).strip("\n") for part in parts]
    digest = hashlib.sha256("\n".join([__version__, *rendered]).encode("utf-8")).hexdigest()
    imports = list(dict.fromkeys(line for part in parts for line in part.imports))
    source = env.get_template("kernels/kernels.py.j2").render(
        header=header(__version__, label, sha256), doc=docstring(doc), namespace=f"nldsl_{digest[:16]}",
        sha256=sha256, imports=imports, parts=rendered,
        kernels=[e for part in parts for e in part.exports], missing=dict(sorted((missing or {}).items())),
    )
    try:
        ast.parse(source)
    except SyntaxError as e:  # a bug in a template, never in the user's spec
        raise RuntimeError(f"nldsl generated invalid Python for the kernels of {label} (line {e.lineno}): "
                           f"{e.msg}") from e
    return source


def _block(text: str, width: int) -> str:
    """A snippet (a macro's output) indented by ``width`` spaces, without trailing blank lines."""
    pad = " " * width
    return "\n".join(pad + line if line.strip() else "" for line in text.strip("\n").split("\n"))


def _environment():
    env = environment()
    env.filters["block"] = _block
    return env


# --------------------------------------------------------------------------------------------
# a spec's kernels
# --------------------------------------------------------------------------------------------

@dataclass
class GeneratedKernels:
    """A spec's kernels file: its text, and the memories left without kernels (and why)."""

    source: str
    exports: list[str]
    missing: dict[str, str] = field(default_factory=dict)


#: Planners of kernel parts: ``planner(model, item, level, ctx, taken) -> KernelPart | str | None``
#: for each memory (``nldsl.ir.models.Memory``, with its level) and CMS chain (``Cms``, level None)
#: a model's block uses: a part; a reason it has no Triton path; or None (not this planner's kind).
#: ``taken`` holds the identifiers already used in the file (see :func:`linear_part`).
PART_PLANNERS: list[Callable[..., Any]] = []


def _linear_planner(model, mem, level, ctx, taken):
    if getattr(mem, "structure", None) is None or mem.structure.kind != "linear":
        return None
    from nldsl.codegen.model_plan import linear_op

    op = linear_op(mem, level)
    rule = {"linear_attention": "hebbian", "delta_rule": "delta", "gated_delta_rule": "delta", "dgd": "dgd"}.get(op)
    if op == "self_modifying_titans":
        return ("a self-modifying memory (generated inputs) has no Triton kernel for one-layer memories "
                "(the MLP kernel takes two-layer ones)")
    if rule is None:
        what = ("a self-generated target (signal self)" if mem.signal == "self" else
                "the Omega rule" if mem.rule.kind == "omega" else
                f"momentum (`momentum {mem.momentum.kind}`)" if mem.momentum.kind != "none" else op or "this rule")
        return (f"{what} has no Triton kernel yet (kernels exist for the Hebbian, delta, gated delta "
                "and DGD rules)")

    def rate(kind, value, what):
        if kind == "gate":
            return "gate", 1.0
        if kind == "constant" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return "const", float(value)
        if kind == "none":
            return "none", 1.0
        raise _NoKernel(f"its {what} ({kind}) is not a number or a gate")

    try:
        lr, lr_value = rate(mem.lr.kind, mem.lr.value, "learning rate")
        decay, decay_value = rate(mem.retention.kind, mem.retention.value, "retention")
    except _NoKernel as e:
        return str(e)
    if decay == "const" and not 0 < decay_value <= 1:
        return f"its constant retention {decay_value!r} is not in (0, 1]"
    heads = mem.heads or model.param("heads")
    dim = model.param("dim")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (heads, dim)) or dim % heads:
        return f"its head size (dim {dim!r} / heads {heads!r}) is not a positive integer"
    head = dim // heads
    if rule == "hebbian" and mem.read == "anchor":
        return "its read before the write (read anchor) has no Triton kernel yet (read running has)"
    if rule == "dgd" and mem.objective.kind != "l2":
        return f"the DGD kernels take the l2 objective, not {mem.objective.kind}"
    period, read = (level.period, mem.read) if rule == "dgd" else (1, "running")
    chunk = 64
    if rule == "dgd" and (period & (period - 1) or period > chunk):
        return f"its period {period} is not a power of two dividing the kernels' chunk of {chunk} tokens"
    try:
        spec = LinearKernelSpec(name=sanitize(f"{model.name}_{mem.name}"), rule=rule, head_k=head, head_v=head,
                                lr=lr, lr_value=lr_value, decay=decay, decay_value=decay_value,
                                qk_l2norm=mem.qk_norm == "l2", chunk=chunk, period=period, read=read)
    except ValueError as e:  # the model still compiles; only its kernels are missing
        return f"the kernels cannot be specialised to it ({e})"
    span = ctx.spans.get((model.name, "memory", mem.name))
    origin = f"{ctx.label}:{span.line}" if span else ctx.label
    return linear_part(spec, f"{model.name}.{mem.name}", origin=origin, taken=taken, prefix=mem.name)


class _NoKernel(Exception):
    pass


PART_PLANNERS.append(_linear_planner)


def _mlp_planner(model, item, level, ctx, taken):
    """MLP memories (Titans' deep memory, self-modifying Titans) and CMS chains: the fused
    per-chunk gradient of their two-layer MLPs."""
    is_cms = not hasattr(item, "structure")
    s = item.memories[0].structure if is_cms else item.structure
    if s is None or s.kind != "mlp":
        return None
    what = "its blocks" if is_cms else "it"
    if s.depth != 2:
        return f"the MLP kernel covers two-layer MLPs; {what} {'have' if is_cms else 'has'} depth {s.depth}"
    objective = (item.memories[0] if is_cms else item).objective.kind
    if objective not in ("l2", "dot"):
        return f"the MLP kernel takes the l2 or dot objective, not {objective}"
    if not is_cms and item.rule.kind == "omega":
        return "the MLP kernel takes one token a step, not the Omega rule's window"
    if not is_cms and item.precondition.kind != "none":
        return "the MLP kernel computes plain steps, not Newton-Schulz ones"
    dim = model.param("dim")
    levels = {lv.name: lv for lv in model.levels}
    if is_cms:
        d, hidden = dim, int(dim * s.expansion)  # as nldsl.nn.deep.CmsChain builds it
        periods = [levels[name].period for name in item.levels]
        key = (model.name, "cms", item.name)
    else:
        heads = item.heads or model.param("heads")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (heads, dim)) or dim % heads:
            return f"its head size (dim {dim!r} / heads {heads!r}) is not a positive integer"
        d = dim // heads
        hidden = max(1, int(d * s.expansion))  # as DeepMemory / SelfModifyingTitans build it
        periods = [level.period]
        if item.inputs.generated() and item.generators in levels:  # the generating memories' chunks
            periods.append(levels[item.generators].period)
        key = (model.name, "memory", item.name)
    try:
        spec = MlpKernelSpec(name=sanitize(f"{model.name}_{item.name}"), d_in=d, d_hidden=hidden, d_out=d,
                             activation=s.activation, residual=kernel_residual(s.residual, s.prenorm),
                             hidden_norm=getattr(s, "norm", None) or "none", chunk=mlp_tile(min(periods)))
    except ValueError as e:  # the model still compiles; only its kernels are missing
        return f"the MLP kernel cannot be specialised to {what} ({e})"
    span = ctx.spans.get(key)
    origin = f"{ctx.label}:{span.line}" if span else ctx.label
    return mlp_part(spec, f"{model.name}.{item.name}", origin=origin, taken=taken, prefix=item.name)


PART_PLANNERS.append(_mlp_planner)


def generate_kernels(analysis) -> GeneratedKernels | None:
    """The kernels file of a checked spec, or None when none of its memories has a Triton path."""
    return kernels_and_gaps(analysis)[0]


def kernels_and_gaps(analysis) -> tuple[GeneratedKernels | None, dict[str, str]]:
    """:func:`generate_kernels` and, from the same planning, why each memory without a kernel has
    none (``{"Model.memory": reason}``: what ``impl='triton'`` says when no memory has one)."""
    parts, missing, ctx = _plan_kernels(analysis)
    if not parts:
        return None, missing
    names = ", ".join(name for part in parts for name, _ in part.exports)
    paragraphs = [f"Triton kernels generated from {ctx.label} for: {names}."]
    templates = {part.template for part in parts}
    if "linear_memory.py.j2" in templates:
        paragraphs.append(
            "Each linear memory's rule, retention, gate transforms, chunk size and head sizes are constants\n"
            "of its kernels. Chunkwise-parallel forward and backward (the backward recomputes the chunk\n"
            "states) and a token-by-token kernel for decoding; states in float32 (float64 for float64 inputs).")
    if "mlp_grad.py.j2" in templates:
        paragraphs.append(
            "Each MLP memory (or CMS chain) has one fused kernel for the per-chunk gradient of its two-layer\n"
            "MLP: forward, output error, hidden error, per-token factors and chunk sums; its activation,\n"
            "residual, hidden normalisation, dims and token tile are constants; float32 accumulation\n"
            "(float64 for float64 inputs).")
    paragraphs.append("Select them with the model's ``impl='triton'``; conventions: docs/kernels.md.")
    doc = "\n\n".join(paragraphs)
    source = render_kernels(parts, label=ctx.label, sha256=ctx.sha256, doc=doc, missing=missing)
    return GeneratedKernels(source=source, exports=[n for part in parts for n, _ in part.exports],
                            missing=missing), missing


def _plan_kernels(analysis):
    """(the kernel parts, ``{"Model.memory": why it has none}``, the codegen context) of a spec."""
    from nldsl.codegen import _context
    from nldsl.graph import block_names

    ctx = _context(analysis)
    parts, missing, taken = [], {}, set(_FILE_NAMES)
    for model in analysis.ir.models:
        levels = {lv.name: lv for lv in model.levels}
        used = set(block_names(model.block))
        items = [m for m in model.memories if m.structure.kind != "attention"] + list(model.cms)
        for item in items:
            if item.name not in used:
                continue
            for planner in PART_PLANNERS:
                result = planner(model, item, levels.get(getattr(item, "level", None)), ctx, taken)
                if isinstance(result, KernelPart):
                    parts.append(result)
                    break
                if isinstance(result, str):
                    missing[f"{model.name}.{item.name}"] = result
                    break
            else:
                kind = f"{item.structure.kind} memories" if hasattr(item, "structure") else "CMS chains"
                missing[f"{model.name}.{item.name}"] = f"{kind} have no Triton kernel yet"
    return parts, missing, ctx


# --------------------------------------------------------------------------------------------
# one specialisation, in process (runtime ops, other head sizes)
# --------------------------------------------------------------------------------------------

_RUNTIME: dict[Any, Any] = {}


def linear_kernel(spec: LinearKernelSpec):
    """The :class:`~nldsl.runtime._triton.LinearKernel` of one specialisation, rendered and
    imported in this process (cached; tracebacks show the generated lines)."""
    return _runtime_kernel(spec, linear_part, f"Triton kernels for {spec.title()} (rendered in process).")


def mlp_kernel(spec: MlpKernelSpec):
    """The :class:`~nldsl.runtime._triton.MlpKernel` of one specialisation, rendered and imported
    in this process (cached)."""
    return _runtime_kernel(spec, mlp_part, f"Triton kernel for the {spec.title()} (rendered in process).")


def _runtime_kernel(spec, part, doc: str):
    if spec not in _RUNTIME:
        from nldsl.codegen.loader import load_module
        from nldsl.runtime._triton import require_triton

        require_triton(spec.name)
        key = hashlib.sha256(repr(spec).encode("utf-8")).hexdigest()
        source = render_kernels([part(spec, spec.name)], label="nldsl runtime", sha256=key, doc=doc)
        module = load_module(source, f"nldsl_kernels_{spec.name}_{key[:12]}",
                             filename=f"<nldsl kernels:{spec.name}:{key[:12]}>")
        _RUNTIME[spec] = module.KERNELS[spec.name]
    return _RUNTIME[spec]
