"""The surface syntax tree: frozen dataclasses, one per grammar construct.

Positions live in ``span``/``spans`` fields that take no part in equality, so two trees
parsed from differently formatted text compare equal. Comments and blank lines are kept on
the statements (they are part of what ``nldsl fmt`` must preserve) and do take part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns count from 1, end is exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)


def _spans() -> dict:
    return field(default_factory=dict, compare=False, repr=False)


# ---- expressions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: int | float
    text: str  # as written, so fmt keeps 1e-3 as 1e-3
    span: Span | None = _span()


@dataclass(frozen=True)
class String:
    value: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class KwArg:
    name: str
    value: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...] = ()
    kwargs: tuple[KwArg, ...] = ()
    span: Span | None = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / **
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Index:
    target: "Expr"
    index: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Tuple:
    items: tuple["Expr", ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Chain:
    """``a -> b -> c``: sequential composition (blocks) or data flow."""

    items: tuple["Expr", ...]
    span: Span | None = _span()


Expr = Union[Number, String, Name, Bool, Call, BinOp, Neg, Index, Tuple, Chain]


# ---- statements ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trivia:
    """What fmt keeps around a statement: comments above it (``""`` where a blank line separates
    two of them, or the last from the statement), one after it, a blank line before them."""

    comments: tuple[str, ...] = ()
    trailing: str | None = None
    blank_before: bool = False


def _trivia() -> Trivia:
    return field(default_factory=Trivia)


@dataclass(frozen=True)
class Prop:
    """``objective l2`` or ``inputs k=generated, q=static`` inside a ``{ ... }`` body."""

    name: str
    values: tuple[Expr, ...] = ()
    kwargs: tuple[KwArg, ...] = ()
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Body:
    props: tuple[Prop, ...] = ()
    closing: tuple[str, ...] = ()  # comments after the last property
    span: Span | None = _span()


@dataclass(frozen=True)
class Include:
    path: str
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Param:
    name: str
    value: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Level:
    name: str
    clock: str
    period: Expr
    scope: str | None = None  # "carry" | "reset" | None (default)
    read: str | None = None  # "anchor" | "running" | None (default)
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Memory:
    name: str
    level: str
    structure: Expr
    body: Body | None = None
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Cms:
    name: str
    variant: str
    body: Body | None = None
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Transfer:
    source: str
    target: str
    kind: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Block:
    expr: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class UseOptimizer:
    expr: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Update:
    expr: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Path:
    parts: tuple[str, ...]
    span: Span | None = _span()

    def __str__(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class SetEdit:
    path: Path
    value: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class RemoveEdit:
    path: Path
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class AddEdit:
    path: Path
    value: Expr
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


Edit = Union[SetEdit, RemoveEdit, AddEdit]
ModelStmt = Union[Param, Level, Memory, Cms, Transfer, Block, UseOptimizer]
OptimizerStmt = Union[Param, Level, Memory, Update]


@dataclass(frozen=True)
class Model:
    name: str
    stmts: tuple[ModelStmt, ...] = ()
    closing: tuple[str, ...] = ()
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Optimizer:
    name: str
    stmts: tuple[OptimizerStmt, ...] = ()
    closing: tuple[str, ...] = ()
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


@dataclass(frozen=True)
class Ablation:
    name: str
    edits: tuple[Edit, ...] = ()
    closing: tuple[str, ...] = ()
    trivia: Trivia = _trivia()
    span: Span | None = _span()
    spans: dict = _spans()


TopLevel = Union[Include, Model, Optimizer, Ablation]


@dataclass(frozen=True)
class File:
    items: tuple[TopLevel, ...] = ()
    closing: tuple[str, ...] = ()  # comments after the last item
    path: str = field(default="<spec>", compare=False)
