"""Canonical JSON Schemas: annotations and keyword order do not change the cache key or the grammar;
property order, names and data do."""
from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar as xgr

from services.grammar.canonical import canonical_schema, canonical_schema_text
from services.grammar.compiler import compile_spec, xgr_compiler
from services.grammar.spec import GrammarLimits, GrammarSpec

ANNOTATED = {
    "title": "Order", "description": "an order", "$comment": "v2", "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20, "description": "a property named title"},
        "description": {"type": "string", "examples": ["x"]},
        "items": {"type": "array", "items": {"type": "integer", "title": "qty", "default": 1},
                  "maxItems": 3, "deprecated": True},
        "kind": {"enum": [{"title": "data, not an annotation"}, "b"], "readOnly": True},
        "note": {"anyOf": [{"type": "string", "writeOnly": True}, {"type": "null", "title": "none"}]},
    },
    "required": ["title", "kind"], "additionalProperties": False,
    "$defs": {"unused": {"type": "string", "description": "kept as a definition"}},
}
PLAIN = {
    "additionalProperties": False, "required": ["title", "kind"], "type": "object",
    "properties": {
        "title": {"maxLength": 20, "type": "string"},
        "description": {"type": "string"},
        "items": {"maxItems": 3, "items": {"type": "integer"}, "type": "array"},
        "kind": {"enum": [{"title": "data, not an annotation"}, "b"]},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "$defs": {"unused": {"type": "string"}},
}


def test_annotations_go_names_and_data_stay():
    c = canonical_schema(ANNOTATED)
    assert c == canonical_schema(PLAIN)
    assert list(c["properties"]) == ["title", "description", "items", "kind", "note"]   # order kept
    assert c["properties"]["kind"]["enum"][0] == {"title": "data, not an annotation"}
    assert list(c) == sorted(c)
    assert canonical_schema(True) is True


def test_same_hash_same_grammar_and_same_instances():
    a, b = GrammarSpec.json_schema(ANNOTATED), GrammarSpec.json_schema(PLAIN)
    assert a.spec_hash == b.spec_hash
    # Property order is generation order: still a different spec.
    reordered = dict(PLAIN, properties=dict(reversed(list(PLAIN["properties"].items()))))
    assert GrammarSpec.json_schema(reordered).spec_hash != a.spec_hash
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b"<eos>"], xgr.VocabType.RAW, stop_token_ids=[256])
    compiler = xgr_compiler(info)
    assert compile_spec(compiler, a, GrammarLimits()).serialize_json() == \
        compile_spec(xgr_compiler(info), b, GrammarLimits()).serialize_json()
    for instance in ({"title": "t", "kind": "b"}, {"title": "t" * 21, "kind": "b"}, {"kind": "b"},
                     {"title": "t", "kind": "b", "items": [1, 2, 3, 4]}, {"title": "t", "kind": "c"}):
        assert _valid(ANNOTATED, instance) == _valid(json.loads(canonical_schema_text(a.text)), instance)


def _valid(schema, instance) -> bool:
    try:
        jsonschema.validate(instance, schema)
        return True
    except jsonschema.ValidationError:
        return False


@pytest.mark.parametrize("schema", [{"items": [{"title": "t", "type": "string"}]}, {"not": {"title": "x"}},
                                    {"type": "object", "dependentSchemas": {"a": {"description": "d"}}}])
def test_every_subschema_position(schema):
    assert "title" not in canonical_schema_text(json.dumps(schema))
    assert "description" not in canonical_schema_text(json.dumps(schema))
