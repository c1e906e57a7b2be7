"""The surface syntax: parser tables, syntax errors, comments, and the canonical printer.

Rows are ``pytest.param(source, expected, id=...)`` (Hydra style). Expected trees are built
without spans: AST equality ignores positions, so a tree parsed from text equals one written
by hand.
"""
from __future__ import annotations

import re

import pytest
from lark import Lark

from nldsl.syntax import ast as A
from nldsl.syntax.parser import MAX_NESTING, SyntaxFailure, get_parser, grammar_text, parse
from nldsl.syntax.printer import format_file
from tests.nltest_support import FILE_SHAPES, SHIPPED_SPECS, all_spec_files, rel, run_cli

N, S, B, C, K = A.Name, A.String, A.Bool, A.Call, A.KwArg


def num(text: str) -> A.Number:
    return A.Number(int(text) if text.isdigit() else float(text), text)


def stmt(body: str):
    """The first statement of ``model M { <body> }``."""
    f = parse("model M {\n" + body + "\n}\n", "t.nl")
    return f.items[0].stmts[0]


def value(src: str) -> A.Expr:
    return stmt(f"x = {src}").value


# ---- the parser is built with strict=True ---------------------------------------------------


def test_parser_builds_strict_lalr():
    p = get_parser()  # building it is the test: strict=True turns any conflict into an error
    assert p.options.parser == "lalr"
    assert p.options.strict is True
    assert p.options.propagate_positions is True
    assert p.options.maybe_placeholders is True


def test_grammar_builds_fresh_under_strict():
    # a fresh build (no cache) from the shipped grammar text, so the check is not memoised
    Lark(grammar_text(), parser="lalr", strict=True, start="start")


def test_grammar_ships_with_the_package():
    from nldsl import resources

    assert (resources.directory("grammar") / "nldsl.lark").is_file()


# ---- expressions --------------------------------------------------------------------------

EXPRESSIONS = [
    pytest.param("512", num("512"), id="number:int"),
    pytest.param("1e-3", num("1e-3"), id="number:exp"),
    pytest.param(".5", num(".5"), id="number:leading-dot"),
    pytest.param("2.", num("2."), id="number:trailing-dot"),
    pytest.param("1E+6", num("1E+6"), id="number:exp-upper"),
    pytest.param('"m3.nl"', S("m3.nl"), id="string"),
    pytest.param(r'"a \"b\" \\ c\n"', S('a "b" \\ c\n'), id="string:escapes"),
    pytest.param('"# not a comment"', S("# not a comment"), id="string:hash"),
    pytest.param("true", B(True), id="bool:true"),
    pytest.param("false", B(False), id="bool:false"),
    pytest.param("chunk", N("chunk"), id="name"),
    pytest.param("__import__", N("__import__"), id="name:dunder"),
    pytest.param("(16)", num("16"), id="parens"),
    pytest.param("(0.9, 0.999)", A.Tuple((num("0.9"), num("0.999"))), id="tuple"),
    pytest.param("(1,)", A.Tuple((num("1"),)), id="tuple:one"),
    pytest.param("-1", A.Neg(num("1")), id="neg"),
    pytest.param("--1", A.Neg(A.Neg(num("1"))), id="neg:double"),
    pytest.param("1 + 2 * 3", A.BinOp("+", num("1"), A.BinOp("*", num("2"), num("3"))),
                 id="precedence:mul-over-add"),
    pytest.param("(1 + 2) * 3", A.BinOp("*", A.BinOp("+", num("1"), num("2")), num("3")),
                 id="precedence:parens"),
    pytest.param("a - b - c", A.BinOp("-", A.BinOp("-", N("a"), N("b")), N("c")), id="assoc:sub-left"),
    pytest.param("a / b / c", A.BinOp("/", A.BinOp("/", N("a"), N("b")), N("c")), id="assoc:div-left"),
    pytest.param("2 ** 3 ** 2", A.BinOp("**", num("2"), A.BinOp("**", num("3"), num("2"))),
                 id="assoc:pow-right"),
    pytest.param("-2 ** 2", A.Neg(A.BinOp("**", num("2"), num("2"))), id="precedence:pow-over-neg"),
    pytest.param("2 ** -1", A.BinOp("**", num("2"), A.Neg(num("1"))), id="pow:neg-exponent"),
    pytest.param("betas[0]", A.Index(N("betas"), num("0")), id="index"),
    pytest.param("t[0][1]", A.Index(A.Index(N("t"), num("0")), num("1")), id="index:nested"),
    pytest.param("f()", C("f"), id="call:empty"),
    pytest.param("constant(0.9)", C("constant", (num("0.9"),)), id="call:positional"),
    pytest.param("mlp(depth=2, residual=true)",
                 C("mlp", (), (K("depth", num("2")), K("residual", B(True)))), id="call:kwargs"),
    pytest.param("f(x, k=1)", C("f", (N("x"),), (K("k", num("1")),)), id="call:mixed"),
    pytest.param("f(x)[0]", A.Index(C("f", (N("x"),)), num("0")), id="call:indexed"),
    pytest.param("a -> b", A.Chain((N("a"), N("b"))), id="chain"),
    pytest.param("a -> b -> c", A.Chain((N("a"), N("b"), N("c"))), id="chain:flat"),
    pytest.param("a -> (b -> c)", A.Chain((N("a"), A.Chain((N("b"), N("c"))))), id="chain:grouped"),
    pytest.param("residual(norm -> m)", C("residual", (A.Chain((N("norm"), N("m"))),)), id="chain:in-call"),
    pytest.param("a + b -> c", A.Chain((A.BinOp("+", N("a"), N("b")), N("c"))), id="chain:loosest"),
]


@pytest.mark.parametrize("src, expected", EXPRESSIONS)
def test_expression(src, expected):
    assert value(src) == expected


@pytest.mark.parametrize("src, expected", EXPRESSIONS)
def test_expression_prints_back_to_the_same_tree(src, expected):
    from nldsl.syntax.printer import expr

    assert value(expr(expected)) == expected


def test_number_keeps_its_text():
    n = value("1e-3")
    assert n.value == 1e-3 and n.text == "1e-3"
    assert isinstance(value("16").value, int) and isinstance(value("16.0").value, float)


# ---- statements -------------------------------------------------------------------------

STATEMENTS = [
    pytest.param("dim = 512", A.Param("dim", num("512")), id="param"),
    pytest.param("level fast : tokens every 16", A.Level("fast", "tokens", num("16")), id="level"),
    pytest.param("level outer : steps every 1", A.Level("outer", "steps", num("1")), id="level:steps"),
    pytest.param("level fast : tokens every chunk * 2",
                 A.Level("fast", "tokens", A.BinOp("*", N("chunk"), num("2"))), id="level:expr-period"),
    pytest.param("level slow : tokens every 4096 carry",
                 A.Level("slow", "tokens", num("4096"), scope="carry"), id="level:carry"),
    pytest.param("level fast : tokens every 1 reset", A.Level("fast", "tokens", num("1"), scope="reset"),
                 id="level:reset"),
    pytest.param("level fast : tokens every 16 read running",
                 A.Level("fast", "tokens", num("16"), read="running"), id="level:read"),
    pytest.param("level fast : tokens every 16 carry read anchor",
                 A.Level("fast", "tokens", num("16"), scope="carry", read="anchor"), id="level:modifiers-any-order"),
    pytest.param("memory m in fast : linear", A.Memory("m", "fast", N("linear")), id="memory:no-body"),
    pytest.param("memory m in fast : linear {}", A.Memory("m", "fast", N("linear"), A.Body()),
                 id="memory:empty-body"),
    pytest.param("memory m in fast : mlp(depth=2) { objective l2; rule dgd }",
                 A.Memory("m", "fast", C("mlp", (), (K("depth", num("2")),)),
                          A.Body((A.Prop("objective", (N("l2"),)), A.Prop("rule", (N("dgd"),))))),
                 id="memory:body"),
    pytest.param("memory m in fast : linear {\n  inputs k=generated, q=static\n}",
                 A.Memory("m", "fast", N("linear"), A.Body((A.Prop(
                     "inputs", (), (K("k", N("generated")), K("q", N("static")))),))),
                 id="memory:prop-kwargs"),
    pytest.param("memory m in fast : linear { read anchor }",
                 A.Memory("m", "fast", N("linear"), A.Body((A.Prop("read", (N("anchor"),)),))),
                 id="memory:keyword-property"),
    pytest.param("cms chain : sequential { levels cms1, cms2, cms3 }",
                 A.Cms("chain", "sequential", A.Body((A.Prop("levels", (N("cms1"), N("cms2"), N("cms3"))),))),
                 id="cms"),
    pytest.param("cms chain : nested", A.Cms("chain", "nested"), id="cms:no-body"),
    pytest.param("transfer pretrain -> fast : init", A.Transfer("pretrain", "fast", N("init")), id="transfer"),
    pytest.param("transfer gen -> gen : generate(self=true)",
                 A.Transfer("gen", "gen", C("generate", (), (K("self", B(True)),))), id="transfer:self"),
    pytest.param("block = residual(norm -> m) -> swiglu",
                 A.Block(A.Chain((C("residual", (A.Chain((N("norm"), N("m"))),)), N("swiglu")))), id="block"),
    pytest.param("optimizer = AdamW", A.UseOptimizer(N("AdamW")), id="use-optimizer:name"),
    pytest.param('optimizer = "adam.nl"', A.UseOptimizer(S("adam.nl")), id="use-optimizer:file"),
]


@pytest.mark.parametrize("src, expected", STATEMENTS)
def test_model_statement(src, expected):
    assert stmt(src) == expected


TOP_LEVEL = [
    pytest.param('include "adam.nl"', A.File((A.Include("adam.nl"),)), id="include"),
    pytest.param("model M {}", A.File((A.Model("M"),)), id="model:empty"),
    pytest.param("model M { dim = 1; layers = 2 }",
                 A.File((A.Model("M", (A.Param("dim", num("1")), A.Param("layers", num("2")))),)),
                 id="model:semicolons"),
    pytest.param("optimizer O {\n  lr = 0.1\n  level step : steps every 1\n  update = lr * grad\n}",
                 A.File((A.Optimizer("O", (A.Param("lr", num("0.1")), A.Level("step", "steps", num("1")),
                                           A.Update(A.BinOp("*", N("lr"), N("grad")))),),)),
                 id="optimizer"),
    pytest.param("ablation a { m.rule = gd; ~m.momentum; +m.lr = gate }",
                 A.File((A.Ablation("a", (
                     A.SetEdit(A.Path(("m", "rule")), N("gd")),
                     A.RemoveEdit(A.Path(("m", "momentum"))),
                     A.AddEdit(A.Path(("m", "lr")), N("gate")))),)),
                 id="ablation"),
    pytest.param("ablation a { fast.read = running; ~block; m.inputs.k = static }",
                 A.File((A.Ablation("a", (
                     A.SetEdit(A.Path(("fast", "read")), N("running")),
                     A.RemoveEdit(A.Path(("block",))),
                     A.SetEdit(A.Path(("m", "inputs", "k")), N("static")))),)),
                 id="ablation:keyword-paths"),
    pytest.param("", A.File(()), id="file:empty"),
    pytest.param("\n\n;\n", A.File(()), id="file:separators-only"),
    pytest.param("model A {}\r\nmodel B {}\r\n", A.File((A.Model("A"), A.Model("B", trivia=A.Trivia()))),
                 id="file:crlf"),
]


@pytest.mark.parametrize("src, expected", TOP_LEVEL)
def test_top_level(src, expected):
    assert parse(src, "t.nl") == expected


@pytest.mark.parametrize("name", sorted(FILE_SHAPES))
def test_file_shapes_parse(name):
    parse(FILE_SHAPES[name], "t.nl")


# ---- spans and AST equality -----------------------------------------------------------------


def test_ast_equality_ignores_spans_and_layout():
    tight = parse("model M{dim=1;layers=2\nlevel f:tokens every 16 read running}", "a.nl")
    loose = parse("model M {\n  dim = 1\n  layers = 2\n  level f : tokens every (16) read running\n}\n", "b.nl")
    assert tight == loose
    assert tight.items[0].stmts[2].span != loose.items[0].stmts[2].span
    assert tight.path == "a.nl" and loose.path == "b.nl"  # the path takes no part either


def test_ast_inequality_on_meaning():
    assert parse("model M { dim = 1 }") != parse("model M { dim = 2 }")
    assert parse("model M { dim = 1 }") != parse("model N { dim = 1 }")


def test_spans_point_at_the_text():
    text = "model M {\n  level fast : tokens every 16\n  memory m in fast : linear\n}\n"
    f = parse(text, "s.nl")
    level, mem = f.items[0].stmts
    assert (level.span.line, level.span.column) == (2, 3)
    assert level.spans["name"].file == "s.nl"
    assert (level.spans["name"].line, level.spans["name"].column) == (2, 9)
    assert (level.spans["period"].line, level.spans["period"].column) == (2, 29)
    assert (mem.spans["level"].line, mem.spans["level"].column, mem.spans["level"].end_column) == (3, 15, 19)
    assert str(level.span) == "s.nl:2:3"


# ---- syntax errors: NL001 with a message and a position ----------------------------------------

ERRORS = [
    pytest.param("model M {\n  level fast : tokens 16\n}\n",
                 "unexpected `16`; expected `every`", (2, 23), "level NAME : tokens|steps every PERIOD",
                 id="missing-every"),
    pytest.param("model M {\n  dim =\n}\n",
                 "unexpected end of line; expected `(`, `-`, `false`, `true`, a name, a number or a string",
                 (2, 8), "a value is missing", id="missing-value"),
    pytest.param("model M {\n  memory m in f : mlp(depth=2,)\n}\n", "unexpected `)`", (2, 31), None,
                 id="trailing-comma"),
    pytest.param("model M {\n  levle fast : tokens every 1\n}\n", "unexpected `fast`; expected `=`", (2, 9), None,
                 id="unknown-keyword"),
    pytest.param("model M {\n  level fast = tokens every 1\n}\n", "unexpected `=`; expected `:`", (2, 14), None,
                 id="equals-for-colon"),
    pytest.param("model M {\n  memory m in f\n}\n", "unexpected end of line; expected `:`", (2, 16),
                 "memory NAME in LEVEL : STRUCTURE", id="memory-without-structure"),
    pytest.param("model M {\n  dim = 1\n", "unexpected end of file", (2, 10),
                 "the `{` opened on line 1 is never closed", id="missing-brace"),
    pytest.param("model M {\n  dim = 1 @ 2\n}\n", "unexpected character `@`", (2, 11), "comments start with `#`",
                 id="bad-character"),
    pytest.param('include "adam.nl\n', "unexpected character `\"`", (1, 9), None, id="unterminated-string"),
    pytest.param("dim = 3\n", "unexpected `dim`; expected `ablation`, `include`, `model`, `optimizer`", (1, 1),
                 None, id="statement-outside-model"),
    pytest.param("model M {\x00}", "unexpected character `\\u0000`", (1, 10), None, id="nul"),
    pytest.param("\ufeffmodel M {}", "unexpected character `\\ufeff`", (1, 1), None, id="byte-order-mark"),
    pytest.param("model M { dim = 1 } }", "unexpected `}`", (1, 21), None, id="extra-brace"),
    pytest.param("model M {\n  dim = (1, 2\n}\n", "unexpected end of line", (2, 14), None, id="unclosed-paren"),
]


@pytest.mark.parametrize("src, message, position, help", ERRORS)
def test_syntax_error(src, message, position, help):
    with pytest.raises(SyntaxFailure, match=re.escape(message)) as info:
        parse(src, "bad.nl")
    d = info.value.diagnostic
    assert d.code == "NL001" and d.severity == "error" and d.file == "bad.nl"
    assert (d.line, d.column) == position
    assert d.message.startswith(message)
    if help is not None:
        assert help in (d.help or "")


def test_syntax_error_underlines_the_token():
    with pytest.raises(SyntaxFailure) as info:
        parse("model M {\n  level fast : tokens 1600\n}\n", "bad.nl")
    d = info.value.diagnostic
    assert (d.column, d.end_column) == (23, 27)


def test_brackets_nested_too_deeply_is_nl010():
    # the model's own `{` is one level: MAX_NESTING - 1 parentheses fit inside it
    ok = "model M { x = " + "(" * (MAX_NESTING - 1) + "1" + ")" * (MAX_NESTING - 1) + " }"
    parse(ok)
    deep = "model M { x = " + "(" * MAX_NESTING + "1" + ")" * MAX_NESTING + " }"
    with pytest.raises(SyntaxFailure) as info:
        parse(deep, "deep.nl")
    d = info.value.diagnostic
    assert d.code == "NL010" and (d.line, d.column) == (1, 15 + MAX_NESTING - 1)


def test_brackets_in_comments_and_strings_do_not_count_as_nesting():
    parse("model M { x = \"" + "(" * 100 + "\" }  # " + "(" * 100 + "\n")


@pytest.mark.parametrize("src", [
    pytest.param("model M { x = " + "-" * 5000 + "1 }", id="negations"),
    pytest.param("model M { x = " + "1 + " * 5000 + "1 }", id="sum"),
    pytest.param("model M { block = " + "a -> " * 5000 + "a }", id="chain"),
    pytest.param("model M { x = " + "2 ** " * 5000 + "1 }", id="power"),
])
def test_long_operator_chains_are_nl010_not_a_crash(src):
    try:
        parse(src, "long.nl")
    except SyntaxFailure as e:
        assert e.diagnostic.code == "NL010"


# ---- comments and blank lines ------------------------------------------------------------------

COMMENTED = """\
# file header

# about the include
include "adam.nl"  # trailing on include

# the model
model Tiny {  # after the brace
  # leading on vocab
  vocab = 256; dim = 64  # trailing on dim
  layers = 2

  context = 64
  level fast : tokens every 16
  memory mem in fast : linear {
    # leading on a property
    objective l2  # trailing on a property
    # closing a body
  }
  block = residual(norm -> mem)
  # closing the model
}  # after the model
ablation a { mem.objective = dot }
# closing the file
"""

COMMENTED_FORMATTED = """\
# file header

# about the include
include "adam.nl"  # trailing on include

# the model
model Tiny {
  # after the brace
  # leading on vocab
  vocab = 256
  dim = 64  # trailing on dim
  layers = 2

  context = 64
  level fast : tokens every 16
  memory mem in fast : linear {
    # leading on a property
    objective l2  # trailing on a property
    # closing a body
  }
  block = residual(norm -> mem)
  # closing the model
}  # after the model

ablation a { mem.objective = dot }

# closing the file
"""


def test_comments_are_attached_to_statements():
    f = parse(COMMENTED, "c.nl")
    include, model, ablation = f.items
    assert include.trivia == A.Trivia(("# file header", "", "# about the include"), "# trailing on include")
    assert model.trivia == A.Trivia(("# the model",), "# after the model", blank_before=True)
    vocab, dim, layers, context = model.stmts[:4]
    assert vocab.trivia.comments == ("# after the brace", "# leading on vocab")
    assert dim.trivia.trailing == "# trailing on dim" and vocab.trivia.trailing is None
    assert context.trivia.blank_before and not layers.trivia.blank_before
    mem = model.stmts[5]
    [prop] = mem.body.props
    assert prop.trivia == A.Trivia(("# leading on a property",), "# trailing on a property")
    assert mem.body.closing == ("# closing a body",)
    assert model.closing == ("# closing the model",)
    assert f.closing == ("# closing the file",)
    assert ablation.trivia == A.Trivia()


def test_comments_are_printed_back():
    assert format_file(parse(COMMENTED)) == COMMENTED_FORMATTED


def test_blank_lines_between_comments_are_kept():
    """A blank line (or a run of them) between two comments, or between the last comment and its
    statement, stays one blank line; comments that touch stay together."""
    text = ("# licence\n\n\n# about M\nmodel M {\n  # one\n  # two\n\n  vocab = 4\n"
            "  # closing\n\n  # more closing\n}\n")
    f = parse(text)
    [model] = f.items
    assert model.trivia.comments == ("# licence", "", "# about M")
    assert model.stmts[0].trivia.comments == ("# one", "# two", "")
    assert model.closing == ("# closing", "", "# more closing")
    once = format_file(f)
    assert once == ("# licence\n\n# about M\nmodel M {\n  # one\n  # two\n\n  vocab = 4\n"
                    "  # closing\n\n  # more closing\n}\n")
    assert format_file(parse(once)) == once


def test_comment_like_text_in_strings_is_kept():
    text = 'model M {\n  label = "a # b"  # real comment\n}\n'
    f = parse(text)
    [p] = f.items[0].stmts
    assert p.value == S("a # b") and p.trivia.trailing == "# real comment"
    assert format_file(f) == text


BRACES_IN_TRIVIA = [
    pytest.param("model M {\n  memory m in f : linear {\n    # a\n    objective l2  # opening { brace\n"
                 "    rule gd\n  }\n}\n", id="brace-in-a-body-comment"),
    pytest.param("model M {\n  memory m in f : mlp(depth=2) {\n    # a\n    objective l2\n  }  # }{\n"
                 "  # the block\n  block = m\n}\n", id="brace-after-a-body"),
    pytest.param('model M {\n  memory m in f : linear {\n    # the weights\n'
                 '    init pretrained("w{1}.safetensors")\n  }\n}\n', id="balanced-braces-in-a-string"),
    pytest.param('model M {\n  memory m in f : linear {\n    # the weights\n'
                 '    init pretrained("w{.safetensors")\n  }\n}\n', id="brace-in-a-body-string"),
    pytest.param("model M {\n  memory m in f : mlp(depth=2) {\n    # {\n    objective l2\n  }\n}\n",
                 id="brace-in-a-comment-first-in-a-body"),
]


@pytest.mark.parametrize("src", BRACES_IN_TRIVIA)
def test_braces_in_comments_and_strings_keep_every_comment(src):
    """fmt must not drop comments when a comment or string of a body contains a brace.

    Bug: ``_Attacher._body_start`` (and the ``text.index("{")`` in ``_Attacher.node``) count
    braces in the raw text, including those inside comments and strings, so they find the
    wrong ``{`` and the body's comments are silently lost.
    """
    assert format_file(parse(src)) == src


def test_trailing_comments_are_aligned():
    text = "model M {\n  a = 1  # one\n  long_name = 2  # two\n}\n"
    assert format_file(parse(text)) == "model M {\n  a = 1          # one\n  long_name = 2  # two\n}\n"


def test_comment_trailing_whitespace_is_dropped():
    assert format_file(parse("# note   \nmodel M {}\n")) == "# note\nmodel M {}\n"


def test_comments_change_the_ast_but_not_the_ir():
    from nldsl.spec import analyze_text

    from tests.nltest_support import TINY

    commented = TINY.replace("  level fast", "  # the in-context level\n  level fast")
    assert parse(commented) != parse(TINY)
    assert analyze_text(commented).ir == analyze_text(TINY).ir


# ---- the canonical printer -----------------------------------------------------------------------


def test_printer_canonical_form():
    messy = ("model   M{dim=1;layers=2\n\n\n\nlevel f:tokens every(16)read running carry\n"
             "memory m in f:mlp( depth = 2 ){objective l2;rule dgd}\nblock=residual(norm->m)->swiglu}\n"
             "ablation a{~m}")
    assert format_file(parse(messy)) == (
        "model M {\n"
        "  dim = 1\n"
        "  layers = 2\n"
        "\n"
        "  level f : tokens every 16 read running carry\n"
        "  memory m in f : mlp(depth=2) {\n"
        "    objective l2\n"
        "    rule dgd\n"
        "  }\n"
        "  block = residual(norm -> m) -> swiglu\n"
        "}\n"
        "\n"
        "ablation a { ~m }\n")


@pytest.mark.parametrize("src", [
    "(a + b) * c", "a - (b - c)", "a - b - c", "a / (b * c)", "(-2) ** 2", "-(2 ** 2)", "2 ** -1",
    "2 ** 3 ** 2", "(2 ** 3) ** 2", "(a + b)[0]", "-a[0]", "(-a)[0]", "f(a -> b)", "(a -> b) -> c",
    "(1,)", "((1, 2), (3,))", '"tab\\tnew\\nline"', "1e-3 * 1E+6 + .5 - 2.",
])
def test_printer_keeps_meaning_of_expressions(src):
    from nldsl.syntax.printer import expr

    tree = value(src)
    printed = expr(tree)
    assert value(printed) == tree
    assert expr(value(printed)) == printed


def test_long_ablations_print_on_several_lines():
    text = "ablation a { x.y = 1; x.z = 2; x.w = 3; x.v = 4 }\n"
    assert format_file(parse(text)) == "ablation a {\n  x.y = 1\n  x.z = 2\n  x.w = 3\n  x.v = 4\n}\n"


# ---- fmt idempotence on every spec we have ---------------------------------------------------------


def _parseable() -> list:
    out = []
    for p in all_spec_files():
        try:
            text = p.read_text(encoding="utf-8")
            parse(text)
        except (UnicodeDecodeError, SyntaxFailure):
            continue
        out.append(p)
    return out


PARSEABLE = _parseable()


@pytest.mark.parametrize("path", PARSEABLE, ids=rel)
def test_fmt_is_idempotent(path):
    once = format_file(parse(path.read_text(encoding="utf-8"), rel(path)))
    assert format_file(parse(once)) == once


def _without_blank_lines(node):
    """The tree with every ``blank_before`` cleared (fmt may add blank lines between blocks)."""
    import dataclasses

    if isinstance(node, A.Trivia):
        return dataclasses.replace(node, blank_before=False)
    if isinstance(node, tuple):
        return tuple(_without_blank_lines(x) for x in node)
    if dataclasses.is_dataclass(node):
        changes = {f.name: _without_blank_lines(getattr(node, f.name))
                   for f in dataclasses.fields(node) if f.compare}
        return dataclasses.replace(node, **changes)
    return node


@pytest.mark.parametrize("path", PARSEABLE, ids=rel)
def test_fmt_keeps_the_syntax_tree_and_every_comment(path):
    tree = parse(path.read_text(encoding="utf-8"))
    assert _without_blank_lines(parse(format_file(tree))) == _without_blank_lines(tree)


@pytest.mark.parametrize("name", sorted(FILE_SHAPES))
def test_fmt_is_idempotent_on_file_shapes(name):
    once = format_file(parse(FILE_SHAPES[name]))
    assert format_file(parse(once)) == once


def test_corpus_covers_the_shipped_specs():
    assert len(SHIPPED_SPECS) >= 13
    assert set(SHIPPED_SPECS) <= set(PARSEABLE)


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_shipped_specs_are_canonical(path):
    text = path.read_text(encoding="utf-8")
    assert format_file(parse(text)) == text, f"run `nldsl fmt --write {rel(path)}`"


def test_fmt_check_passes_on_shipped_specs(in_repo):
    rc, out, err = run_cli(["fmt", "--check", *[rel(p) for p in SHIPPED_SPECS]])
    assert rc == 0, err
    assert out == ""
