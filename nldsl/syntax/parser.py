"""Spec text -> syntax tree (``nldsl.syntax.ast``), or a syntax diagnostic.

The grammar lives in ``grammar/nldsl.lark`` (shipped inside the wheel as
``nldsl/grammar``). It is LALR(1) and built with ``strict=True``, so a conflict in it fails
when the parser is built, not on some user's spec.
"""
from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from nldsl import resources
from nldsl.diagnostics import Diagnostic
from nldsl.syntax import ast as A

MAX_NESTING = 64  # brackets deeper than this are refused before parsing (no recursion blowups)


class SyntaxFailure(Exception):
    def __init__(self, diagnostic: Diagnostic):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


@lru_cache(maxsize=1)
def grammar_text() -> str:
    return resources.read_text("grammar", "nldsl.lark")


@lru_cache(maxsize=1)
def get_parser() -> Lark:
    # cache=True keeps the built tables in the temp folder (keyed by the grammar's hash), so
    # `nldsl check` does not pay for building and strict-checking the grammar on every run.
    return Lark(grammar_text(), parser="lalr", strict=True, propagate_positions=True,
                maybe_placeholders=True, start="start", cache=True)


# ---- tree -> AST --------------------------------------------------------------------------


def _span_of(file: str, node) -> A.Span | None:
    if isinstance(node, Token):
        return A.Span(file, node.line, node.column, node.end_line, node.end_column)
    meta = getattr(node, "meta", node)
    if getattr(meta, "empty", True):
        return None
    return A.Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _positions(node) -> tuple[int, int]:
    meta = getattr(node, "meta", node)
    return meta.start_pos, meta.end_pos


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _number(text: str) -> int | float:
    if re.fullmatch(r"\d+", text):
        if len(text) > 4000:  # beyond Python's int-from-text limit, and far out of range anyway
            return float("inf")
        return int(text)
    return float(text)


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds AST nodes; each statement remembers its source positions for comment placement."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file
        self.extent: dict[int, tuple[int, int]] = {}  # id(node) -> (start_pos, end_pos)

    def _sp(self, meta):
        return _span_of(self.file, meta)

    def _tok(self, tok: Token) -> A.Span:
        return _span_of(self.file, tok)

    def _stmt(self, node, meta):
        self.extent[id(node)] = (meta.start_pos, meta.end_pos)
        return node

    # expressions
    def number(self, meta, c):
        return A.Number(_number(str(c[0])), str(c[0]), span=self._sp(meta))

    def string(self, meta, c):
        return A.String(_unquote(str(c[0])), span=self._sp(meta))

    def name(self, meta, c):
        return A.Name(str(c[0]), span=self._sp(meta))

    def true(self, meta, c):
        return A.Bool(True, span=self._sp(meta))

    def false(self, meta, c):
        return A.Bool(False, span=self._sp(meta))

    def kwarg(self, meta, c):
        return A.KwArg(str(c[0]), c[1], span=self._sp(meta))

    def call(self, meta, c):
        args = [x for x in c[1:] if x is not None]
        pos = tuple(a for a in args if not isinstance(a, A.KwArg))
        kws = tuple(a for a in args if isinstance(a, A.KwArg))
        return A.Call(str(c[0]), pos, kws, span=self._sp(meta))

    def _bin(op):  # noqa: N805 - a small factory used in the class body
        def build(self, meta, c):
            return A.BinOp(op, c[0], c[1], span=self._sp(meta))
        return build

    add_op, sub_op, mul_op, div_op, pow_op = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("**")

    def neg(self, meta, c):
        return A.Neg(c[0], span=self._sp(meta))

    def index(self, meta, c):
        return A.Index(c[0], c[1], span=self._sp(meta))

    def tuple(self, meta, c):
        return A.Tuple(tuple(x for x in c if x is not None), span=self._sp(meta))

    def chain(self, meta, c):
        left, right = c
        items = (left.items if isinstance(left, A.Chain) else (left,)) + (right,)
        return A.Chain(items, span=self._sp(meta))

    # statements
    def include(self, meta, c):
        return self._stmt(A.Include(_unquote(str(c[0])), span=self._sp(meta),
                                    spans={"path": self._tok(c[0])}), meta)

    def param(self, meta, c):
        return self._stmt(A.Param(str(c[0]), c[1], span=self._sp(meta),
                                  spans={"name": self._tok(c[0]), "value": c[1].span}), meta)

    def carry(self, meta, c):
        return ("scope", "carry", self._sp(meta))

    def reset(self, meta, c):
        return ("scope", "reset", self._sp(meta))

    def read(self, meta, c):
        return ("read", str(c[0]), self._tok(c[0]))

    def level(self, meta, c):
        name, clock, period, *mods = c
        spans = {"name": self._tok(name), "clock": self._tok(clock), "period": period.span}
        fields: dict = {}
        for key, value, span in mods:
            if key in fields:  # `carry reset` or two `read`s: keep the first, flag the rest
                spans.setdefault("duplicate", span)
                continue
            fields[key] = value
            spans[key] = span
        return self._stmt(A.Level(str(name), str(clock), period, fields.get("scope"),
                                  fields.get("read"), span=self._sp(meta), spans=spans), meta)

    def body(self, meta, c):
        return A.Body(tuple(c), span=self._sp(meta))

    def prop(self, meta, c):
        name, *rest = c
        values = tuple(x for x in rest if not isinstance(x, A.KwArg))
        kwargs = tuple(x for x in rest if isinstance(x, A.KwArg))
        return self._stmt(A.Prop(str(name), values, kwargs, span=self._sp(meta),
                                 spans={"name": self._tok(name)}), meta)

    def memory(self, meta, c):
        name, level, structure, body = c
        return self._stmt(A.Memory(str(name), str(level), structure, body, span=self._sp(meta),
                                   spans={"name": self._tok(name), "level": self._tok(level),
                                          "structure": structure.span}), meta)

    def cms(self, meta, c):
        name, variant, body = c
        return self._stmt(A.Cms(str(name), str(variant), body, span=self._sp(meta),
                                spans={"name": self._tok(name), "variant": self._tok(variant)}), meta)

    def transfer(self, meta, c):
        src, dst, kind = c
        return self._stmt(A.Transfer(str(src), str(dst), kind, span=self._sp(meta),
                                     spans={"source": self._tok(src), "target": self._tok(dst),
                                            "kind": kind.span}), meta)

    def block(self, meta, c):
        return self._stmt(A.Block(c[0], span=self._sp(meta), spans={"expr": c[0].span}), meta)

    def use_optimizer(self, meta, c):
        return self._stmt(A.UseOptimizer(c[0], span=self._sp(meta), spans={"expr": c[0].span}), meta)

    def update(self, meta, c):
        return self._stmt(A.Update(c[0], span=self._sp(meta), spans={"expr": c[0].span}), meta)

    def word(self, meta, c):
        return c[0]

    def path(self, meta, c):
        return A.Path(tuple(str(x) for x in c), span=self._sp(meta))

    def set(self, meta, c):
        return self._stmt(A.SetEdit(c[0], c[1], span=self._sp(meta), spans={"path": c[0].span}), meta)

    def remove(self, meta, c):
        return self._stmt(A.RemoveEdit(c[0], span=self._sp(meta), spans={"path": c[0].span}), meta)

    def add(self, meta, c):
        return self._stmt(A.AddEdit(c[0], c[1], span=self._sp(meta), spans={"path": c[0].span}), meta)

    def model(self, meta, c):
        return self._stmt(A.Model(str(c[0]), tuple(c[1:]), span=self._sp(meta),
                                  spans={"name": self._tok(c[0])}), meta)

    def optimizer(self, meta, c):
        return self._stmt(A.Optimizer(str(c[0]), tuple(c[1:]), span=self._sp(meta),
                                      spans={"name": self._tok(c[0])}), meta)

    def ablation(self, meta, c):
        return self._stmt(A.Ablation(str(c[0]), tuple(c[1:]), span=self._sp(meta),
                                     spans={"name": self._tok(c[0])}), meta)

    def start(self, meta, c):
        return A.File(tuple(c))


# ---- comments and blank lines --------------------------------------------------------------

_COMMENT_OR_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*')


def _comments(text: str) -> list[tuple[int, int, str]]:
    """(position, line, text) of every comment, skipping ``#`` inside strings."""
    out = []
    for m in _COMMENT_OR_STRING.finditer(text):
        if m.group().startswith("#"):
            line = text.count("\n", 0, m.start()) + 1
            out.append((m.start(), line, m.group().rstrip()))
    return out


class _Attacher:
    """Places each comment on the statement it belongs to (above it, or after it on its line)."""

    def __init__(self, text: str, extent: dict[int, tuple[int, int]]):
        self.text = text
        self.lines = text.split("\n")
        self.extent = extent
        self.comments = _comments(text)
        # braces inside comments and strings are not structure: look for them in `code`
        self.code = _COMMENT_OR_STRING.sub(lambda m: " " * len(m.group()), text)

    def line_of(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def attach(self, children: tuple, lo: int, hi: int, open_line: int):
        """Returns (children with trivia, closing comments) for comments in [lo, hi)."""
        spans = [self.extent.get(id(ch), (None, None)) for ch in children]
        inside = [(p, ln, t) for p, ln, t in self.comments
                  if lo <= p < hi and not any(s is not None and s <= p < e for s, e in spans)]
        leading: list[list[tuple[int, str]]] = [[] for _ in children]
        trailing: list[str | None] = [None] * len(children)
        closing: list[tuple[int, str]] = []
        for pos, line, text in inside:
            owner = None
            for i, (s, e) in enumerate(spans):
                if e is not None and e <= pos and self.line_of(e) == line and trailing[i] is None:
                    owner = i
            if owner is not None:
                trailing[owner] = text
                continue
            nxt = next((i for i, (s, _) in enumerate(spans) if s is not None and s > pos), None)
            if nxt is None:
                closing.append((line, text))
            else:
                leading[nxt].append((line, text))
        out = []
        for i, ch in enumerate(children):
            s, _ = spans[i]
            first = min([ln for ln, _ in leading[i]] + ([self.line_of(s)] if s is not None else []),
                        default=None)
            blank = (i > 0 and first is not None and first - 1 > open_line
                     and first - 2 < len(self.lines) and not self.lines[first - 2].strip())
            comments = self.paragraphs(leading[i], self.line_of(s) if s is not None else None)
            out.append(replace(ch, trivia=A.Trivia(comments, trailing[i], blank)))
        return tuple(out), self.paragraphs(closing, None)

    def paragraphs(self, comments: list[tuple[int, str]], before: int | None) -> tuple[str, ...]:
        """The comments' texts, with ``""`` where blank lines separate two of them, or the last
        from the statement on line ``before`` (fmt keeps one blank line for any run of them)."""
        out: list[str] = []
        lines = [ln for ln, _ in comments] + ([before] if before is not None else [])
        for k, (line, text) in enumerate(comments):
            out.append(text)
            nxt = lines[k + 1] if k + 1 < len(lines) else None
            if nxt is not None and any(not self.lines[j - 1].strip() for j in range(line + 1, nxt)):
                out.append("")
        return tuple(out)

    def node(self, ch):
        """Recursively attaches comments inside container statements."""
        if isinstance(ch, (A.Model, A.Optimizer, A.Ablation)):
            s, e = self.extent[id(ch)]
            brace = self.code.index("{", s)
            kids = tuple(self.node(k) for k in (ch.edits if isinstance(ch, A.Ablation) else ch.stmts))
            kids, closing = self.attach(kids, brace + 1, e - 1, self.line_of(brace))
            field = "edits" if isinstance(ch, A.Ablation) else "stmts"
            return replace(ch, **{field: kids, "closing": closing})
        if isinstance(ch, (A.Memory, A.Cms)) and ch.body is not None:
            s, e = self.extent[id(ch)]
            brace = self.code.index("{", self._body_start(ch, s))
            props, closing = self.attach(ch.body.props, brace + 1, e - 1, self.line_of(brace))
            new = replace(ch, body=replace(ch.body, props=props, closing=closing))
            self.extent[id(new)] = (s, e)
            return new
        if id(ch) in self.extent:
            return ch
        return ch

    def _body_start(self, ch, s: int) -> int:
        # The body's "{" is the last "{" of the statement whose matching "}" ends it.
        s, e = self.extent[id(ch)]
        depth = 0
        for i in range(e - 1, s - 1, -1):
            c = self.code[i]
            if c == "}":
                depth += 1
            elif c == "{":
                depth -= 1
                if depth == 0:
                    return i
        return s

    def file(self, f: A.File) -> A.File:
        items = []
        for it in f.items:
            new = self.node(it)
            self.extent[id(new)] = self.extent[id(it)]
            items.append(new)
        items, closing = self.attach(tuple(items), 0, len(self.text) + 1, 0)
        return replace(f, items=items, closing=closing)


# ---- errors ------------------------------------------------------------------------------

_FRIENDLY = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
             "$END": "end of file", "COMMENT": "a comment"}


def _describe(term: str) -> str:
    if term in _FRIENDLY:
        return _FRIENDLY[term]
    try:
        t = get_parser().get_terminal(term)
        pattern = t.pattern
        if pattern.type == "str":
            return f"`{pattern.value}`"
    except KeyError:
        pass
    return term.lower()


def _expected(e: UnexpectedInput) -> list[str]:
    names = getattr(e, "accepts", None) or getattr(e, "expected", None) or set()
    names = {n for n in names if n not in ("SEMICOLON",)}
    return sorted({_describe(n) for n in names})


def _open_brace_line(text: str, upto: int) -> int | None:
    stack = []
    cleaned = _COMMENT_OR_STRING.sub(lambda m: " " * len(m.group()), text[:upto])
    for i, ch in enumerate(cleaned):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            stack.pop()
    return text.count("\n", 0, stack[-1]) + 1 if stack else None


def _hint(text: str, tok_type: str, tok_value: str, expected: list[str], pos: int) -> str | None:
    if tok_type == "$END" or tok_type == "EOF":
        line = _open_brace_line(text, len(text))
        if line:
            return f"the `{{` opened on line {line} is never closed; add a `}}`"
        return "the file ends in the middle of a statement"
    if "`every`" in expected:
        return "a level is written `level NAME : tokens|steps every PERIOD`"
    if tok_value == "=" and "end of line" in expected:
        return "properties inside `{ }` are written `key value`, without `=`"
    if tok_type == "_NL" and "`:`" in expected:
        return "a memory is written `memory NAME in LEVEL : STRUCTURE { ... }`"
    if tok_type == "_NL" and expected and all(x in ("a name", "a number", "a string", "`(`", "`-`",
                                                    "`true`", "`false`") for x in expected):
        return "a value is missing before the end of the line"
    if "end of line" in expected or "`;`" in expected:
        return "put one statement per line, or separate statements with `;`"
    return None


def syntax_diagnostic(text: str, file: str, e: UnexpectedInput) -> Diagnostic:
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        shown = repr(ch)[1:-1] if ch.isprintable() else f"\\u{ord(ch):04x}" if ch else "end of file"
        msg = f"unexpected character `{shown}`"
        help = "names use letters, digits and `_`; strings use double quotes; comments start with `#`"
        span = A.Span(file, line, col, line, col + 1)
        return Diagnostic.at("NL001", msg, span, help=help)
    if isinstance(e, (UnexpectedToken, UnexpectedEOF)):
        tok = getattr(e, "token", None)
        tok_type = getattr(tok, "type", "$END") if tok is not None else "$END"
        tok_value = str(tok) if tok is not None else ""
        expected = _expected(e)
        if tok_type in ("$END",) or tok is None or getattr(tok, "line", None) is None:
            last = text.rstrip("\n")
            line = last.count("\n") + 1
            col = len(last.split("\n")[-1]) + 1
            what = "end of file"
        else:
            line, col = tok.line, tok.column
            what = "end of line" if tok_type == "_NL" else f"`{tok_value}`"
        msg = f"unexpected {what}"
        if expected:
            msg += "; expected " + (", ".join(expected[:-1]) + " or " + expected[-1]
                                    if len(expected) > 1 else expected[0])
        width = 1 if tok_type in ("_NL", "$END") else max(1, len(tok_value))
        span = A.Span(file, line, col, line, col + width)
        pos = getattr(tok, "start_pos", len(text)) or 0
        return Diagnostic.at("NL001", msg, span, help=_hint(text, tok_type, tok_value, expected, pos))
    return Diagnostic.at("NL001", str(e).splitlines()[0], A.Span(file, line, col, line, col + 1))


def _nesting_diagnostic(text: str, file: str) -> Diagnostic | None:
    cleaned = _COMMENT_OR_STRING.sub(lambda m: " " * len(m.group()), text)
    depth = 0
    for i, ch in enumerate(cleaned):
        if ch in "([{":
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, i) + 1
                col = i - (text.rfind("\n", 0, i) + 1) + 1
                return Diagnostic.at(
                    "NL010", f"brackets nested deeper than {MAX_NESTING} levels",
                    A.Span(file, line, col, line, col + 1),
                    help="a spec never needs this much nesting; split the expression up")
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return None


def parse(text: str, file: str = "<spec>") -> A.File:
    """Parses spec text; raises :class:`SyntaxFailure` carrying one diagnostic."""
    deep = _nesting_diagnostic(text, file)
    if deep:
        raise SyntaxFailure(deep)
    try:
        tree = get_parser().parse(text)
    except UnexpectedInput as e:
        raise SyntaxFailure(syntax_diagnostic(text, file, e)) from None
    builder = _ToAst(file)
    try:
        f = builder.transform(tree)
        f = _Attacher(text, builder.extent).file(f)
    except (RecursionError, VisitError) as e:
        inner = e.orig_exc if isinstance(e, VisitError) else e
        if not isinstance(inner, RecursionError):
            raise
        raise SyntaxFailure(Diagnostic.at(
            "NL010", "expression nested too deeply to process", A.Span(file, 1, 1, 1, 2),
            help="split very long chains of operators into named parameters")) from None
    return replace(f, path=file)
