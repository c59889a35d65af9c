"""Request fields → GrammarSpec (spec_from_openai / spec_from_structured) and tool calling."""
from __future__ import annotations

import json

import pytest

from services.grammar.api import spec_from_openai, spec_from_structured
from services.grammar.errors import GrammarError
from services.grammar.spec import GrammarSpec
from services.grammar.tools import parse_tool_calls, tools_to_spec
from services.grammar.validate import validate_text

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"$ref": "#/$defs/query"}},
                                     "required": ["q"], "$defs": {"query": {"type": "string", "maxLength": 50}}}}}
TOOLS = [WEATHER, SEARCH]


def test_each_field_maps_to_its_kind():
    assert spec_from_openai() is None
    assert spec_from_openai(response_format={"type": "text"}) is None
    assert spec_from_openai(response_format={"type": "json_object"}).kind == "json_object"
    s = spec_from_openai(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    assert (s.kind, s.strict, s.param) == ("json_schema", True, "response_format")
    s2 = spec_from_openai(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})}})
    assert s2.spec_hash == s.spec_hash   # gRPC carries the schema as text
    assert spec_from_openai(grammar='root ::= "a"').kind == "gbnf"
    assert spec_from_openai(grammar={"name": "email"}) == GrammarSpec.builtin("email")
    assert spec_from_openai(regex="a+").kind == "regex"
    assert spec_from_openai(choice=["a", "b"]).choices == ("a", "b")
    assert spec_from_openai(tools=TOOLS, tool_choice="auto") is None
    assert spec_from_openai(tools=TOOLS, tool_choice="required").kind == "json_schema"


@pytest.mark.parametrize("kwargs, param", [
    (dict(regex="a", choice=["x"]), "choice"),
    (dict(response_format={"type": "json_object"}, grammar='root ::= "a"'), "grammar"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": "{oops"}}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}), "response_format"),
    (dict(grammar=42), "grammar"),
    (dict(grammar={"name": "nope"}), "grammar"),
    (dict(regex=""), "regex"),
    (dict(choice="red"), "choice"),
    (dict(choice=["a", 1]), "choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function"}], tool_choice="required"), "tools"),
    (dict(tools=[WEATHER, WEATHER], tool_choice="required"), "tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
])
def test_bad_fields_name_the_param(kwargs, param):
    with pytest.raises(GrammarError) as e:
        spec_from_openai(**kwargs)
    assert isinstance(e.value, ValueError) and e.value.param == param


def test_structured_wire_form():
    assert spec_from_structured({"kind": "json_object", "spec": None}).kind == "json_object"
    assert spec_from_structured({"kind": "grammar", "spec": 'root ::= "a"'}).kind == "gbnf"
    assert spec_from_structured({"kind": "regex", "spec": "a+"}).text == "a+"
    assert spec_from_structured({"kind": "choice", "spec": ["x"]}).choices == ("x",)
    assert spec_from_structured({"kind": "json_schema", "spec": {"type": "integer"}}).kind == "json_schema"
    spec = GrammarSpec.builtin("url")
    assert spec_from_structured(spec.to_dict()) == spec
    with pytest.raises(GrammarError, match="unknown structured output kind"):
        spec_from_structured({"kind": "xml", "spec": "<a/>"})


def test_required_tools_accept_calls_to_any_function_and_parse_back():
    spec = tools_to_spec(TOOLS, "required")
    out = '[{"name": "search", "arguments": {"q": "rain"}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert validate_text(spec, out).ok
    assert not validate_text(spec, '[]').ok                                       # at least one call
    assert not validate_text(spec, '[{"name": "fly", "arguments": {}}]').ok       # only known functions
    assert not validate_text(spec, '[{"name": "get_weather", "arguments": {}}]').ok   # required args
    ids = iter(["call_1", "call_2"])
    calls = parse_tool_calls(out, TOOLS, make_id=lambda: next(ids))
    assert calls == [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "rain"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]


def test_named_function_allows_one_call_of_it():
    spec = tools_to_spec(TOOLS, {"type": "function", "function": {"name": "search"}})
    assert validate_text(spec, '[{"name": "search", "arguments": {"q": "x"}}]').ok
    assert not validate_text(spec, '[{"name": "get_weather", "arguments": {"city": "x"}}]').ok
    two = '[{"name": "search", "arguments": {"q": "x"}}, {"name": "search", "arguments": {"q": "y"}}]'
    assert not validate_text(spec, two).ok
    # $refs inside a function's parameters still resolve once embedded (maxLength 50 applies).
    assert not validate_text(spec, '[{"name": "search", "arguments": {"q": "' + "x" * 51 + '"}}]').ok


def test_parallel_tool_calls_false_allows_one():
    spec = tools_to_spec(TOOLS, "required", parallel_tool_calls=False)
    two = '[{"name": "search", "arguments": {"q": "x"}}, {"name": "search", "arguments": {"q": "y"}}]'
    assert not validate_text(spec, two).ok


def test_parse_rejects_incomplete_output():
    with pytest.raises(ValueError, match="cut by max_tokens"):
        parse_tool_calls('[{"name": "search", "argu', TOOLS)
    with pytest.raises(ValueError, match="unknown function"):
        parse_tool_calls('[{"name": "fly", "arguments": {}}]', TOOLS)
