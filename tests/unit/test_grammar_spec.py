"""GrammarSpec identity and transport, the pre-compile limits, and llama.cpp GBNF normalisation."""
from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from services.grammar.errors import GrammarError, GrammarLimitError, clean_xgrammar_message
from services.grammar.gbnf import normalize_gbnf
from services.grammar.limits import check_limits
from services.grammar.spec import GrammarLimits, GrammarSpec
from services.grammar.validate import accepts, validate_text

LIMITS = GrammarLimits()

# llama.cpp's grammars/json.gbnf, verbatim: xgrammar rejects its `ws ::= | ...` as it is.
LLAMA_CPP_JSON = r'''root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
'''


def test_hash_is_stable_and_ignores_param():
    a = GrammarSpec.json_schema({"type": "object", "properties": {"b": {}, "a": {}}}, param="response_format")
    b = GrammarSpec.json_schema('{"type": "object",\n "properties": {"b": {}, "a": {}}}')
    assert a.spec_hash == b.spec_hash and a == b
    # Property order is generation order: a different order is a different grammar.
    c = GrammarSpec.json_schema({"type": "object", "properties": {"a": {}, "b": {}}})
    assert c.spec_hash != a.spec_hash
    assert GrammarSpec.json_schema({"type": "object"}, strict=False).spec_hash != \
        GrammarSpec.json_schema({"type": "object"}).spec_hash
    # Pinned: the hash is a Redis key shared by every replica and version of this code.
    assert GrammarSpec.regex("a+").spec_hash == GrammarSpec.from_dict({"kind": "regex", "text": "a+"}).spec_hash
    assert len(GrammarSpec.regex("a+").spec_hash) == 64


@pytest.mark.parametrize("spec", [
    GrammarSpec.gbnf('root ::= "a"'), GrammarSpec.regex(r"\d+"), GrammarSpec.choice(["x", "y"]),
    GrammarSpec.json_object(), GrammarSpec.builtin("email"),
    GrammarSpec.json_schema({"type": "integer"}, strict=False, any_whitespace=True, param="p")])
def test_dict_round_trip(spec):
    back = GrammarSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.spec_hash == spec.spec_hash and back.param == spec.param


@pytest.mark.parametrize("build, words", [
    (lambda: GrammarSpec("yaml", "x"), "unknown grammar kind"),
    (lambda: GrammarSpec.choice([]), "non-empty list"),
    (lambda: GrammarSpec.choice(["a", ""]), "non-empty string"),
    (lambda: GrammarSpec.regex(""), "non-empty text"),
    (lambda: GrammarSpec.json_schema("{bad"), "line 1, column 2"),
    (lambda: GrammarSpec.json_schema([1, 2]), "object or a boolean"),
    (lambda: GrammarSpec.from_dict({"kind": "regex", "text": "a", "colour": 1}), "unknown fields"),
    (lambda: GrammarSpec.from_dict({"kind": "json_object", "strict": "yes"}), "must be a boolean"),
])
def test_bad_specs_say_what_is_wrong(build, words):
    with pytest.raises(GrammarError, match=words):
        build()


def test_size_limit_rejects_a_100kb_schema():
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 40}
                                               for i in range(1500)}}
    assert len(json.dumps(schema)) > 100_000
    with pytest.raises(GrammarLimitError, match="bytes; the limit is 65536 bytes"):
        check_limits(GrammarSpec.json_schema(schema), LIMITS)


def test_nesting_limits():
    with pytest.raises(GrammarLimitError, match="parentheses nested more than 64") as e:
        check_limits(GrammarSpec.gbnf("root ::= " + "(" * 30000 + '"a"' + ")" * 30000), LIMITS)
    assert e.value.offset is not None
    check_limits(GrammarSpec.gbnf("root ::= " + "(" * 10 + '"a"' + ")" * 10), LIMITS)
    deep: dict = {"type": "integer"}
    for _ in range(70):
        deep = {"type": "array", "items": deep}
    with pytest.raises(GrammarLimitError, match="schema nested more than 64"):
        check_limits(GrammarSpec.json_schema(deep), LIMITS)
    # Parentheses inside strings, classes and comments are text, not nesting.
    check_limits(GrammarSpec.gbnf('root ::= "' + "(" * 100 + '" [(] # ' + "(" * 100), LIMITS)


@pytest.mark.parametrize("pattern, ok", [
    (r"\d{4}-\d{2}-\d{2}", True), ("[a-z]{1,100000}", False), ("(a{100}){100}", False),
    ("(a{10}){10}", True), ("x{3000}", False), ("[{]{5000}", False), ("(ab|cd)+", True)])
def test_repetition_limit(pattern, ok):
    if ok:
        check_limits(GrammarSpec.regex(pattern), LIMITS)
    else:
        with pytest.raises(GrammarLimitError, match="use \\*, \\+ or smaller bounds"):
            check_limits(GrammarSpec.regex(pattern), LIMITS)


def test_schema_bounds_and_patterns_are_limited():
    with pytest.raises(GrammarLimitError, match="maxLength=100000"):
        check_limits(GrammarSpec.json_schema({"type": "string", "maxLength": 100000}), LIMITS)
    with pytest.raises(GrammarLimitError, match="bounded repetition"):
        check_limits(GrammarSpec.json_schema({"type": "string", "pattern": "[a-z]{1,99999}"}), LIMITS)


@pytest.mark.parametrize("schema, finite", [
    ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
                                          "required": ["x"]}}}, False),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}, False),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}}}}, True),
    ({"$ref": "#/$defs/t", "$defs": {"t": {"anyOf": [{"type": "null"}, {"type": "array", "minItems": 1,
                                                                       "items": {"$ref": "#/$defs/t"}}]}}}, True),
    ({"$ref": "#/$defs/t", "$defs": {"t": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/t"}}}}, False),
    ({"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]}, True),
])
def test_recursive_ref_needs_a_base_case(schema, finite):
    spec = GrammarSpec.json_schema(schema)
    if finite:
        check_limits(spec, LIMITS)
    else:
        with pytest.raises(GrammarError, match="has no base case"):
            check_limits(spec, LIMITS)


def test_unresolvable_and_remote_refs():
    with pytest.raises(GrammarError, match="does not resolve"):
        check_limits(GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), LIMITS)
    with pytest.raises(GrammarError, match="only local"):
        check_limits(GrammarSpec.json_schema({"$ref": "https://example.com/s.json"}), LIMITS)


def test_llama_cpp_json_grammar_is_accepted_after_normalisation():
    with pytest.raises(RuntimeError, match="Expect element"):
        xgr.Grammar.from_ebnf(LLAMA_CPP_JSON)
    text, _ = normalize_gbnf(LLAMA_CPP_JSON)
    xgr.Grammar.from_ebnf(text)
    spec = GrammarSpec.gbnf(LLAMA_CPP_JSON)
    assert accepts(spec, '{"a": [1, 2.5, "x\\n"], "b": {"c": null}}')
    assert not accepts(spec, '{"a": [1, 2.5,]}')


@pytest.mark.parametrize("grammar, accepted, rejected", [
    ('root ::= "a" ws\nws ::= | " " ws', ["a", "a  "], ["a b"]),
    ('root ::= ( "x" | ) "y"', ["xy", "y"], ["x"]),
    ('root ::= "x" tail\ntail ::= "z" |\nother ::= "q"', ["x", "xz"], ["xq"]),
    ('root ::= "[|" [|)] "(" # a comment with | and (\n  "e"', ["[||(e", "[|)(e"], ["[|(e"]),
])
def test_empty_alternatives(grammar, accepted, rejected):
    spec = GrammarSpec.gbnf(grammar)
    assert all(accepts(spec, s) for s in accepted)
    assert not any(accepts(spec, s) for s in rejected)


def test_error_columns_refer_to_the_users_text():
    # `""` inserted before the error on the same line must not shift the reported column.
    grammar = 'root ::= | "a" b'
    with pytest.raises(GrammarError) as e:
        validate_text(GrammarSpec.gbnf(grammar), "a")
    assert (e.value.line, e.value.column) == (1, 16)
    assert grammar[e.value.column - 1] == "b"
    assert ".cc" not in str(e.value) and "/project" not in str(e.value)
    assert 'Rule "b" is not defined' in str(e.value)


def test_clean_xgrammar_message():
    raw = "[17:40:12] /project/cpp/json_schema_converter.cc:4939: Check failed: (error.empty()) is false: " \
          "Failed to parse JSON: syntax error. The JSON string is:{\"type\": "
    assert clean_xgrammar_message(raw) == "Failed to parse JSON: syntax error."


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_choices"):
        GrammarLimits(max_choices=0)
    with pytest.raises(ValueError, match="compile_timeout_s"):
        GrammarLimits(compile_timeout_s=0)
    with pytest.raises(GrammarLimitError, match="choices; the limit is 2"):
        check_limits(GrammarSpec.choice(["a", "b", "c"]), GrammarLimits(max_choices=2))
