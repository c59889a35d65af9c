"""Canonical JSON Schema text: the form that is hashed (cache key) and compiled.

Two schemas that differ only in annotations (`title`, `description`, `examples`, ...) or in the
order of keywords inside a schema object match the same JSON values and compile to the same
grammar, so they share one cache entry. What stays as written:
- the order of `properties` (and of every other map keyed by user names): it is the order in
  which xgrammar generates the properties;
- data: `enum`, `const`, `required` and unknown keywords are kept verbatim, never walked;
- names: a property called "title" is a name, not an annotation.

    canonical_schema_text('{"title": "T", "type": "string", "maxLength": 8}')
    # -> '{"maxLength":8,"type":"string"}'
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

# Annotations (JSON Schema 2020-12 meta-data vocabulary, plus $comment): no effect on validation.
ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "deprecated",
                         "readOnly", "writeOnly"})
# Keywords whose value is one subschema / a list of subschemas / a map of name -> subschema.
_ONE = frozenset({"items", "additionalItems", "additionalProperties", "unevaluatedItems",
                  "unevaluatedProperties", "contains", "propertyNames", "not", "if", "then", "else"})
_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def canonical_schema(schema: Any) -> Any:
    """A copy of `schema` without annotations and with each schema object's keywords sorted."""
    if not isinstance(schema, dict):
        return schema                      # true / false (or, in a list-form `items`, anything)
    out: dict[str, Any] = {}
    for key in sorted(schema):
        value = schema[key]
        if key in ANNOTATIONS:
            continue
        if key in _ONE:
            # `items` may be a list of schemas (draft 4-7 tuple form).
            value = [canonical_schema(s) for s in value] if isinstance(value, list) else canonical_schema(value)
        elif key in _LIST and isinstance(value, list):
            value = [canonical_schema(s) for s in value]
        elif key in _MAP and isinstance(value, dict):
            value = {name: canonical_schema(s) for name, s in value.items()}   # order kept
        out[key] = value
    return out


@lru_cache(maxsize=1024)
def canonical_schema_text(text: str) -> str:
    """Compact JSON of canonical_schema(json.loads(text)); `text` is already valid JSON."""
    return json.dumps(canonical_schema(json.loads(text)), separators=(",", ":"), ensure_ascii=False)
