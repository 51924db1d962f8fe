"""Every dead-letter code the bridge can emit is documented, and every documented code is
still emitted: consumers branch on `error.code`, so a code missing from the docs, or a
documented one that no longer exists, is a broken contract either way."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator

from bridge import kafka
from bridge.errors import Rejected
from tests.conftest import ROOT

DOCS = (ROOT / "README.md", ROOT / "docs" / "file-transfer.md")

# Codes the code emits that the docs do not mention yet. The docs are being rewritten; once
# they land, empty this set (the test fails until then if a code appears in the docs, so the
# set cannot go stale silently).
MISSING_FROM_DOCS: frozenset[str] = frozenset()

# `Rejected(<variable>, ...)` sites whose codes come from elsewhere, and where.
_NON_LITERAL_SITES = {("kafka.py", "_reject_or_retry"): "bridge.kafka._PERMANENT"}


Scope = ast.Module | ast.FunctionDef | ast.AsyncFunctionDef


def _scopes(tree: ast.Module) -> Iterator[Scope]:
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _own_calls(scope: Scope) -> Iterator[ast.Call]:
    """The calls in a module or function body, not in the functions nested in it."""
    todo: list[ast.AST] = list(scope.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and \
                node is not scope:
            if isinstance(node, ast.Lambda):
                todo.append(node.body)  # a lambda has no parameters that carry codes here
            continue
        if isinstance(node, ast.Call):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _is_rejected(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Name) and func.id == "Rejected") or \
        (isinstance(func, ast.Attribute) and func.attr == "Rejected")


def _code_arg(call: ast.Call) -> ast.expr | None:
    if call.args:
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg == "code"), None)


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def scan(sources: dict[str, str]) -> tuple[set[str], set[tuple[str, str]]]:
    """The literal codes of every `Rejected(...)` in `sources` (name -> text), and the
    (module, function) sites that pass a variable. A code passed in through a parameter
    (`_staging(..., "unknown_transfer")`) is read at the helper's call sites instead."""
    codes: set[str] = set()
    helpers: dict[str, int] = {}  # function name -> index of the parameter that is a code
    unresolved: set[tuple[str, str]] = set()
    trees = {name: ast.parse(text) for name, text in sources.items()}
    for name, tree in trees.items():
        for scope in _scopes(tree):
            params = [] if isinstance(scope, ast.Module) else [a.arg for a in scope.args.args]
            scope_name = getattr(scope, "name", "<module>")
            for call in _own_calls(scope):
                if not _is_rejected(call):
                    continue
                arg = _code_arg(call)
                literal = _literal(arg)
                if literal is not None:
                    codes.add(literal)
                elif isinstance(arg, ast.Name) and arg.id in params:
                    helpers[scope_name] = params.index(arg.id)
                else:
                    unresolved.add((name, scope_name))
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in helpers and len(node.args) > helpers[node.func.id]:
                literal = _literal(node.args[helpers[node.func.id]])
                if literal is not None:
                    codes.add(literal)
    return codes, unresolved


@functools.cache
def emitted_codes() -> frozenset[str]:
    """Every code under bridge/ (subpackages too, once modules are grouped): the literals,
    Kafka's permanent errors and the guard's `internal_error`. Any other variable code must
    be a known site, so a new one cannot hide a code from this check."""
    sources = {str(p.relative_to(ROOT / "bridge")): p.read_text()
               for p in sorted((ROOT / "bridge").rglob("*.py"))}
    codes, unresolved = scan(sources)
    assert unresolved <= set(_NON_LITERAL_SITES), \
        f"Rejected(<variable>) in {sorted(unresolved - set(_NON_LITERAL_SITES))}: add the " \
        "site and where its codes come from to _NON_LITERAL_SITES"
    return frozenset(codes | set(kafka._PERMANENT.values())
                     | {Rejected.internal(Exception()).code})


@functools.cache
def documented_codes() -> frozenset[str]:
    """The codes README lists after "Codes:" and the file-transfer doc's code table."""
    readme, transfers = (path.read_text() for path in DOCS)
    listed = re.search(r"^Codes:(.*?)\.\s", readme, re.MULTILINE | re.DOTALL)
    assert listed, "README.md has no 'Codes:' list"
    table = re.search(r"^\| code \| cause \|\n\|[-|]+\|\n((?:\|.*\n)+)", transfers, re.MULTILINE)
    assert table, "docs/file-transfer.md has no '| code | cause |' table"
    rows = re.findall(r"^\| `([a-z_]+)` \|", table[1], re.MULTILINE)
    return frozenset(re.findall(r"`([a-z_]+)`", listed[1])) | frozenset(rows)


def _mentioned(code: str) -> bool:
    return any(f"`{code}`" in path.read_text() for path in DOCS)


SAMPLE = """
def helper(device_id, code):
    raise Rejected(code, "why", device_id)

def stage(x):
    helper(x, "via_helper")
    raise errors.Rejected(
        "multi_line", "why")

def keyword():
    return Rejected(code="by_keyword", reason="why")

def variable(table, key):
    code = table[key]
    raise Rejected(code, "why")

def outer(code):
    def inner(reason):
        return Rejected("nested", reason)
    return inner

TOO_BIG = Rejected("at_module_level", "why")
"""


def test_the_scan_reads_literals_keywords_helpers_and_names_variable_sites() -> None:
    codes, unresolved = scan({"sample.py": SAMPLE})
    assert codes == {"via_helper", "multi_line", "by_keyword", "nested", "at_module_level"}
    assert unresolved == {("sample.py", "variable")}


def test_the_scan_of_the_bridge_finds_codes_of_every_kind() -> None:
    assert {"no_route", "payload_too_large", "unknown_transfer", "record_too_large",
            "internal_error"} <= emitted_codes()


def test_every_emitted_code_is_documented() -> None:
    missing = {code for code in emitted_codes() if not _mentioned(code)}
    assert missing == MISSING_FROM_DOCS, (
        f"undocumented: {sorted(missing - MISSING_FROM_DOCS)}; documented now, so drop from "
        f"MISSING_FROM_DOCS: {sorted(MISSING_FROM_DOCS - missing)}")


def test_every_documented_code_is_emitted() -> None:
    stale = documented_codes() - emitted_codes()
    assert not stale, f"documented but never emitted: {sorted(stale)}"


def test_the_documented_lists_are_read_whole() -> None:
    """The parsers see both lists: README's ends at kafka_topic_missing, the table's at
    bad_transfer_topic (a regex that stops early would make the reverse check vacuous)."""
    codes = documented_codes()
    assert {"no_route", "kafka_topic_missing", "bad_transfer_init", "bad_transfer_topic"} <= codes
    assert "bridge_stats" not in codes and "stats_interval" not in codes
