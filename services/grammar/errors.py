"""Errors of the grammar service: every one is a ValueError that the gateway turns into a 400.

`param` names the request field at fault (OpenAI's error shape has a `param`); `line`/`column`
(1-based, GBNF) or `offset` (0-based character offset, regex / JSON / validated text) say where.
Messages never carry xgrammar's C++ file prefixes.
"""
from __future__ import annotations

import re

# xgrammar prefixes errors with "[17:40:12] /project/cpp/grammar_parser.cc:820: ".
_CPP_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?\S+\.(cc|h|cpp):\d+:\s*")
_LINE_COL = re.compile(r"line (\d+), column (\d+)")
_POSITION = re.compile(r"at position (\d+)")


class GrammarError(ValueError):
    """An invalid or over-limit grammar spec. str(e) is safe to show to the user."""

    def __init__(self, message: str, *, param: str | None = None, line: int | None = None,
                 column: int | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.line = line
        self.column = column
        self.offset = offset

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": self.message, "param": self.param,
                "line": self.line, "column": self.column, "offset": self.offset}

    @staticmethod
    def from_dict(d: dict) -> "GrammarError":
        cls = {"GrammarTimeoutError": GrammarTimeoutError, "GrammarLimitError": GrammarLimitError}.get(
            d.get("type"), GrammarError)
        return cls(d["message"], param=d.get("param"), line=d.get("line"), column=d.get("column"),
                   offset=d.get("offset"))


class GrammarBusyError(RuntimeError):
    """No compile worker could take the spec in time. Not the spec's fault: never cached, and the
    caller answers 503 / UNAVAILABLE (a retry may succeed)."""


class GrammarLimitError(GrammarError):
    """The spec is valid but past a configured limit (size, nesting, repetition, count)."""


class GrammarTimeoutError(GrammarLimitError):
    """Compilation ran past the compile-time limit and was stopped."""


def clean_xgrammar_message(raw: str) -> str:
    """xgrammar's RuntimeError text without the C++ location prefix and trailing whitespace."""
    lines = [ln for ln in str(raw).strip().splitlines() if ln.strip()]
    first = _CPP_PREFIX.sub("", lines[0]) if lines else "invalid grammar"
    first = first.replace("Check failed: (error.empty()) is false: ", "")
    # xgrammar echoes the whole schema after a JSON parse error; the user sent it, keep it short.
    first = first.split(" The JSON string is:")[0]
    return first.strip()


def from_xgrammar(exc: BaseException, *, param: str | None,
                  column_shift: "callable | None" = None) -> GrammarError:
    """Map an xgrammar exception to a GrammarError with line/column or offset when it gives them."""
    msg = clean_xgrammar_message(str(exc))
    line = column = offset = None
    if m := _LINE_COL.search(msg):
        line, column = int(m.group(1)), int(m.group(2))
        if column_shift is not None:
            fixed = column_shift(line, column)
            if fixed != column:
                msg = msg.replace(m.group(0), f"line {line}, column {fixed}")
                column = fixed
    elif m := _POSITION.search(msg):
        offset = int(m.group(1))
    where = f" ({param})" if param else ""
    return GrammarError(f"invalid grammar{where}: {msg}", param=param, line=line, column=column,
                        offset=offset)
