"""llama.cpp GBNF → what xgrammar's EBNF parser accepts.

llama.cpp allows empty alternatives (`ws ::= | " " ws`, `x ::= "a" |`, `( "a" | )`); xgrammar
rejects them ("Expect element"). We insert `""` there. Columns in xgrammar's errors refer to the
normalised text; `ColumnMap` maps them back to the user's text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_RULE_START = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\s*::=")
_EMPTY = '""'


@dataclass(slots=True)
class ColumnMap:
    inserted: dict[int, list[int]] = field(default_factory=dict)   # line -> original columns (1-based)

    def to_original(self, line: int, column: int) -> int:
        shift = sum(len(_EMPTY) for c in self.inserted.get(line, []) if c < column)
        return max(1, column - shift)


def normalize_gbnf(text: str) -> tuple[str, ColumnMap]:
    """Insert `""` for every empty alternative; leaves strings, classes and comments untouched."""
    out: list[str] = []
    cmap = ColumnMap()
    line, col = 1, 1
    # True right after `::=`, `(` or `|`: the next significant token must be an element.
    expect_element = False
    anchor = (0, 1, 1)            # where an empty alternative goes: (index in out, line, column)
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r":
            out.append(ch)
            i, col = i + 1, col + 1
            continue
        if ch == "\n":
            out.append(ch)
            i, line, col = i + 1, line + 1, 1
            continue
        if ch == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            col += j - i
            i = j
            continue
        empty_here = expect_element and (ch in "|)" or _RULE_START.match(text, i))
        if empty_here:
            _insert(out, cmap, anchor)
        if text.startswith("::=", i):
            tok = "::="
            expect_element = True
        elif ch in "(|":
            tok = ch
            expect_element = True
        elif ch == '"':
            tok = text[i:_skip(text, i, '"')]
            expect_element = False
        elif ch == "[":
            tok = text[i:_skip(text, i, "]")]
            expect_element = False
        else:
            tok = ch
            expect_element = False
        out.append(tok)
        nl = tok.count("\n")
        if nl:
            line, col = line + nl, len(tok) - tok.rfind("\n")
        else:
            col += len(tok)
        i += len(tok)
        if expect_element:
            anchor = (len(out), line, col)
    if expect_element:
        _insert(out, cmap, anchor)
    return "".join(out), cmap


def _insert(out: list[str], cmap: ColumnMap, anchor: tuple[int, int, int]) -> None:
    """Put `""` right after the `|`/`(`/`::=` (not after the newline that may follow it)."""
    index, line, col = anchor
    out.insert(index, _EMPTY)
    cmap.inserted.setdefault(line, []).append(col)


def _skip(text: str, i: int, close: str) -> int:
    """Index just past the literal starting at i (a "string" or a [class]), honouring escapes."""
    j = i + 1
    while j < len(text) and text[j] != close:
        j += 2 if text[j] == "\\" else 1
    return min(j + 1, len(text))
