"""Structured-output requests of every dialect, turned into the canonical `ResponseFormat`."""

from __future__ import annotations

from typing import Any

import msgspec

from cortex.gateway.errors import InvalidRequest
from cortex.protocol import ResponseFormat

_encoder = msgspec.json.Encoder()


def schema_problem(schema: Any) -> str:
    """Why llguidance (the workers' constrained decoder) cannot compile `schema`; empty if it can.

    Checked here too, so a bad schema is a 400 at once, never a late error inside a stream.
    """
    from llguidance import LLMatcher

    try:
        problem = str(LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema)))
    except Exception as exc:  # llguidance raises for some malformed schemas instead of reporting
        return str(exc)
    if problem:
        return problem
    try:
        finite = has_finite_value(schema)
    except RecursionError:
        return "it is nested too deeply."
    # llguidance accepts these and fails only when generation reaches the endless part.
    return "" if finite else "no finite JSON value matches it (a `$ref` cycle that nothing ends)."


def has_finite_value(schema: Any) -> bool:
    """Whether some finite JSON value can match `schema`, following its local ``$ref``s.

    The least fixpoint over the reference targets: a target is finite once it can be
    written using only targets already known to be finite. Keywords that only restrict
    (patterns, bounds, formats) are taken as satisfiable; llguidance checks those.
    """
    targets: dict[str, Any] = {}
    pending = [schema]
    while pending and len(targets) < 1000:
        for ref in _local_refs(pending.pop()):
            if ref not in targets:
                targets[ref] = _resolve(schema, ref)
                pending.append(targets[ref])
    finite: set[str] = set()
    grown = True
    while grown:
        grown = False
        for ref, target in targets.items():
            if ref not in finite and _finite(target, finite):
                finite.add(ref)
                grown = True
    return _finite(schema, finite)


def _finite(node: Any, finite_refs: set[str]) -> bool:
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        return True
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and ref not in finite_refs:
        return False
    for key, needs_all in (("allOf", True), ("anyOf", False), ("oneOf", False)):
        branches = node.get(key)
        if isinstance(branches, list) and branches:
            results = (_finite(branch, finite_refs) for branch in branches)
            if not (all(results) if needs_all else any(results)):
                return False
    properties = node.get("properties")
    required = node.get("required")
    if (
        isinstance(properties, dict)
        and isinstance(required, list)
        and any(not _finite(properties[name], finite_refs) for name in required if name in properties)
    ):
        return False
    min_items = node.get("minItems", 0)
    if isinstance(min_items, int) and min_items > 0:
        prefix = node.get("prefixItems")
        if isinstance(prefix, list) and any(not _finite(item, finite_refs) for item in prefix[:min_items]):
            return False
        items = node.get("items")
        if min_items > (len(prefix) if isinstance(prefix, list) else 0) and not _finite(items, finite_refs):
            return False
    return True


def _local_refs(node: Any) -> list[str]:
    """The local ``$ref``s anywhere inside `node` (without following them)."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                found.append(ref)
            stack.extend(item.values())
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
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return True
    return node


def response_format(kind: str | None, schema: Any, *, param: str) -> ResponseFormat | None:
    """`kind` is ``text`` (or None: no constraint), ``json_object`` or ``json_schema`` (with `schema`)."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    if kind == "json_schema":
        if not isinstance(schema, dict | bool):
            raise InvalidRequest("A `json_schema` format needs a `schema` object.", param=f"{param}.schema")
        problem = schema_problem(schema)
        if problem:
            raise InvalidRequest(f"The JSON schema cannot be used: {problem}", param=f"{param}.schema")
        return ResponseFormat(type="json_schema", schema=_encoder.encode(schema).decode())
    raise InvalidRequest(f"Unknown format type {kind!r}: expected text, json_object or json_schema.", param=param)
