"""GrammarSpec: what a request asks the output to match, independent of any tokenizer.

A spec is small, immutable and hashable; `spec_hash` is stable across processes and versions of
this code (it is part of the compile-cache key in Redis). JSON Schemas are kept as compact JSON
text with their key order intact, since the order of properties is the order they are generated;
they are hashed (and compiled) in canonical form (canonical.py: no annotations, keywords sorted),
so schemas that differ only in titles or descriptions share one compilation.

    GrammarSpec.json_schema({"type": "object", ...})   GrammarSpec.gbnf('root ::= "yes" | "no"')
    GrammarSpec.regex(r"\\d{4}-\\d{2}-\\d{2}")           GrammarSpec.choice(["red", "green"])
    GrammarSpec.json_object()                          GrammarSpec.builtin("email")   # library/
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from services.grammar.canonical import canonical_schema_text
from services.grammar.errors import GrammarError

KINDS = ("gbnf", "json_schema", "json_object", "regex", "choice", "builtin")
# Bump when the meaning of a spec's fields changes: old cache entries then simply miss.
SPEC_VERSION = 1


@dataclass(slots=True, frozen=True)
class GrammarLimits:
    """Bounds that keep one request from taking a compiler (or a replica) down."""
    max_spec_bytes: int = 64 * 1024      # the grammar / schema / regex text, UTF-8
    max_nesting_depth: int = 64          # parentheses (GBNF, regex) or JSON nesting (schemas)
    max_repetition: int = 2048           # {m,n} bounds, multiplied when nested; maxLength & co.
    max_choices: int = 1024
    compile_timeout_s: float = 1.5       # a compile past this is stopped (worker process killed)

    def __post_init__(self) -> None:
        for name in ("max_spec_bytes", "max_nesting_depth", "max_repetition", "max_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"GrammarLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.compile_timeout_s <= 600.0:
            raise ValueError(f"GrammarLimits.compile_timeout_s must be in (0, 600], got {self.compile_timeout_s}")


@dataclass(slots=True, frozen=True)
class GrammarSpec:
    kind: str
    text: str | None = None                  # GBNF, schema JSON, regex or library name
    choices: tuple[str, ...] | None = None   # kind == "choice"
    any_whitespace: bool = False             # JSON: True lets a weak model emit endless spaces
    strict: bool = True                      # JSON Schema: no properties/items beyond the schema
    # The request field the spec came from, for error messages; not part of the identity.
    param: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        p = self.param or "grammar"
        if self.kind not in KINDS:
            raise GrammarError(f"{p}: unknown grammar kind {self.kind!r}; use one of {', '.join(KINDS)}",
                               param=p)
        if self.kind == "choice":
            if not self.choices or self.text is not None:
                raise GrammarError(f"{p}: a choice spec needs a non-empty list of strings", param=p)
            if not all(isinstance(c, str) and c for c in self.choices):
                raise GrammarError(f"{p}: every choice must be a non-empty string", param=p)
        elif self.kind == "json_object":
            if self.text is not None or self.choices is not None:
                raise GrammarError(f"{p}: json_object takes no text", param=p)
        else:
            if not isinstance(self.text, str) or not self.text.strip():
                raise GrammarError(f"{p}: a {self.kind} spec needs non-empty text", param=p)
            if self.choices is not None:
                raise GrammarError(f"{p}: only choice specs have choices", param=p)

    # --- constructors ---------------------------------------------------------------------------
    @staticmethod
    def gbnf(text: str, *, param: str | None = None) -> "GrammarSpec":
        return GrammarSpec("gbnf", text, param=param)

    @staticmethod
    def regex(pattern: str, *, param: str | None = None) -> "GrammarSpec":
        return GrammarSpec("regex", pattern, param=param)

    @staticmethod
    def choice(choices: list[str] | tuple[str, ...], *, param: str | None = None) -> "GrammarSpec":
        if isinstance(choices, str) or not isinstance(choices, (list, tuple)):
            raise GrammarError(f"{param or 'choice'}: must be a list of strings", param=param or "choice")
        return GrammarSpec("choice", choices=tuple(choices), param=param)

    @staticmethod
    def json_object(*, any_whitespace: bool = False, param: str | None = None) -> "GrammarSpec":
        return GrammarSpec("json_object", any_whitespace=any_whitespace, param=param)

    @staticmethod
    def builtin(name: str, *, param: str | None = None) -> "GrammarSpec":
        return GrammarSpec("builtin", name, param=param)

    @staticmethod
    def json_schema(schema: dict | bool | str, *, strict: bool = True, any_whitespace: bool = False,
                    param: str | None = None) -> "GrammarSpec":
        """`schema` as a dict/bool or as JSON text; stored as compact JSON (key order kept)."""
        p = param or "json_schema"
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"{p}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
                                   param=p, line=e.lineno, column=e.colno, offset=e.pos) from None
            except RecursionError:
                raise GrammarError(f"{p}: JSON nested too deeply", param=p) from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"{p}: a JSON Schema must be an object or a boolean, "
                               f"got {type(schema).__name__}", param=p)
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (ValueError, RecursionError, TypeError) as e:
            raise GrammarError(f"{p}: schema is not serialisable as JSON: {e}", param=p) from None
        return GrammarSpec("json_schema", text, strict=strict, any_whitespace=any_whitespace, param=p)

    # --- identity and transport -----------------------------------------------------------------
    @property
    def spec_hash(self) -> str:
        """Stable identity (hex sha256) of what the spec matches; excludes `param`."""
        text = canonical_schema_text(self.text) if self.kind == "json_schema" else self.text
        ident = json.dumps([SPEC_VERSION, self.kind, text, list(self.choices or ()),
                            self.any_whitespace, self.strict], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(ident.encode()).hexdigest()

    @property
    def schema(self) -> Any:
        """The parsed JSON Schema (json_schema specs only)."""
        assert self.kind == "json_schema"
        return json.loads(self.text)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"kind": self.kind}
        if self.text is not None:
            d["text"] = self.text
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.kind in ("json_schema", "json_object"):
            d["any_whitespace"] = self.any_whitespace
            d["strict"] = self.strict
        if self.param is not None:
            d["param"] = self.param
        return d

    @staticmethod
    def from_dict(d: Any) -> "GrammarSpec":
        if isinstance(d, GrammarSpec):
            return d
        if not isinstance(d, dict) or "kind" not in d:
            raise GrammarError("grammar spec must be an object with a 'kind'", param="grammar")
        unknown = set(d) - {"kind", "text", "choices", "any_whitespace", "strict", "param"}
        if unknown:
            raise GrammarError(f"grammar spec has unknown fields {sorted(unknown)}", param="grammar")
        for name in ("any_whitespace", "strict"):
            if name in d and not isinstance(d[name], bool):
                raise GrammarError(f"grammar spec field {name} must be a boolean", param=name)
        if d.get("text") is not None and not isinstance(d["text"], str):
            raise GrammarError("grammar spec field text must be a string", param="grammar")
        choices = d.get("choices")
        if choices is not None and (isinstance(choices, str) or not isinstance(choices, (list, tuple))):
            raise GrammarError("grammar spec field choices must be a list of strings", param="choice")
        return GrammarSpec(d["kind"], d.get("text"), tuple(choices) if choices is not None else None,
                           d.get("any_whitespace", False), d.get("strict", True), d.get("param"))

    def describe(self) -> str:
        """A short, log-safe description (no user text)."""
        return f"{self.kind}:{self.spec_hash[:12]}"
