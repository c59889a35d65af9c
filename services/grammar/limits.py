"""Cheap checks run before any compile: size, nesting depth, expanded repetition, $ref cycles.

These reject the inputs that would make xgrammar slow or unbounded (a 100 KB schema, 30,000
nested parentheses, `[a-z]{1,100000}`, a `$ref` cycle with no way out) in microseconds, with a
message that says what to change. Whatever slips through is stopped by the compile timeout.
"""
from __future__ import annotations

import re
from typing import Any

from services.grammar.errors import GrammarError, GrammarLimitError
from services.grammar.spec import GrammarLimits, GrammarSpec

_QUANT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_BOUND_KEYS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties")


def check_limits(spec: GrammarSpec, limits: GrammarLimits) -> None:
    p = spec.param or spec.kind
    size = len(spec.text.encode()) if spec.text else sum(len(c.encode()) for c in spec.choices or ())
    if size > limits.max_spec_bytes:
        raise GrammarLimitError(f"{p}: the {spec.kind} is {size} bytes; the limit is "
                                f"{limits.max_spec_bytes} bytes", param=p)
    if spec.kind == "choice" and len(spec.choices) > limits.max_choices:
        raise GrammarLimitError(f"{p}: {len(spec.choices)} choices; the limit is {limits.max_choices}",
                                param=p)
    if spec.kind in ("gbnf", "regex"):
        check_pattern(spec.text, limits, p, gbnf=spec.kind == "gbnf")
    elif spec.kind == "json_schema":
        check_schema(spec.schema, limits, p)


def check_pattern(text: str, limits: GrammarLimits, param: str, *, gbnf: bool) -> None:
    """Paren depth, and how much bounded repetitions add once unrolled (`x{m,n}` adds about
    size(x) * (n - 1) elements; nested bounds multiply), summed over the pattern."""
    # One frame per open paren: [expanded size of its sequence, expanded size of its last atom].
    stack: list[list[int]] = [[0, 0]]
    added = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        atom = None
        if ch == "\\":
            i, atom = i + 2, 1
        elif ch == "[":
            i, atom = _skip_class(text, i), 1
        elif gbnf and ch == '"':
            i, atom = _skip_string(text, i), 1
        elif gbnf and ch == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif ch == "(":
            stack.append([0, 0])
            if len(stack) - 1 > limits.max_nesting_depth:
                raise GrammarLimitError(f"{param}: parentheses nested more than {limits.max_nesting_depth} "
                                        f"deep (at offset {i})", param=param, offset=i)
            i += 1
        elif ch == ")" and len(stack) > 1:
            inner = stack.pop()
            i, atom = i + 1, max(inner[0], 1)
        elif ch == "{" and (m := _QUANT.match(text, i)):
            lo, hi = int(m.group(1)), m.group(2)
            bound = max(lo, int(hi)) if hi else lo
            frame = stack[-1]
            grow = frame[1] * max(bound - 1, 0)
            frame[0] += grow
            frame[1] += grow
            added += grow
            if added > limits.max_repetition:
                raise GrammarLimitError(
                    f"{param}: bounded repetition {m.group(0)} (at offset {i}) unrolls to about {added} "
                    f"extra elements; the limit is {limits.max_repetition}: use *, + or smaller bounds",
                    param=param, offset=i)
            i = m.end()
        else:
            i, atom = i + 1, (1 if not ch.isspace() and ch != "|" else None)
        if atom is not None:
            stack[-1][0] += atom
            stack[-1][1] = atom


def _skip_class(text: str, i: int) -> int:
    i += 1
    if i < len(text) and text[i] == "^":
        i += 1
    if i < len(text) and text[i] == "]":
        i += 1
    while i < len(text) and text[i] != "]":
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _skip_string(text: str, i: int) -> int:
    i += 1
    while i < len(text) and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i + 1


def check_schema(schema: Any, limits: GrammarLimits, param: str) -> None:
    _check_schema_nodes(schema, limits, param)
    _check_refs_terminate(schema, param)


def _check_schema_nodes(schema: Any, limits: GrammarLimits, param: str) -> None:
    todo: list[tuple[Any, int, str]] = [(schema, 0, "#")]
    while todo:
        node, depth, path = todo.pop()
        if depth > limits.max_nesting_depth:
            raise GrammarLimitError(f"{param}: schema nested more than {limits.max_nesting_depth} deep "
                                    f"(at {path})", param=param)
        if isinstance(node, dict):
            for key in _BOUND_KEYS:
                v = node.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > limits.max_repetition:
                    raise GrammarLimitError(f"{param}: {key}={v} at {path} is above the limit "
                                            f"{limits.max_repetition}", param=param)
            if isinstance(node.get("pattern"), str):
                check_pattern(node["pattern"], limits, param, gbnf=False)
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                raise GrammarError(f"{param}: only local $ref ('#/...') is supported, got {ref!r} at {path}",
                                   param=param)
            todo.extend((v, depth + 1, f"{path}/{k}") for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((v, depth + 1, f"{path}/{k}") for k, v in enumerate(node))


def _resolve(root: Any, ref: str, param: str) -> Any:
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise GrammarError(f"{param}: $ref {ref!r} does not resolve inside the schema", param=param)
    return node


def _check_refs_terminate(root: Any, param: str) -> None:
    """Reject schemas whose every instance would be infinitely deep (a $ref cycle through required
    properties / non-empty arrays with no alternative): decoding could never finish."""
    refs = sorted({n["$ref"] for n in _walk(root) if isinstance(n.get("$ref"), str)})
    if not refs:
        return
    targets = {r: _resolve(root, r, param) for r in refs}
    finite = {r: False for r in refs}          # least fixpoint: assume no base case until shown
    changed = True
    while changed:
        changed = False
        for r in refs:
            if not finite[r] and _finite(targets[r], finite):
                finite[r] = changed = True
    if not _finite(root, finite):
        bad = next(r for r in refs if not finite[r])
        raise GrammarError(
            f"{param}: recursive $ref {bad!r} has no base case, so no finite JSON value matches; "
            "make the recursive property optional, allow an empty array, or add an alternative "
            "(anyOf with null)", param=param)


def _finite(node: Any, finite: dict[str, bool]) -> bool:
    if node is False:
        return False
    if not isinstance(node, dict):
        return True
    if isinstance(node.get("$ref"), str) and not finite.get(node["$ref"], True):
        return False
    if not all(_finite(s, finite) for s in node.get("allOf", [])):
        return False
    for key in ("anyOf", "oneOf"):
        if node.get(key) and not any(_finite(s, finite) for s in node[key]):
            return False
    types = node.get("type")
    if types is None:
        return True
    types = [types] if isinstance(types, str) else list(types)
    return any(_type_finite(t, node, finite) for t in types)


def _type_finite(t: str, node: dict, finite: dict[str, bool]) -> bool:
    if t == "object":
        props = node.get("properties") or {}
        return all(_finite(props.get(k, True), finite) for k in node.get("required") or [])
    if t == "array":
        prefix = node.get("prefixItems") or []
        need = node.get("minItems", 0) or 0
        if not all(_finite(s, finite) for s in prefix[:need]):
            return False
        return need <= len(prefix) or _finite(node.get("items", True), finite)
    return True


def _walk(node: Any):
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, dict):
            yield n
            todo.extend(n.values())
        elif isinstance(n, list):
            todo.extend(n)
