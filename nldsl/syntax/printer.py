"""The canonical printer behind ``nldsl fmt``: syntax tree -> spec text.

Two spaces per level, one statement per line, single spaces around operators, comments and
single blank lines kept where they were. Printing is idempotent, and parsing the output gives
the same IR (both are tested).
"""
from __future__ import annotations

from nldsl.syntax import ast as A

INDENT = "  "

# Binding strength of each expression form; a child weaker than its slot gets parentheses.
_CHAIN, _SUM, _PRODUCT, _UNARY, _POWER, _POSTFIX, _ATOM = range(1, 8)


def _prec(e: A.Expr) -> int:
    if isinstance(e, A.Chain):
        return _CHAIN
    if isinstance(e, A.BinOp):
        return {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT, "**": _POWER}[e.op]
    if isinstance(e, A.Neg):
        return _UNARY
    if isinstance(e, A.Index):
        return _POSTFIX
    return _ATOM


def quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def expr(e: A.Expr, min_prec: int = 0) -> str:
    text = _expr(e)
    return f"({text})" if _prec(e) < min_prec else text


def _expr(e: A.Expr) -> str:
    if isinstance(e, A.Number):
        return e.text
    if isinstance(e, A.String):
        return quote(e.value)
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Bool):
        return "true" if e.value else "false"
    if isinstance(e, A.KwArg):
        return f"{e.name}={expr(e.value)}"
    if isinstance(e, A.Call):
        args = [expr(a) for a in e.args] + [f"{k.name}={expr(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, A.BinOp):
        if e.op == "**":
            return f"{expr(e.left, _POSTFIX)} ** {expr(e.right, _UNARY)}"
        p = _prec(e)
        return f"{expr(e.left, p)} {e.op} {expr(e.right, p + 1)}"
    if isinstance(e, A.Neg):
        return f"-{expr(e.operand, _UNARY)}"
    if isinstance(e, A.Index):
        return f"{expr(e.target, _POSTFIX)}[{expr(e.index)}]"
    if isinstance(e, A.Tuple):
        items = [expr(x) for x in e.items]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(e, A.Chain):
        return " -> ".join(expr(x, _SUM) for x in e.items)
    raise TypeError(f"cannot print {e!r}")


def prop(p: A.Prop) -> str:
    parts = [expr(v) for v in p.values] + [f"{k.name}={expr(k.value)}" for k in p.kwargs]
    return f"{p.name} {', '.join(parts)}"


def _level(s: A.Level) -> str:
    out = f"level {s.name} : {s.clock} every {expr(s.period)}"
    if s.read:
        out += f" read {s.read}"
    if s.scope:
        out += f" {s.scope}"
    return out


def _head(s) -> str:
    """The first line of a statement (without its body)."""
    if isinstance(s, A.Include):
        return f"include {quote(s.path)}"
    if isinstance(s, A.Param):
        return f"{s.name} = {expr(s.value)}"
    if isinstance(s, A.Level):
        return _level(s)
    if isinstance(s, A.Memory):
        return f"memory {s.name} in {s.level} : {expr(s.structure)}"
    if isinstance(s, A.Cms):
        return f"cms {s.name} : {s.variant}"
    if isinstance(s, A.Transfer):
        return f"transfer {s.source} -> {s.target} : {expr(s.kind)}"
    if isinstance(s, A.Block):
        return f"block = {expr(s.expr)}"
    if isinstance(s, A.UseOptimizer):
        return f"optimizer = {expr(s.expr)}"
    if isinstance(s, A.Update):
        return f"update = {expr(s.expr)}"
    if isinstance(s, A.SetEdit):
        return f"{s.path} = {expr(s.value)}"
    if isinstance(s, A.AddEdit):
        return f"+{s.path} = {expr(s.value)}"
    if isinstance(s, A.RemoveEdit):
        return f"~{s.path}"
    if isinstance(s, A.Prop):
        return prop(s)
    if isinstance(s, A.Model):
        return f"model {s.name}"
    if isinstance(s, A.Optimizer):
        return f"optimizer {s.name}"
    if isinstance(s, A.Ablation):
        return f"ablation {s.name}"
    raise TypeError(f"cannot print {s!r}")


ONE_LINE = 100  # short ablations without comments print on one line


def _line(out: list, code: str, trailing: str | None) -> None:
    """A line of code; a trailing comment is kept apart so runs of them can be aligned."""
    out.append((code, trailing) if trailing else code)


def _block(out: list, head: str, children, closing, depth: int, trailing: str | None,
           inline: bool = False):
    pad = INDENT * depth
    if not children and not closing:
        _line(out, f"{pad}{head} {{}}", trailing)
        return
    if inline and not closing and all(not c.trivia.comments and not c.trivia.trailing for c in children):
        text = f"{pad}{head} {{ " + "; ".join(_head(c) for c in children) + " }"
        if len(text) <= ONE_LINE and len(children) <= 3:
            _line(out, text, trailing)
            return
    out.append(f"{pad}{head} {{")
    for i, ch in enumerate(children):
        _stmt(out, ch, depth + 1, first=(i == 0))
    for c in closing:
        out.append(f"{INDENT * (depth + 1)}{c}" if c else "")
    _line(out, f"{pad}}}", trailing)


def _stmt(out: list[str], s, depth: int, first: bool = False, force_blank: bool = False):
    pad = INDENT * depth
    trivia: A.Trivia = s.trivia
    if not first and (trivia.blank_before or force_blank):
        out.append("")
    for c in trivia.comments:  # "" stands for a blank line between comments
        out.append(f"{pad}{c}" if c else "")
    if isinstance(s, (A.Model, A.Optimizer)):
        _block(out, _head(s), s.stmts, s.closing, depth, trivia.trailing)
    elif isinstance(s, A.Ablation):
        _block(out, _head(s), s.edits, s.closing, depth, trivia.trailing, inline=True)
    elif isinstance(s, (A.Memory, A.Cms)) and s.body is not None:
        _block(out, _head(s), s.body.props, s.body.closing, depth, trivia.trailing)
    else:
        _line(out, f"{pad}{_head(s)}", trivia.trailing)


def _align(out: list) -> list[str]:
    """Aligns the trailing comments of consecutive lines at the same indentation (as gofmt)."""
    lines: list[str] = []
    i = 0
    while i < len(out):
        if not isinstance(out[i], tuple):
            lines.append(out[i])
            i += 1
            continue
        j = i
        indent = len(out[i][0]) - len(out[i][0].lstrip())
        while (j < len(out) and isinstance(out[j], tuple)
               and len(out[j][0]) - len(out[j][0].lstrip()) == indent):
            j += 1
        width = max(len(code) for code, _ in out[i:j])
        lines.extend(f"{code.ljust(width)}  {comment}" for code, comment in out[i:j])
        i = j
    return lines


def format_file(f: A.File) -> str:
    out: list = []
    prev = None
    for i, item in enumerate(f.items):
        # models and optimizers always stand apart; includes and ablations keep the user's spacing
        force = prev is not None and (isinstance(item, (A.Model, A.Optimizer))
                                      or isinstance(prev, (A.Model, A.Optimizer)))
        _stmt(out, item, 0, first=(i == 0), force_blank=force)
        prev = item
    if f.closing:
        if out:
            out.append("")
        out.extend(f.closing)
    return "\n".join(_align(out)) + "\n" if out else ""
