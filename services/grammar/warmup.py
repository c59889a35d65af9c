"""The warm-up set: specs a compile worker compiles for itself, in idle time, right after start.

They fill xgrammar's rule-level cache (compiler.py) with the token masks that everyday schemas
are made of, so a new schema built from them compiles in milliseconds instead of seconds:
- JSON building blocks: strings, numbers, integers, booleans, null, enums, arrays, nested and
  free-form objects (json_object), both whitespace modes;
- bounded strings `maxLength` 1..MAX_UNROLLED, one more each step: each step adds one state, one
  vocabulary walk (about 70 ms at 128k tokens on an idle core), and `maxLength: n` warms every
  n' <= n in any schema. A request that arrives mid-warm-up waits for the step in progress;
- common `format`s (email, uri and hostname take about 0.3-2 s each at 128k tokens);
- the library grammars, last: each is one fixed spec, but email's and url's bounded repetitions
  ({0,61}, {2,63}) take seconds at 128k tokens, past the compile deadline on a slow core.

Not covered, measured in loadtest/bench_grammar.py: `minLength` (each (minLength, maxLength) pair
adds states of its own, about 0.2-0.4 s per pair at 128k tokens: too many pairs to warm),
`maxLength` above MAX_UNROLLED (xgrammar's repeat node: about 7 s per length, not shared between
lengths), `pattern`s. These compile cold the first time and are then served by the compile cache
(memory, Redis).
"""
from __future__ import annotations

from collections.abc import Iterator

from services.grammar import library
from services.grammar.spec import GrammarSpec

# xgrammar 0.2.8 unrolls bounded repetitions up to 128; above that it switches to a repeat node.
MAX_UNROLLED = 128
# Cheapest first.
FORMATS = ("date", "time", "date-time", "uuid", "ipv4", "ipv6", "hostname", "email", "uri")

_BLOCKS = {"type": "object", "properties": {
    "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
    "z": {"type": "null"}, "e": {"enum": ["a", "b"]}, "a": {"type": "array", "items": {"type": "string"}},
    "ai": {"type": "array", "items": {"type": "integer"}, "maxItems": 8},
    "o": {"type": "object", "properties": {"x": {"type": "string"}}}}, "required": ["s"]}


def _string(**bounds: int) -> GrammarSpec:
    return GrammarSpec.json_schema({"type": "object", "properties": {"s": {"type": "string", **bounds}},
                                    "required": ["s"]})


def warmup_specs(max_length: int = MAX_UNROLLED) -> Iterator[GrammarSpec]:
    """In priority order, each spec a small step on top of the ones before it."""
    for any_whitespace in (False, True):
        yield GrammarSpec.json_schema(_BLOCKS, any_whitespace=any_whitespace)
        yield GrammarSpec.json_object(any_whitespace=any_whitespace)
    for n in range(1, max_length + 1):
        yield _string(maxLength=n)
    for fmt in FORMATS:
        yield GrammarSpec.json_schema({"type": "string", "format": fmt})
    for name in library.names():
        yield GrammarSpec.builtin(name)
