"""Grammar coverage (blark's test_uncovered_grammar): every rule and terminal is exercised.

The corpus is every shipped spec, every ``.nl`` file under tests/ (diagnostics cases and
tests/corpus/), the wrong and right examples of the rule table, and a few whole-file shapes.
Each text is parsed with the real parser (``get_parser()``); we record

- every grammar *expansion* the LALR parser reduces (``get_parser().rules``: one ``Rule`` per
  alternative, including lark's internal helper rules for ``*``, ``+`` and ``[...]``),
- every terminal the lexer produces (``get_parser().terminals``; ignored ones such as comments
  and whitespace are seen through ``lex(dont_ignore=True)``),
- every rule name and token type that appears in the parse trees,

and compare with the grammar. The uncovered set must equal the allow-list below. Add a corpus
spec under tests/corpus/ rather than growing the list.
"""
from __future__ import annotations

import copy

import pytest
from lark import Token
from lark.exceptions import UnexpectedInput

from nldsl.checks.codes import CODES
from nldsl.syntax.parser import get_parser
from tests.nltest_support import FILE_SHAPES, all_spec_files, rel

# Rules (as "origin: expansion") and terminals no corpus text can reach. Empty: every rule
# and terminal of grammar/nldsl.lark is exercised.
ALLOWED_UNCOVERED_RULES: set[str] = set()
ALLOWED_UNCOVERED_TERMINALS: set[str] = set()


def _corpus() -> dict[str, str]:
    texts = {}
    for path in all_spec_files():
        try:
            texts[rel(path)] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    for code, entry in sorted(CODES.items()):
        for kind in ("wrong", "right"):
            text = getattr(entry, kind)
            if text is not None:
                texts[f"codes:{code}:{kind}"] = text
    for name, text in FILE_SHAPES.items():
        texts[f"shape:{name}"] = text
    return texts


def _rule_id(rule) -> str:
    return f"{rule.origin.name}: {' '.join(s.name for s in rule.expansion) or '<empty>'}"


class Coverage:
    def __init__(self):
        self.parser = get_parser()
        self.rules: set = set()
        self.terminals: set[str] = set()
        self.tree_names: set[str] = set()
        self.tree_tokens: set[str] = set()
        self.parsed: list[str] = []
        self.failed: list[str] = []

    def add(self, name: str, text: str) -> None:
        p = self.parser
        ip = p.parse_interactive(text)
        state = ip.parser_state
        conf = copy.copy(state.parse_conf)  # a private copy: record reductions, then build as usual
        seen = self.rules

        def recording(rule, callback):
            def reduce(children):
                seen.add(rule)
                return callback(children)
            return reduce

        conf.callbacks = {k: (v if isinstance(k, str) else recording(k, v)) for k, v in conf.callbacks.items()}
        state.parse_conf = conf
        fed: set[str] = set()
        try:
            for tok in ip.iter_parse():
                fed.add(tok.type)
            tree = ip.feed_eof()
        except UnexpectedInput:
            self.failed.append(name)  # syntax-error cases: what was reduced before still counts
            self.terminals |= fed
            return
        self.parsed.append(name)
        self.terminals |= fed
        ignored = set(p.lexer_conf.ignore)
        self.terminals |= {t.type for t in p.lex(text, dont_ignore=True) if t.type in ignored}
        for sub in tree.iter_subtrees():
            self.tree_names.add(sub.data)
            self.tree_tokens |= {c.type for c in sub.children if isinstance(c, Token)}
        # the tree the package builds from is the one get_parser().parse gives
        assert tree == p.parse(text), name


@pytest.fixture(scope="module")
def coverage() -> Coverage:
    cov = Coverage()
    for name, text in _corpus().items():
        cov.add(name, text)
    return cov


def test_corpus_is_substantial(coverage):
    assert len(coverage.parsed) >= 60
    # the only corpus texts that do not parse are the syntax-error cases
    assert all("NL001" in name or "NL010" in name for name in coverage.failed), coverage.failed


def test_every_grammar_rule_is_exercised(coverage):
    grammar = {_rule_id(r) for r in coverage.parser.rules}
    seen = {_rule_id(r) for r in coverage.rules}
    uncovered = grammar - seen
    assert uncovered == ALLOWED_UNCOVERED_RULES, (
        "grammar alternatives no corpus text exercises (add a spec under tests/corpus/):\n  "
        + "\n  ".join(sorted(uncovered - ALLOWED_UNCOVERED_RULES)))
    assert ALLOWED_UNCOVERED_RULES <= grammar, "stale allow-list entries"


def test_every_terminal_is_exercised(coverage):
    grammar = {t.name for t in coverage.parser.terminals}
    uncovered = grammar - coverage.terminals
    assert uncovered == ALLOWED_UNCOVERED_TERMINALS, sorted(uncovered)
    assert ALLOWED_UNCOVERED_TERMINALS <= grammar


def _visible_names(parser) -> set[str]:
    """Rule names that can label a parse-tree node (lark inlines `_rule`s and `?rule`s with
    one child; an alias names its alternative instead)."""
    out = set()
    for r in parser.rules:
        name = r.alias or r.origin.name
        if name.startswith("_") or (r.options.expand1 and not r.alias):
            continue
        out.add(name)
    return out


def test_every_tree_node_kind_appears(coverage):
    """The same coverage seen the blark way: rule names and token types in the parse trees."""
    visible = _visible_names(coverage.parser)
    assert "chain" in visible and "level" in visible and "word" in visible
    assert visible - coverage.tree_names == set()
    assert coverage.tree_names <= visible | {"start"}
    # Keyword tokens survive in trees only through `!word` (keywords used as names).
    named = {t.name for t in coverage.parser.terminals if not t.name.startswith("__")}
    kept = {"NAME", "NUMBER", "STRING"} | {t for t in named if t in coverage.tree_tokens}
    assert {"NAME", "NUMBER", "STRING", "READ", "CARRY", "RESET", "EVERY", "IN", "LEVEL",
            "MEMORY", "CMS", "TRANSFER", "BLOCK", "OPTIMIZER", "UPDATE", "INCLUDE", "MODEL",
            "ABLATION"} <= kept


def test_coverage_recording_does_not_touch_the_shared_parser():
    p = get_parser()
    shared = p.parse_interactive("").parser_state.parse_conf.callbacks
    before = dict(shared)
    Coverage().add("tiny", "model A { dim = 1 }\n")
    assert p.parse_interactive("").parser_state.parse_conf.callbacks == before
    assert all(getattr(cb, "__name__", "") != "reduce" for cb in shared.values())
