"""Tested grammars usable by name: GrammarSpec.builtin("email"), or {"grammar": {"name": "email"}}.

Each entry is a file here (GBNF, regex or JSON Schema) or a fixed spec; tests/unit/test_grammar_library.py
checks accept/reject examples for every one with xgrammar's matcher on raw strings.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from services.grammar.errors import GrammarError
from services.grammar.spec import GrammarSpec

_DIR = Path(__file__).resolve().parent

# name -> (kind, file in this folder, or inline text for tiny specs)
ENTRIES: dict[str, tuple[str, str]] = {
    "json": ("json_schema", "{}"),                          # any JSON value
    "json_array": ("json_schema", "@json_array.schema.json"),
    "email": ("regex", "@email.regex"),
    "url": ("regex", "@url.regex"),
    "iso_date": ("regex", "@iso_date.regex"),
    "sql_select": ("gbnf", "@sql_select.gbnf"),
    "item_list": ("gbnf", "@item_list.gbnf"),
    "arithmetic": ("gbnf", "@arithmetic.gbnf"),
}


def names() -> list[str]:
    return sorted(ENTRIES)


@cache
def _load(name: str) -> GrammarSpec:
    kind, src = ENTRIES[name]
    text = (_DIR / src[1:]).read_text().strip() if src.startswith("@") else src
    if kind == "json_schema":
        # Library JSON grammars accept any extra properties/items the schema does not name.
        return GrammarSpec.json_schema(json.loads(text), strict=False)
    return GrammarSpec(kind, text)


def get(name: str | None, *, param: str | None = None) -> GrammarSpec:
    if name not in ENTRIES:
        p = param or "grammar"
        raise GrammarError(f"{p}: no library grammar named {name!r}; available: {', '.join(names())}",
                           param=p)
    return _load(name)
