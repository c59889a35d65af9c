"""Request fields → GrammarSpec, for the gateway (REST body fields; gRPC maps onto the same names).

    spec_from_openai(response_format=..., grammar=..., regex=..., choice=..., tools=..., tool_choice=...)

At most one constraint per request. Raises GrammarError (a ValueError) whose `param` names the
field; the message says what to change. Returns None for an unconstrained request.
Extensions: `grammar` is GBNF text (llama.cpp dialect) or {"name": "<library grammar>"}.
The gateway's internal {"kind", "spec"} form (services/serving/wire.py) goes through
`spec_from_structured`.
"""
from __future__ import annotations

import json
from typing import Any

from services.grammar import library
from services.grammar.errors import GrammarError
from services.grammar.spec import GrammarSpec
from services.grammar.tools import tools_to_spec


def _bad(message: str, param: str) -> GrammarError:
    return GrammarError(message, param=param)


def spec_from_openai(*, response_format: Any = None, grammar: Any = None, regex: Any = None, choice: Any = None,
                     tools: Any = None, tool_choice: Any = None,
                     parallel_tool_calls: bool | None = None) -> GrammarSpec | None:
    specs: list[tuple[str, GrammarSpec]] = []
    if response_format is not None:
        s = _response_format(response_format)
        if s is not None:
            specs.append(("response_format", s))
    if grammar is not None:
        specs.append(("grammar", _grammar(grammar)))
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise _bad("'regex' must be a non-empty string", "regex")
        specs.append(("regex", GrammarSpec.regex(regex, param="regex")))
    if choice is not None:
        if not isinstance(choice, list) or not choice or not all(isinstance(c, str) and c for c in choice):
            raise _bad("'choice' must be a non-empty list of non-empty strings", "choice")
        specs.append(("choice", GrammarSpec.choice(choice, param="choice")))
    if tools is not None or tool_choice is not None:
        if tool_choice is not None and tools is None and tool_choice != "none":
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        s = tools_to_spec(tools, tool_choice, parallel_tool_calls=parallel_tool_calls) if tools is not None else None
        if s is not None:
            specs.append(("tool_choice", s))
    if len(specs) > 1:
        names = ", ".join(n for n, _ in specs)
        raise _bad(f"give at most one output constraint; got {names}", specs[1][0])
    return specs[0][1] if specs else None


def _response_format(rf: Any) -> GrammarSpec | None:
    p = "response_format"
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}", p)
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return GrammarSpec.json_object(param=p)
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise _bad("'response_format.json_schema' must be an object {\"name\", \"schema\", \"strict\"}", p)
    schema = js.get("schema")
    if schema is None:
        raise _bad("'response_format.json_schema.schema' is required", p)
    if isinstance(schema, str):   # the gRPC surface carries the schema as JSON text
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"'response_format.json_schema.schema' is not valid JSON: {e.msg} at line "
                               f"{e.lineno}, column {e.colno}", param=p, line=e.lineno, column=e.colno) from None
    if not isinstance(schema, (dict, bool)):
        raise _bad("'response_format.json_schema.schema' must be a JSON Schema object", p)
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad("'response_format.json_schema.strict' must be a boolean", p)
    return GrammarSpec.json_schema(schema, strict=bool(strict), param=p)


def _grammar(g: Any) -> GrammarSpec:
    if isinstance(g, str) and g.strip():
        return GrammarSpec.gbnf(g, param="grammar")
    if isinstance(g, dict) and set(g) == {"name"} and isinstance(g["name"], str):
        library.get(g["name"], param="grammar")
        return GrammarSpec.builtin(g["name"], param="grammar")
    raise _bad("'grammar' must be GBNF text or {\"name\": one of " + ", ".join(library.names()) + "}", "grammar")


def spec_from_structured(structured: dict | GrammarSpec) -> GrammarSpec:
    """The gateway→replica wire form {"kind": json_schema|json_object|grammar|regex|choice|builtin,
    "spec": ...} (or a GrammarSpec / GrammarSpec.to_dict()) → GrammarSpec."""
    if isinstance(structured, GrammarSpec):
        return structured
    if not isinstance(structured, dict) or "kind" not in structured:
        raise _bad("structured output must be {\"kind\": ..., \"spec\": ...}", "response_format")
    if "spec" not in structured:
        return GrammarSpec.from_dict(structured)
    kind, value = structured["kind"], structured["spec"]
    if kind == "json_schema":
        return GrammarSpec.json_schema(value, strict=bool(structured.get("strict", False)),
                                       param="response_format")
    if kind == "json_object":
        return GrammarSpec.json_object(param="response_format")
    if kind in ("grammar", "gbnf"):
        return _grammar(value)
    if kind == "regex":
        return spec_from_openai(regex=value)
    if kind == "choice":
        return spec_from_openai(choice=value)
    if kind == "builtin":
        return _grammar({"name": value})
    raise _bad(f"unknown structured output kind {kind!r}", "response_format")
