"""Spec → xgrammar CompiledGrammar: the one place that knows how each kind is compiled.

`compile_spec` runs in-process and is what the worker processes call; `GrammarCompiler` is the
service-side front: limits check, cache (memory LRU, then Redis), then a worker process with a
deadline, so a pathological grammar costs at most `compile_timeout_s` and never hangs anything.
The result is xgrammar's JSON serialization (compiled grammars do not pickle).

Compile cost with a large vocabulary is token-mask work: xgrammar precomputes, for every grammar
state, which of the V tokens may come next. A string's `maxLength: n` unrolls into n states
(xgrammar expands bounded repetitions up to 128 explicitly), each a walk over the whole vocabulary:
seconds at 128k tokens. `xgr_compiler` keeps xgrammar's rule-level cache on, which shares those
per-state masks between grammars (a bounded string compiled once makes every later `maxLength`
up to that n nearly free, whatever the surrounding schema); warmup.py fills it at worker start.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import xgrammar as xgr

from services.grammar import library
from services.grammar.cache import GrammarCache
from services.grammar.canonical import canonical_schema_text
from services.grammar.errors import GrammarError, GrammarLimitError, from_xgrammar
from services.grammar.gbnf import normalize_gbnf
from services.grammar.limits import check_limits
from services.grammar.spec import GrammarLimits, GrammarSpec
from services.grammar.tokenizer import fingerprint
from services.telemetry import metrics

log = logging.getLogger(__name__)

# json_object: any JSON object, no free whitespace (a weak model given free whitespace tends to
# emit it forever).
_ANY_OBJECT = '{"type": "object"}'


# xgrammar's compiler cache per compile worker: per-state token masks and whole compiled grammars
# (a few MB each with bounded strings at 128k tokens), in one LRU. At 128k tokens the warm-up set
# (warmup.py) leaves about 400 MB (most of it its own whole grammars, the first to go); past the
# limit the least recently used go first, warm masks too (then recomputed on their next use).
CACHE_LIMIT_BYTES = 512 * 1024 * 1024


def xgr_compiler(tokenizer_info: xgr.TokenizerInfo, *, max_threads: int = 1,
                 cache_limit_bytes: int = CACHE_LIMIT_BYTES) -> xgr.GrammarCompiler:
    """The long-lived xgrammar compiler of one worker (or offline user): build once per tokenizer
    and reuse it for every compile, or its rule-level cache is lost."""
    return xgr.GrammarCompiler(tokenizer_info, max_threads=max_threads, cache_enabled=True,
                               cache_limit_bytes=cache_limit_bytes)


def resolve(spec: GrammarSpec) -> GrammarSpec:
    """A builtin (library) spec → the spec it names; other kinds unchanged."""
    return library.get(spec.text, param=spec.param) if spec.kind == "builtin" else spec


def compile_spec(compiler: xgr.GrammarCompiler, spec: GrammarSpec, limits: GrammarLimits) -> xgr.CompiledGrammar:
    """Compile in this process (no deadline: callers that need one use a worker). Raises GrammarError."""
    check_limits(spec, limits)
    spec = resolve(spec)
    check_limits(spec, limits)
    p = spec.param or spec.kind
    try:
        if spec.kind == "gbnf":
            text, cmap = normalize_gbnf(spec.text)
            try:
                return compiler.compile_grammar(text)
            except RuntimeError as e:
                raise from_xgrammar(e, param=p, column_shift=cmap.to_original) from None
        if spec.kind == "regex":
            return compiler.compile_regex(spec.text)
        if spec.kind == "choice":
            # A regex alternation of escaped literals would also work; a GBNF of string literals
            # keeps every byte literal without regex escaping pitfalls.
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices)
            return compiler.compile_grammar(f"root ::= {alts}")
        if spec.kind == "json_object":
            return compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=spec.any_whitespace,
                                                strict_mode=False)
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(canonical_schema_text(spec.text),
                                                any_whitespace=spec.any_whitespace, strict_mode=spec.strict)
    except RuntimeError as e:
        raise from_xgrammar(e, param=p) from None
    raise GrammarError(f"{p}: cannot compile a {spec.kind} spec", param=p)


@dataclass(slots=True, frozen=True)
class CompileResult:
    serialized: str          # CompiledGrammar.serialize_json()
    source: str              # "memory" | "redis" | "compiled"
    compile_s: float         # time spent compiling (0 on a cache hit)


class GrammarCompiler:
    """Compiles specs for one tokenizer with caching and a deadline. Thread-safe."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, *, limits: GrammarLimits | None = None,
                 cache: GrammarCache | None = None, num_workers: int = 1, warm_up: bool = True,
                 compile_threads: int = 1) -> None:
        from services.grammar.worker import WorkerPool  # noqa: PLC0415 - multiprocessing setup
        self.limits = limits or GrammarLimits()
        self.tokenizer_info = tokenizer_info
        self.fingerprint = fingerprint(tokenizer_info)
        self.cache = cache or GrammarCache()
        self.pool = WorkerPool(tokenizer_info.serialize_json(), self.limits, num_workers=num_workers,
                               warm_up=warm_up, num_threads=compile_threads)

    def compile(self, spec: GrammarSpec) -> CompileResult:
        key = spec.spec_hash
        hit = self.cache.get(self.fingerprint, key)
        if hit is not None:
            if hit.error is not None:
                raise GrammarError.from_dict(hit.error)
            return CompileResult(hit.value, hit.source, 0.0)
        # Cheap checks here too: an over-limit spec never occupies a worker.
        try:
            check_limits(spec, self.limits)
        except GrammarError as e:
            self._record_error(spec, e)
            raise
        try:
            serialized, dt = self.pool.compile(spec, self.limits.compile_timeout_s)
        except GrammarError as e:
            self._record_error(spec, e)
            raise
        metrics.GRAMMAR_COMPILE_SECONDS.labels(spec.kind).observe(dt)
        self.cache.put(self.fingerprint, key, serialized)
        return CompileResult(serialized, "compiled", dt)

    def _record_error(self, spec: GrammarSpec, e: GrammarError) -> None:
        reason = "timeout" if "Timeout" in type(e).__name__ else "limit" if isinstance(e, GrammarLimitError) \
            else "invalid"
        metrics.GRAMMAR_COMPILE_ERRORS.labels(spec.kind, reason).inc()
        self.cache.put_error(self.fingerprint, spec.spec_hash, e.to_dict())

    def close(self) -> None:
        self.pool.close()
