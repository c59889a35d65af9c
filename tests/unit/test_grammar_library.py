"""Every library grammar, by name, on raw strings through xgrammar's matcher: accept and reject."""
from __future__ import annotations

import pytest

from services.grammar import library
from services.grammar.errors import GrammarError
from services.grammar.spec import GrammarSpec
from services.grammar.validate import validate_text

CASES = {
    "json": (['{"a": [1, 2.5e3, "x\\u00e9"], "b": {"c": null, "d": true}}', "[]", '"text"', "-0.5"],
             ['{"a" 1}', "{'a': 1}", "[1, 2,]", "tru"]),
    "json_array": (['[1, "two", {"three": 3}, [4]]', "[]"],
                   ['{"a": 1}', "1", "[1 2]"]),
    "email": (["john.doe@example.com", "a+tag@sub.example.co.uk", "x_y@d-1.io"],
              ["john@@example.com", "@example.com", "john@example", "john doe@example.com", "john@.com"]),
    "url": (["https://example.com", "http://localhost:8000/v1/models?x=1&y=2#top", "https://10.0.0.1/a/b"],
            ["ftp://example.com", "https//example.com", "https://exa mple.com", "example.com"]),
    "iso_date": (["2024-02-29", "1999-12-31", "2023-04-30"],
                 ["2024-02-30", "2023-04-31", "2023-13-01", "2023-1-01", "23-01-01"]),
    "sql_select": (["SELECT * FROM users",
                    "SELECT name, COUNT(*) AS n FROM users AS u JOIN orders ON u.id = orders.user_id "
                    "WHERE u.age >= 18 AND u.name LIKE 'A%' GROUP BY name ORDER BY n DESC LIMIT 10;",
                    "SELECT DISTINCT city FROM t WHERE city IS NOT NULL OR city IN ('x', 'y')"],
                   ["SELECT FROM users", "DELETE FROM users", "SELECT * FROM users WHERE", "select * from t"]),
    "item_list": (["- apples\n", "- apples\n- pears and plums\n"],
                  ["apples\n", "- apples", "- \n", "* apples\n"]),
    "arithmetic": (["1+2", "(1 + 2) * -3.5 / 4", "((7))", "-2*-2"],
                   ["1 + + 2", "(1 + 2", "1 +", "a + 1", "1  + 2"]),
}


def test_every_library_grammar_has_cases():
    assert set(CASES) == set(library.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_accepts_and_rejects(name):
    spec = GrammarSpec.builtin(name)
    good, bad = CASES[name]
    for text in good:
        result = validate_text(spec, text)
        assert result.ok, f"{name} should accept {text!r}: {result.message}"
    for text in bad:
        result = validate_text(spec, text)
        assert not result.ok, f"{name} should reject {text!r}"
        assert result.offset is not None and 0 <= result.offset <= len(text)


def test_failure_position():
    r = validate_text(GrammarSpec.builtin("iso_date"), "2024-02-30")
    assert (r.offset, r.line, r.column) == (8, 1, 9)
    r = validate_text(GrammarSpec.builtin("item_list"), "- a\n- b")
    assert r.offset == 7 and "before the grammar is complete" in r.message
    r = validate_text(GrammarSpec.builtin("item_list"), "- a\nb\n")
    assert (r.line, r.column) == (2, 1)


def test_unknown_name_lists_the_library():
    with pytest.raises(GrammarError, match="available: arithmetic, email"):
        validate_text(GrammarSpec.builtin("yaml"), "x")
