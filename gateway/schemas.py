"""JSON schemas from clients (structured output, tool parameters), checked before any worker sees them.

A schema must compile in llguidance, the workers' constrained decoder, and some
finite value must match it: llguidance accepts ``{"$ref": "#"}`` and fails only
when generation reaches the endless part, mid-answer.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

MAX_DEPTH = 256
"""JSON levels, ``$ref``s followed. llguidance's validator overflowed its native stack (a
segfault, taking the gateway down) on a chain of 950 object-wrapping refs, about 2,800 levels."""
MAX_REFS = 1000
"""Distinct local ``$ref`` targets."""
FINITENESS_BUDGET = 200_000
"""Schema nodes the finiteness check may visit before it gives up and lets the schema through."""
CACHED_UP_TO = 64 * 1024
"""Bytes of encoded schema above which its check is not cached (the cache holds 1,024 at most)."""
_encoder = msgspec.json.Encoder()
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are JSON data, not schemas: a ``$ref`` inside them is just a string."""


def schema_problem(schema: Any) -> str:
    """Why `schema` cannot be used for constrained decoding; empty if it can.

    Agents send the same tools every turn: answers for schemas up to `CACHED_UP_TO`
    bytes are remembered (compiling one in llguidance takes about 0.4 ms).
    """
    try:
        encoded = _encoder.encode(schema)
    except RecursionError:
        return f"it is nested too deeply (at most {MAX_DEPTH} levels, `$ref`s followed)."
    return _cached_problem(encoded) if len(encoded) <= CACHED_UP_TO else _problem(schema)


@functools.lru_cache(maxsize=1024)
def _cached_problem(encoded: bytes) -> str:
    return _problem(msgspec.json.decode(encoded))


def _problem(schema: Any) -> str:
    targets = {ref: _resolve(schema, ref) for ref in _local_refs(schema)}
    if len(targets) > MAX_REFS:
        return f"it has {len(targets)} distinct `$ref` targets; at most {MAX_REFS} are supported."
    try:
        too_deep = _depth(schema, targets, {}, set()) > MAX_DEPTH
    except RecursionError:
        too_deep = True
    if too_deep:
        return f"it is nested too deeply (at most {MAX_DEPTH} levels, `$ref`s followed)."

    from llguidance import LLMatcher

    try:
        problem = str(LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema)))
    except Exception as exc:  # llguidance raises for some malformed schemas instead of reporting
        return str(exc)
    except BaseException as exc:
        # A panic in llguidance's Rust code reaches Python as pyo3's PanicException, which is no Exception: it
        # panics quoting a malformed keyword cut inside a multi-byte character (`"required": {"ééé…": 1}`).
        if type(exc).__name__ != "PanicException":
            raise
        return "llguidance could not read it (a keyword has a value of the wrong type?)."
    if problem:
        return problem
    return "" if has_finite_value(schema, targets) else "no finite JSON value matches it (a `$ref` cycle nothing ends)."


def has_finite_value(schema: Any, targets: dict[str, Any] | None = None) -> bool:
    """Whether some finite JSON value can match `schema`, following its local ``$ref``s.

    The least fixpoint over the reference targets: a target is finite once it can be
    written using only targets already known to be finite. Keywords that only restrict
    (patterns, bounds, formats) are taken as satisfiable; llguidance checks those. When
    the work runs over `FINITENESS_BUDGET` the answer is True: unknown is let through.
    """
    if targets is None:
        targets = {ref: _resolve(schema, ref) for ref in _local_refs(schema)}
    budget = _Budget(FINITENESS_BUDGET)
    finite: set[str] = set()
    try:
        grown = True
        while grown:
            grown = False
            for ref, target in targets.items():
                if ref not in finite and _finite(target, finite, budget):
                    finite.add(ref)
                    grown = True
        return _finite(schema, finite, budget)
    except (_OverBudget, RecursionError):
        return True


class _OverBudget(Exception):
    pass


class _Budget:
    def __init__(self, visits: int) -> None:
        self.left = visits

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _OverBudget


def _finite(node: Any, finite_refs: set[str], budget: _Budget) -> bool:
    budget.spend()
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        return True
    if "const" in node or "enum" in node:
        return True  # the values are given; llguidance checks them against the rest
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and ref not in finite_refs:
        return False
    for key, needs_all in (("allOf", True), ("anyOf", False), ("oneOf", False)):
        branches = node.get(key)
        if isinstance(branches, list) and branches:
            results = (_finite(branch, finite_refs, budget) for branch in branches)
            if not (all(results) if needs_all else any(results)):
                return False
    only = _only_type(node)
    if only == "object":
        properties, required = node.get("properties"), node.get("required")
        if isinstance(properties, dict) and isinstance(required, list):
            needed = (properties[name] for name in required if isinstance(name, str) and name in properties)
            if not all(_finite(schema, finite_refs, budget) for schema in needed):
                return False
    if only == "array":
        min_items = node.get("minItems", 0)
        if isinstance(min_items, int) and min_items > 0:
            prefix = node.get("prefixItems")
            prefix = prefix if isinstance(prefix, list) else []
            if not all(_finite(item, finite_refs, budget) for item in prefix[:min_items]):
                return False
            if min_items > len(prefix) and not _finite(node.get("items", True), finite_refs, budget):
                return False
    return True


def _only_type(node: dict[str, Any]) -> str | None:
    """The one JSON type `node` allows, if it names exactly one; else None (some other value may do)."""
    kind = node.get("type")
    if isinstance(kind, list) and len(kind) == 1:
        kind = kind[0]
    return kind if isinstance(kind, str) else None


def _depth(node: Any, targets: dict[str, Any], known: dict[str, int], following: set[str]) -> int:
    """How deep `node` nests, each local ``$ref`` counted as the depth of its target (a cycle as 0)."""
    if isinstance(node, list):
        return 1 + max((_depth(item, targets, known, following) for item in node), default=0)
    if not isinstance(node, dict):
        return 0
    below = 0
    ref = node.get("$ref")
    if isinstance(ref, str) and ref in targets and ref not in following:
        if ref not in known:
            following.add(ref)
            known[ref] = _depth(targets[ref], targets, known, following)
            following.discard(ref)
        below = known[ref]
    for key, value in node.items():
        if key not in _DATA_KEYWORDS:
            below = max(below, _depth(value, targets, known, following))
    return 1 + below


def _local_refs(node: Any) -> set[str]:
    """The local ``$ref``s anywhere inside `node` (without following them), skipping data keywords."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                found.add(ref)
            stack.extend(value for key, value in item.items() if key not in _DATA_KEYWORDS)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _resolve(root: Any, ref: str) -> Any:
    """The schema a local JSON-pointer ``$ref`` names; True (anything) when it names nothing."""
    node = root
    for part in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isascii() and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return True
    return node
