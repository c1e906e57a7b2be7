"""Command-line overrides (a Hydra subset) and the sweep plan of ``nldsl ablate``.

An override is one command-line word:

- ``path=value``: set a value (``titans.rule=gd``, ``fast.every=16``, ``dim=64``);
- ``path=a,b,c``: a sweep, one variant per value; commas inside brackets or strings do not
  split (``structure=mlp(depth=2, expansion=4),linear`` is two values);
- ``path=range(start,stop[,step])``: a sweep over numbers, ``stop`` excluded (Hydra's
  semantics); floats are stepped with :class:`decimal.Decimal`, so ``range(0.1,0.4,0.1)`` is
  exactly ``0.1, 0.2, 0.3``; ``choice(a,b)`` is the same as ``a,b``;
- ``~path``: remove; ``+path=value``: add.

The parts are found by ``grammar/overrides.lark``; each value is a spec expression, parsed by
the spec grammar. Value nodes carry spans in a pseudo-file ``<override N>`` (line 1, columns of
the override text), so a checker diagnostic about a value can be shown under the override.

The plan is the cartesian product of the axes in command-line order: the named ablations
(``@name``) form the first axis, then one axis per override (Hydra's ``split_arguments``).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from nldsl import ablate
from nldsl.diagnostics import did_you_mean, suggest
from nldsl.syntax import ast as A
from nldsl.syntax.printer import expr as print_expr

MAX_RANGE = 10_000  # values one range() may produce
NAME_LIMIT = 100  # characters of a variant directory name (longer names end in a hash)

# what the calls a path can reach into accept (for did-you-mean on a path's last segment;
# the checker remains the judge of the values)
CALL_ARGS = {
    "mlp": ("depth", "expansion", "residual", "activation"),
    "attention": ("window",),
    "omega": ("window",),
    "lp": ("p",),
    "huber": ("delta",),
    "newton_schulz": ("steps", "coefficients"),
}
# how a choice that needs arguments is written, for "expects ..." help lines
CALL_FORMS = {"omega": "omega(window=N)", "lp": "lp(p=N)", "huber": "huber(delta=X)",
              "constant": "constant(X)", "newton_schulz": "newton_schulz(steps=N)"}


# ---- errors --------------------------------------------------------------------------------


class OverrideError(Exception):
    """A problem with one override, located in its text (columns count from 1, end exclusive)."""

    def __init__(self, text: str, message: str, column: int = 1, end_column: int | None = None,
                 help: str | None = None, code: str | None = None):
        super().__init__(message)
        self.text = text
        self.message = message
        self.column = max(1, column)
        self.end_column = end_column if end_column and end_column > self.column else self.column + 1
        self.help = help
        self.code = code

    def render(self) -> str:
        """``error: ...``, the override with a caret under the failing part, then the help."""
        tag = f"error[{self.code}]" if self.code else "error"
        out = [f"{tag}: {self.message}", f"  | {self.text}"]
        end = max(min(self.end_column, len(self.text) + 1), self.column + 1)
        out.append("  | " + " " * (self.column - 1) + "^" * (end - self.column))
        if self.help:
            out.append(f"  = help: {self.help}")
        return "\n".join(out)


# ---- overrides -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One value of an override: its text (as written, or made by ``range``) and expression."""

    text: str
    expr: A.Expr
    column: int  # where the value (or the range/choice call that made it) starts
    end_column: int


VERBS = {"set": "override", "add": "add", "remove": "remove"}


@dataclass(frozen=True)
class Override:
    index: int  # 1-based position among the overrides of the command line
    text: str  # as given
    op: str  # "set" | "add" | "remove"
    path: tuple[str, ...]
    segments: tuple[tuple[int, int], ...]  # (column, end column) of each path segment
    choices: tuple[Choice, ...] = ()

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def file(self) -> str:
        return override_file(self.index)

    @property
    def path_columns(self) -> tuple[int, int]:
        return self.segments[0][0], self.segments[-1][1]

    @property
    def values(self) -> list[Choice | None]:
        """The axis this override adds to the plan (one ``None`` for a removal)."""
        return list(self.choices) if self.op != "remove" else [None]

    def item(self, choice: Choice | None) -> str:
        """The override with one value, as it is shown in the plan: ``titans.rule=gd``."""
        if self.op == "remove":
            return f"~{self.key}"
        return f"{'+' if self.op == 'add' else ''}{self.key}={choice.text}"

    def span(self) -> A.Span:
        c, e = self.path_columns
        return A.Span(self.file, 1, c, 1, e)

    def edit(self, choice: Choice | None):
        """The ``(op, path, value, span)`` edit of ``nldsl.ablate.apply``."""
        return (self.op, self.path, None if choice is None else choice.expr, self.span())

    def error(self, message: str, column: int | None = None, end_column: int | None = None,
              help: str | None = None, code: str | None = None) -> OverrideError:
        c, e = self.path_columns
        return OverrideError(self.text, message, column or c, end_column or e, help, code)


def override_file(index: int) -> str:
    return f"<override {index}>"


@lru_cache(maxsize=1)
def _parser():
    from lark import Lark

    from nldsl import resources

    return Lark(resources.read_text("grammar", "overrides.lark"), parser="lalr", strict=True,
                propagate_positions=True, maybe_placeholders=False)


_TERMS = {"SEG": "a name", "ATOM": "a value", "STRING": "a string", "EQUAL": "`=`", "DOT": "`.`",
          "COMMA": "`,`", "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "TILDE": "`~`",
          "PLUS": "`+`", "$END": "the end"}

FORMS = "an override is written `path=value`, `path=a,b,c`, `~path` or `+path=value`"


def _syntax_error(text: str, e) -> OverrideError:
    from lark.exceptions import UnexpectedCharacters, UnexpectedToken

    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        col = e.pos_in_stream + 1
        if ch in "{}":
            return OverrideError(text, f"unexpected `{ch}`", col,
                                 help="values are spec expressions; dictionaries are not supported")
        if ch in "#;":
            return OverrideError(text, f"unexpected `{ch}`", col,
                                 help="a value cannot hold a comment or a `;`; give one override per word")
        if not text[:e.pos_in_stream].strip() or text[:e.pos_in_stream].strip() in "~+":
            return OverrideError(text, f"unexpected `{ch}`: a path starts with a name", col, help=FORMS)
        shown = ch if ch.isprintable() and ch.strip() else repr(ch)
        return OverrideError(text, f"unexpected character `{shown}`", col, help=FORMS)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        accepts = set(e.accepts or e.expected)
        expected = sorted({_TERMS.get(t, f"`{t.lower()}`") for t in accepts})
        exp = ", ".join(expected[:-1]) + " or " + expected[-1] if len(expected) > 1 else (expected or ["?"])[0]
        if tok.type == "$END":
            col = len(text) + 1
            for close in ("RPAR", "RSQB"):
                if close in accepts:
                    return OverrideError(text, f"a bracket is not closed; add {_TERMS[close]}", col)
            return OverrideError(text, f"the override ends too early; expected {exp}", col, help=FORMS)
        col = (tok.start_pos or 0) + 1
        shown = str(tok)
        if tok.type == "ATOM" and "ATOM" not in accepts:  # lexed by the fallback lexer: one character
            shown = shown[0]
        if col == 1 or text[:col - 1].strip() in ("~", "+"):
            return OverrideError(text, f"unexpected `{shown}`: an override starts with a path", col,
                                 col + len(shown), help=FORMS)
        return OverrideError(text, f"unexpected `{shown}`; expected {exp}", col, col + len(shown), help=FORMS)
    return OverrideError(text, str(e).splitlines()[0], 1, help=FORMS)


def _respan(e, fn):
    """A copy of an expression tree with every span mapped through ``fn``."""
    if isinstance(e, tuple):
        return tuple(_respan(x, fn) for x in e)
    if not is_dataclass(e):
        return e
    changes = {}
    for f in fields(e):
        v = getattr(e, f.name)
        if f.name == "span":
            changes["span"] = fn(v) if v is not None else None
        elif is_dataclass(v) or isinstance(v, tuple):
            changes[f.name] = _respan(v, fn)
    return replace(e, **changes)


_PREFIX = "model V {\n  v = "
VALUE_HELP = ("values are written as in a spec: `32`, `1e-3`, `gd`, `omega(window=4)`, `(1, 2)`, "
              "`\"m3.nl\"`")


def parse_value(text: str, file: str = "<value>", column: int = 1) -> A.Expr:
    """A spec expression; its spans are in ``file``, line 1, from ``column``.

    Raises :class:`OverrideError` (text = ``text``) when it is not an expression.
    """
    from nldsl.syntax.parser import SyntaxFailure, parse

    shift = column - (len("  v = ") + 1)
    try:
        tree = parse(_PREFIX + text + "\n}\n", file)
    except SyntaxFailure as e:
        d = e.diagnostic
        if d.line != 2:
            raise OverrideError(text, "this is not a value", 1, len(text) + 1,
                                help="write a number, a name, a string in double quotes, or a call") from None
        msg = d.message.replace("end of line", "the end of the value")
        msg = re.sub(r"`\}`(, | or )?", "", msg).replace(", or ", " or ").rstrip(", ")
        msg = re.sub(r", ([^,]*)$", r" or \1", msg) if " or " not in msg else msg
        raise OverrideError(text, msg, max(1, d.column - 6), (d.end_column or d.column + 1) - 6,
                            help=VALUE_HELP) from None
    value = tree.items[0].stmts[0].value

    def move(s: A.Span) -> A.Span:
        return A.Span(file, 1, s.column + shift, 1, s.end_column + shift)

    return _respan(value, move)


def _decimal(e: A.Expr) -> tuple[Decimal, bool] | None:
    """(value, is_integer) of a number literal, or None."""
    neg = False
    if isinstance(e, A.Neg):
        neg, e = True, e.operand
    if not isinstance(e, A.Number):
        return None
    try:
        d = Decimal(e.text)
    except InvalidOperation:
        return None
    return (-d if neg else d), re.fullmatch(r"\d+", e.text) is not None


def _number_text(d: Decimal, integer: bool) -> str:
    if integer:
        return str(int(d))
    s = format(d.normalize(), "f")
    if "." not in s:
        s += ".0"
    return s


def expand_range(call: A.Call, raw: str, column: int) -> list[tuple[str, bool]]:
    """``range(start, stop[, step])`` -> the value texts (stop excluded), as Hydra does."""
    end = call.span.end_column if call.span is not None else column + len(print_expr(call))

    def bad(msg, help=None):
        return OverrideError(raw, msg, column, end, help=help)

    kw = {k.name: k.value for k in call.kwargs}
    unknown = [k for k in kw if k not in ("start", "stop", "step")]
    if unknown:
        raise bad(f"`range` has no argument `{unknown[0]}`", help="write `range(start, stop, step)`")
    args = list(call.args) + [kw[k] for k in ("start", "stop", "step") if k in kw]
    if len(args) not in (2, 3):
        raise bad(f"`range` takes 2 or 3 numbers, got {len(args)}",
                  help="write `range(start, stop)` or `range(start, stop, step)`; stop is excluded")
    nums = [_decimal(a) for a in args]
    if any(n is None for n in nums):
        raise bad("`range` takes plain numbers", help="for example `range(8, 64, 8)` or `range(0.1, 0.5, 0.1)`")
    start, stop = nums[0][0], nums[1][0]
    step = nums[2][0] if len(nums) == 3 else Decimal(1)
    integer = all(n[1] for n in nums)
    if step == 0:
        raise bad("the step of `range` is 0")
    # exact: the i-th value is start + i*step; stop excluded
    values = []
    i = 0
    while True:
        v = start + i * step
        if (step > 0 and v >= stop) or (step < 0 and v <= stop):
            break
        values.append(v)
        i += 1
        if i > MAX_RANGE:
            raise bad(f"`range` gives more than {MAX_RANGE} values")
    if not values:
        hint = "stop is excluded" + ("; to count down give a negative step" if start > stop and step > 0 else "")
        raise bad(f"`{print_expr(call)}` gives no values", help=hint)
    return [(_number_text(v, integer), integer) for v in values]


def _choices(ov_text: str, file: str, raw: str, column: int) -> list[Choice]:
    """The values one comma-separated item stands for (several for range/choice)."""
    try:
        e = parse_value(raw, file, column)
    except OverrideError as err:  # columns of the value -> columns of the override
        raise OverrideError(ov_text, err.message, err.column + column - 1, err.end_column + column - 1,
                            err.help) from None
    end = column + len(raw)
    if isinstance(e, A.Call) and e.func == "range":
        out = []
        for text, _ in expand_range(e, ov_text, column):
            v = parse_value(text, file, column)
            v = _respan(v, lambda s: A.Span(file, 1, column, 1, end))
            out.append(Choice(text, v, column, end))
        return out
    if isinstance(e, A.Call) and e.func == "choice":
        if e.kwargs or not e.args:
            raise OverrideError(ov_text, "`choice` takes the values to sweep", column, end,
                                help="write `choice(a, b, c)` (the same as `a,b,c`)")
        out = []
        for a in e.args:
            c0, c1 = a.span.column, a.span.end_column
            out.append(Choice(ov_text[c0 - 1:c1 - 1], a, c0, c1))
        return out
    return [Choice(raw, e, column, end)]


def parse_override(text: str, index: int = 1) -> Override:
    """One command-line override; raises :class:`OverrideError` pointing into ``text``."""
    from lark.exceptions import UnexpectedInput

    if "\n" in text or "\r" in text:
        raise OverrideError(text.replace("\n", " ").replace("\r", " "), "an override is one line",
                            text.find("\n") + 1 if "\n" in text else text.find("\r") + 1)
    if not text.strip():
        raise OverrideError(text, "empty override", 1, help=FORMS)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(text, e) from None
    node = tree.children[0]
    op = node.data
    path_node = node.children[0]
    segs = tuple(str(t) for t in path_node.children)
    cols = tuple((t.start_pos + 1, t.end_pos + 1) for t in path_node.children)
    has_eq = any(getattr(c, "type", None) == "EQUAL" for c in node.children)
    values_node = next((c for c in node.children[1:] if getattr(c, "data", None) == "values"), None)
    file = override_file(index)
    if op == "remove":
        if has_eq:
            raise OverrideError(text, "a removal takes no value", cols[-1][1], len(text) + 1,
                                help=f"write `~{'.'.join(segs)}`")
        return Override(index, text, "remove", segs, cols)
    if values_node is None:
        key = ".".join(segs)
        raise OverrideError(text, "no value after `=`", len(text), len(text) + 1,
                            help=f"write `{'+' if op == 'add' else ''}{key}=VALUE`; to remove it write `~{key}`")
    choices: list[Choice] = []
    for v in values_node.children:
        s, e = v.meta.start_pos, v.meta.end_pos
        choices += _choices(text, file, text[s:e], s + 1)
    return Override(index, text, op, segs, cols, tuple(choices))


# ---- paths: which segment fails ------------------------------------------------------------


def _owner(f: A.File, target: str | None):
    owners = [it for it in f.items if isinstance(it, (A.Model, A.Optimizer))]
    if target is not None:
        owners = [o for o in owners if o.name == target]
    return owners[0] if len(owners) == 1 else None


def _component(owner, name: str):
    for s in owner.stmts:
        if isinstance(s, (A.Param, A.Level, A.Memory, A.Cms)) and s.name == name:
            return s
    return None


def _prop(s, name: str) -> A.Prop | None:
    for p in (s.body.props if s.body else ()):
        if p.name == name:
            return p
    return None


def _call_args(e: A.Expr | None) -> list[str]:
    if isinstance(e, A.Call):
        return sorted(set(CALL_ARGS.get(e.func, ())) | {k.name for k in e.kwargs})
    if isinstance(e, A.Name):
        return list(CALL_ARGS.get(e.id, ()))
    return []


def component_parts(s, owner_kind: str) -> list[str]:
    """The parts a path may name after a memory or CMS chain."""
    kind = "optimizer" if owner_kind == "optimizer" else ("cms" if isinstance(s, A.Cms) else "memory")
    parts = list(ablate._memory_props(kind))
    parts += ["variant"] if isinstance(s, A.Cms) else ["structure", "level"]
    return parts


def unknown_segment(f: A.File, ov: Override, target: str | None = None) -> OverrideError | None:
    """An error under the first segment of the path that names nothing, or None."""
    owner = _owner(f, target)
    if owner is None:
        return None
    kind = "model" if isinstance(owner, A.Model) else "optimizer"
    parts = ov.path

    def err(i: int, msg: str, choices, extra_help: str | None = None):
        c0, c1 = ov.segments[i]
        help = suggest(parts[i], choices, "parts") if choices else extra_help
        if choices and extra_help and not did_you_mean(parts[i], choices):
            help = extra_help
        return ov.error(msg, c0, c1, help=help)

    head = parts[0]
    names = ablate._Target(owner).top_names()
    s = _component(owner, head)
    if s is None and head not in names:
        if ov.op == "add" and len(parts) == 1:
            return None  # a new parameter
        near = did_you_mean(head, names)
        add = None if near else (f"to add a new parameter write `+{head}={ov.choices[0].text}`"
                                 if ov.op == "set" and len(parts) == 1 and ov.choices else None)
        msg = f"`{head}` matches nothing in `{owner.name}`"
        return err(0, msg, names, add or suggest(head, names, "names"))
    if len(parts) == 1:
        return None
    if s is None or isinstance(s, A.Param):  # block, optimizer, update, parameters
        c0 = ov.segments[1][0]
        return ov.error(f"`{head}` has no parts", c0, ov.segments[-1][1], help=f"write `{head}=VALUE`")
    if isinstance(s, A.Level):
        if parts[1] not in ablate.LEVEL_ATTRS:
            return err(1, f"level `{head}` has no part `{parts[1]}`", ablate.LEVEL_ATTRS)
        if len(parts) > 2:
            return ov.error(f"`{head}.{parts[1]}` has no parts", ov.segments[2][0], ov.segments[-1][1],
                            help=f"write `{head}.{parts[1]}=VALUE`")
        return None
    allowed = component_parts(s, kind)
    what = "CMS chain" if isinstance(s, A.Cms) else "memory"
    if parts[1] not in allowed:
        return err(1, f"{what} `{head}` has no property `{parts[1]}`", allowed)
    if len(parts) == 2:
        return None
    prop = parts[1]
    if prop == "inputs":
        keys = ("k", "v", "q", "eta", "alpha")
        if parts[2] not in keys:
            return err(2, f"`{head}.inputs` has no key `{parts[2]}`", keys)
    elif prop in ("level", "variant", "levels"):
        return ov.error(f"`{head}.{prop}` has no parts", ov.segments[2][0], ov.segments[-1][1],
                        help=f"write `{head}.{prop}=VALUE`")
    else:
        if prop == "structure" and isinstance(s, A.Memory):
            current = s.structure
        else:
            p = _prop(s, prop)
            current = p.values[0] if p is not None and len(p.values) == 1 and not p.kwargs else None
            if p is not None and p.kwargs:
                keys = [k.name for k in p.kwargs]
                if parts[2] not in keys and ov.op != "add":
                    return err(2, f"`{head}.{prop}` has no key `{parts[2]}`", keys)
                current = None
        args = _call_args(current)
        if current is not None and not args:
            shown = print_expr(current)
            return ov.error(f"`{head}.{prop}` has no part `{parts[2]}`: its value `{shown}` takes no arguments",
                            ov.segments[2][0], ov.segments[2][1], help=f"write `{head}.{prop}=VALUE`")
        if args and parts[2] not in args:
            return err(2, f"`{head}.{prop}` has no argument `{parts[2]}`", args)
    if len(parts) > 3:
        return ov.error(f"the path is too long after `{'.'.join(parts[:3])}`", ov.segments[3][0],
                        ov.segments[-1][1], help="paths have at most three parts: `memory.property.key`")
    return None


# ---- applying edits ------------------------------------------------------------------------


_EXPR_SPANS = {A.Param: (("value", "value"),), A.Level: (("period", "period"),),
               A.Memory: (("structure", "structure"),), A.Transfer: (("kind", "kind"),),
               A.Block: (("expr", "expr"),), A.UseOptimizer: (("expr", "expr"),), A.Update: (("expr", "expr"),)}


def _sync_spans(s):
    """A statement whose value an edit replaced points its diagnostics at the new value."""
    changes = {}
    for attr, key in _EXPR_SPANS.get(type(s), ()):
        e = getattr(s, attr)
        if getattr(e, "span", None) is not None and s.spans.get(key) != e.span:
            changes[key] = e.span
    return replace(s, spans={**s.spans, **changes}) if changes else s


def apply_edits(f: A.File, edits, target: str | None = None) -> A.File:
    """``nldsl.ablate.apply``, one edit at a time (each sees the tree the previous one left)."""
    for edit in edits:
        f = ablate.apply(f, [edit], target=target)
    items = []
    for it in f.items:
        if isinstance(it, (A.Model, A.Optimizer)):
            it = replace(it, stmts=tuple(_sync_spans(s) for s in it.stmts))
        items.append(it)
    return replace(f, items=tuple(items))


def edit_error(ov: Override, e: ablate.EditError, choice: Choice | None = None) -> OverrideError:
    """An ``EditError`` of this override, in the override's words, caret on the right segment."""
    c0, c1 = ov.path_columns
    msg, help = e.message, e.help
    if "is not set" in msg and "nothing to remove" not in msg and ov.op == "set":
        value = choice.text if choice is not None else "VALUE"
        help = f"to add it use `+{ov.key}={value}`"
        c0, c1 = ov.segments[-1]
    elif "nothing to remove" in msg:
        c0, c1 = ov.segments[-1]
        help = help or "an override that removes nothing is an error; drop it"
    elif "already set" in msg:
        help = f"to change it write `{ov.key}={choice.text if choice else 'VALUE'}` (without `+`)"
    return OverrideError(ov.text, msg, c0, c1, help)


# ---- the plan ------------------------------------------------------------------------------


@dataclass
class Variant:
    index: int
    ablation: str | None  # a named ablation of the spec, or None
    items: tuple[tuple[Override, Choice | None], ...] = ()
    dirname: str = ""
    named_axis: bool = False  # the plan has a named axis: no ablation shows as `@base`
    tree: A.File | None = None
    analysis: object = None
    errors: list = field(default_factory=list)  # OverrideError | Diagnostic | str
    gaps: list = field(default_factory=list)  # NL401 diagnostics: it checks, but the compiler cannot build it yet

    @property
    def overrides(self) -> list[str]:
        return [ov.item(c) for ov, c in self.items]

    @property
    def tag(self) -> str | None:
        """``@name`` of the variant's named ablation, ``@base`` for the base in a named axis."""
        if self.ablation:
            return f"@{self.ablation}"
        return "@base" if self.named_axis or not self.items else None

    @property
    def label(self) -> str:
        return " ".join(([self.tag] if self.tag else []) + self.overrides)

    @property
    def ok(self) -> bool:
        return not self.errors

    def edits(self):
        return [ov.edit(c) for ov, c in self.items]


def plan(ablations: list[str | None], overrides: list[Override]) -> list[Variant]:
    """The cartesian product: named ablations first, then each override, in order."""
    axes = [ablations or [None]] + [ov.values for ov in overrides]
    out = []
    for i, combo in enumerate(itertools.product(*axes)):
        items = tuple(zip(overrides, combo[1:]))
        out.append(Variant(i, combo[0], items, named_axis=bool(ablations)))
    names = dirnames(out, overrides)
    for v, n in zip(out, names):
        v.dirname = n
    return out


def _short_keys(overrides: list[Override]) -> dict[str, str]:
    """Each key shortened to its shortest suffix that no other key of the plan ends with."""
    keys = [ov.key for ov in overrides]
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if not any(o != k and (o == cand or o.endswith("." + cand)) for o in keys):
                break
        out[k] = cand
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,@+~-]+")
_UNSAFE_VALUE = re.compile(r"[^A-Za-z0-9.=+-]+")  # no `,` inside a value: it separates items


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "_"


def _safe_value(text: str) -> str:
    return _UNSAFE_VALUE.sub("_", text).strip("_") or "_"


def dirnames(variants: list[Variant], overrides: list[Override]) -> list[str]:
    """``000_@no_dgd``, ``001_every=8,conv=2``: index, then the short keys and values."""
    short = _short_keys(overrides)
    width = max(3, len(str(max(len(variants) - 1, 0))))
    out = []
    for v in variants:
        parts = [v.tag] if v.tag else []
        for ov, c in v.items:
            k = short[ov.key]
            if ov.op == "remove":
                parts.append(f"~{k}")
            else:
                parts.append(f"{'+' if ov.op == 'add' else ''}{k}={_safe_value(c.text)}")
        name = _safe(",".join(parts))
        if len(name) > NAME_LIMIT:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            name = name[:NAME_LIMIT - 9].rstrip("_,.") + "-" + digest
        out.append(f"{v.index:0{width}d}_{name}")
    return out


# ---- flattened views (Fiddle's as_str_flattened) and their diff ----------------------------


def _value_lines(prefix: str, e: A.Expr) -> list[tuple[str, str]]:
    """``x = mlp`` and ``x.depth = 2`` for a call with keywords only; one line otherwise."""
    if isinstance(e, A.Call) and not e.args and e.kwargs:
        out = [(prefix, e.func)]
        for k in e.kwargs:
            out.append((f"{prefix}.{k.name}", print_expr(k.value)))
        return out
    return [(prefix, print_expr(e))]


def _prop_lines(prefix: str, p: A.Prop) -> list[tuple[str, str]]:
    if p.kwargs and not p.values:
        return [(f"{prefix}.{p.name}.{k.name}", print_expr(k.value)) for k in p.kwargs]
    if len(p.values) == 1 and not p.kwargs:
        return _value_lines(f"{prefix}.{p.name}", p.values[0])
    items = [print_expr(v) for v in p.values] + [f"{k.name}={print_expr(k.value)}" for k in p.kwargs]
    return [(f"{prefix}.{p.name}", "(" + ", ".join(items) + ")")]


def flatten(f: A.File) -> list[tuple[str, str]]:
    """``(path, value)`` for every setting of the file's models and optimizers, in order.

    Paths are the override paths prefixed by the owner's name: ``Hope.titans.rule``,
    ``Hope.fast.every``, ``Hope.titans.inputs.k``; transfers are ``Hope.transfer[a->b]``.
    """
    out: list[tuple[str, str]] = []
    for it in f.items:
        if not isinstance(it, (A.Model, A.Optimizer)):
            continue
        o = it.name
        for s in it.stmts:
            if isinstance(s, A.Param):
                out.append((f"{o}.{s.name}", print_expr(s.value)))
            elif isinstance(s, A.Level):
                out.append((f"{o}.{s.name}.clock", s.clock))
                out.append((f"{o}.{s.name}.every", print_expr(s.period)))
                if s.read:
                    out.append((f"{o}.{s.name}.read", s.read))
                if s.scope:
                    out.append((f"{o}.{s.name}.scope", s.scope))
            elif isinstance(s, A.Memory):
                out.append((f"{o}.{s.name}.level", s.level))
                out += _value_lines(f"{o}.{s.name}.structure", s.structure)
                for p in (s.body.props if s.body else ()):
                    out += _prop_lines(f"{o}.{s.name}", p)
            elif isinstance(s, A.Cms):
                out.append((f"{o}.{s.name}.variant", s.variant))
                for p in (s.body.props if s.body else ()):
                    out += _prop_lines(f"{o}.{s.name}", p)
            elif isinstance(s, A.Transfer):
                out.append((f"{o}.transfer[{s.source}->{s.target}]", print_expr(s.kind)))
            elif isinstance(s, A.Block):
                out.append((f"{o}.block", print_expr(s.expr)))
            elif isinstance(s, A.UseOptimizer):
                out.append((f"{o}.optimizer", print_expr(s.expr)))
            elif isinstance(s, A.Update):
                out.append((f"{o}.update", print_expr(s.expr)))
    return out


def as_str_flattened(f: A.File) -> str:
    return "".join(f"{k} = {v}\n" for k, v in flatten(f))


def diff_flattened(base: list[tuple[str, str]], new: list[tuple[str, str]]) -> list[str]:
    """``- path = old`` / ``+ path = new`` lines, in the base's order, then added paths."""
    b, n = dict(base), dict(new)
    out = []
    for k, v in base:
        if k not in n:
            out.append(f"- {k} = {v}")
        elif n[k] != v:
            out.append(f"- {k} = {v}")
            out.append(f"+ {k} = {n[k]}")
    for k, v in new:
        if k not in b:
            out.append(f"+ {k} = {v}")
    return out
