"""OpenAI tool calling on top of JSON Schema constraints (pure functions; the gateway calls them).

`tool_choice="required"` or a named function → the output is constrained to a JSON array of calls
`[{"name": ..., "arguments": {...}}, ...]` where each call matches one function's `parameters`
schema (one call for a named function, or when `parallel_tool_calls` is false). `parse_tool_calls`
turns that output back into OpenAI `tool_calls`. "auto"/"none"/absent constrain nothing.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from services.grammar.errors import GrammarError
from services.grammar.spec import GrammarSpec


def _bad(message: str, param: str) -> GrammarError:
    return GrammarError(message, param=param)


def check_tools(tools: Any) -> list[dict]:
    """The `tools` list in OpenAI's shape; returns the function objects."""
    if not isinstance(tools, list) or not tools:
        raise _bad("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}", "tools")
    fns, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", "tools")
        if fn["name"] in seen:
            raise _bad(f"'tools[{i}].function.name' {fn['name']!r} is defined twice", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"'tools[{i}].function.parameters' must be a JSON Schema object", "tools")
        seen.add(fn["name"])
        fns.append(fn)
    return fns


def tools_to_spec(tools: Any, tool_choice: Any, *, parallel_tool_calls: bool | None = None) -> GrammarSpec | None:
    """The JSON Schema spec constraining a tool-calling turn, or None when nothing is forced."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        if tools is not None:
            check_tools(tools)
        return None
    fns = check_tools(tools)
    if tool_choice == "required":
        chosen, single = fns, parallel_tool_calls is False
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict)):
        name = tool_choice["function"].get("name")
        chosen = [f for f in fns if f["name"] == name]
        if not chosen:
            raise _bad(f"'tool_choice' names function {name!r}, which is not in 'tools'", "tool_choice")
        single = True
    else:
        raise _bad("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    defs: dict[str, Any] = {}
    calls = []
    for i, fn in enumerate(chosen):
        key = f"tool_{i}"
        defs[key] = _rebase_refs(fn.get("parameters") or {"type": "object", "properties": {}}, f"#/$defs/{key}")
        calls.append({"type": "object",
                      "properties": {"name": {"const": fn["name"]}, "arguments": {"$ref": f"#/$defs/{key}"}},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if single:
        schema["maxItems"] = 1
    schema["$defs"] = defs
    strict = all(fn.get("strict", True) is not False for fn in chosen)
    return GrammarSpec.json_schema(schema, strict=strict, param="tools")


def _rebase_refs(node: Any, base: str) -> Any:
    """Copy of a function's parameters schema with its local $refs ('#/...') moved under `base`,
    since it is embedded in a larger schema."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#"):
                out[k] = base + v[1:]
            else:
                out[k] = _rebase_refs(v, base)
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def parse_tool_calls(text: str, tools: Any = None,
                     make_id: Callable[[], str] | None = None) -> list[dict]:
    """Constrained output → OpenAI `tool_calls` ([{id, type: "function", function: {name, arguments}}],
    arguments as a JSON string). Raises ValueError for text that is not a complete call list (an
    output cut by max_tokens, for example)."""
    make_id = make_id or (lambda: f"call_{uuid.uuid4().hex[:24]}")
    try:
        calls = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call output is not complete JSON ({e.msg} at offset {e.pos}); "
                         "was it cut by max_tokens?") from None
    if isinstance(calls, dict):
        calls = [calls]
    names = {f["name"] for f in check_tools(tools)} if tools is not None else None
    out = []
    for c in calls if isinstance(calls, list) else []:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or "arguments" not in c:
            raise ValueError(f"tool call output has an entry without name/arguments: {c!r}")
        if names is not None and c["name"] not in names:
            raise ValueError(f"tool call output names an unknown function {c['name']!r}")
        out.append({"id": make_id(), "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}})
    if not out:
        raise ValueError("tool call output holds no calls")
    return out
