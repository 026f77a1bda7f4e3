"""The gateway's checks of client JSON schemas: finite values, depth, odd references (no model needed)."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.gateway.schemas import MAX_DEPTH, has_finite_value, schema_problem


def chain(n: int) -> dict[str, Any]:
    """`n` object schemas, each requiring the next through a `$ref`, ending in an integer."""
    defs: dict[str, Any] = {f"d{i}": {"type": "object", "properties": {"n": {"$ref": f"#/$defs/d{i + 1}"}},
                                      "required": ["n"]} for i in range(n)}  # fmt: skip
    defs[f"d{n}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


NEEDS_ONE_ITEM = {"type": "array", "items": {"$ref": "#"}, "minItems": 1}
MAY_BE_EMPTY = {"type": "array", "items": {"$ref": "#"}}
NODE = {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}
NULLABLE = {"type": ["object", "null"], "properties": {"next": {"$ref": "#/$defs/t"}}, "required": ["next"]}

ENDLESS = [
    {"$ref": "#"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "object", "properties": {"k": NEEDS_ONE_ITEM}, "required": ["k"]},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
]
FINITE = [
    {"type": "object", "properties": {"a": {"$ref": "#"}}},  # `a` may be left out
    {"type": "object", "properties": {"k": MAY_BE_EMPTY}, "required": ["k"]},  # []
    {"$defs": {"n": {"anyOf": [{"type": "null"}, NODE]}}, "$ref": "#/$defs/n"},
    {"$defs": {"t": NULLABLE}, "$ref": "#/$defs/t"},  # OpenAI strict mode's optional field: null ends it
    {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no type: a string matches
    {"anyOf": [{"const": 1}, {"$ref": "#"}]},
    {"type": "object", "$defs": {"l": [1]}, "default": {"$ref": "#/$defs/l/²"}},  # data, not a reference
    chain(60),
]


@pytest.mark.parametrize("schema", ENDLESS)
def test_schemas_no_finite_value_matches_are_refused(schema: dict[str, Any]) -> None:
    assert not has_finite_value(schema)
    assert "no finite JSON value" in schema_problem(schema)


@pytest.mark.parametrize("schema", FINITE)
def test_schemas_some_finite_value_matches_are_accepted(schema: dict[str, Any]) -> None:
    assert has_finite_value(schema)
    assert schema_problem(schema) == ""


def test_a_schema_nested_too_deeply_through_refs_is_refused_before_llguidance() -> None:
    # llguidance's validator overflowed its stack (a segfault) on a chain of 950 of these.
    assert "nested too deeply" in schema_problem(chain(950))
    assert f"at most {MAX_DEPTH} levels" in schema_problem(chain(MAX_DEPTH))


def test_a_schema_seen_before_is_answered_from_the_cache() -> None:
    from cortex.gateway.schemas import _cached_problem

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "title": "cache"}
    assert schema_problem(schema) == ""
    hits = _cached_problem.cache_info().hits
    assert schema_problem(dict(schema)) == ""  # an equal schema from another request
    assert _cached_problem.cache_info().hits == hits + 1
