"""Check a finished text against a spec and say where it fails (no tokenizer needed).

Grammars are compiled against an empty vocabulary (cheap: no token masks) and fed the text one
character at a time, so the first character the grammar cannot take is the failure offset.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import xgrammar as xgr

from services.grammar.compiler import compile_spec
from services.grammar.spec import GrammarLimits, GrammarSpec

_LOCK = threading.Lock()
_COMPILER: xgr.GrammarCompiler | None = None
_GRAMMARS: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
_MAX_GRAMMARS = 256


@dataclass(slots=True, frozen=True)
class ValidationResult:
    ok: bool
    offset: int | None = None       # 0-based character offset of the failure
    line: int | None = None         # 1-based
    column: int | None = None       # 1-based
    message: str | None = None

    def to_dict(self) -> dict:
        return {"ok": self.ok, "offset": self.offset, "line": self.line, "column": self.column,
                "message": self.message}


def raw_string_grammar(spec: GrammarSpec, limits: GrammarLimits | None = None) -> xgr.CompiledGrammar:
    """The spec compiled against an empty vocabulary, cached by spec hash. Raises GrammarError."""
    global _COMPILER
    key = spec.spec_hash
    with _LOCK:
        if _COMPILER is None:
            _COMPILER = xgr.GrammarCompiler(xgr.TokenizerInfo([]), max_threads=1, cache_enabled=False)
        hit = _GRAMMARS.get(key)
        if hit is not None:
            _GRAMMARS.move_to_end(key)
            return hit
        compiled = compile_spec(_COMPILER, spec, limits or GrammarLimits())
        _GRAMMARS[key] = compiled
        if len(_GRAMMARS) > _MAX_GRAMMARS:
            _GRAMMARS.popitem(last=False)
        return compiled


def validate_text(spec: GrammarSpec, text: str, limits: GrammarLimits | None = None) -> ValidationResult:
    matcher = xgr.GrammarMatcher(raw_string_grammar(spec, limits), terminate_without_stop_token=True)
    for i, ch in enumerate(text):
        if not matcher.accept_string(ch):
            line = text.count("\n", 0, i) + 1
            column = i - (text.rfind("\n", 0, i) + 1) + 1
            why = "after the grammar is complete" if matcher.is_completed() else "not allowed here"
            return ValidationResult(False, i, line, column,
                                    f"unexpected {ch!r} at offset {i} (line {line}, column {column}): {why}")
    if not matcher.is_completed():
        line = text.count("\n") + 1
        column = len(text) - (text.rfind("\n") + 1) + 1
        return ValidationResult(False, len(text), line, column,
                                f"the text ends at offset {len(text)} before the grammar is complete")
    return ValidationResult(True)


def accepts(spec: GrammarSpec, text: str) -> bool:
    return validate_text(spec, text).ok
