"""GrammarCompiler: every kind compiles in a worker process, errors are clear, a compile past the
deadline is killed and the next one still works, the in-memory cache answers repeats, and the
workers' warm-up set compiles (while a request that arrives meanwhile is still served)."""
from __future__ import annotations

import itertools
import string

import pytest
import xgrammar as xgr

from services.grammar.cache import GrammarCache
from services.grammar.compiler import GrammarCompiler, compile_spec, xgr_compiler
from services.grammar.errors import GrammarBusyError, GrammarError, GrammarLimitError, GrammarTimeoutError
from services.grammar.matcher import GrammarHandle, _offline_compiler
from services.grammar.spec import GrammarLimits, GrammarSpec
from services.grammar.tokenizer import fingerprint
from services.grammar.warmup import warmup_specs

EOS = 256


def synthetic_vocab(num_trigrams: int = 4096) -> list[bytes]:
    """Bytes, an EOS, and enough multi-letter tokens for token-mask work to take real time."""
    letters = string.ascii_lowercase
    grams = ["".join(p) for p in itertools.product(letters, repeat=2)]
    grams += ["".join(p) for p in itertools.islice(itertools.product(letters, repeat=3), num_trigrams)]
    return [bytes([i]) for i in range(256)] + [b"<eos>"] + [g.encode() for g in grams] + \
        [b'{"', b'":', b'",', b", ", b": ", b"true", b"null"]


@pytest.fixture(scope="module")
def info():
    return xgr.TokenizerInfo(synthetic_vocab(), xgr.VocabType.RAW, stop_token_ids=[EOS])


@pytest.fixture(scope="module")
def compiler(info):
    # A deadline that RUNAWAY passes the checks for but not the clock.
    c = GrammarCompiler(info, limits=GrammarLimits(compile_timeout_s=0.15),
                        cache=GrammarCache())
    yield c
    c.close()


def run_text(handle: GrammarHandle, text: str) -> bool:
    m = handle.new_matcher()
    return m._m.accept_string(text) and m.accept_token(EOS) and m.is_terminated()


@pytest.mark.parametrize("spec, good, bad", [
    (GrammarSpec.gbnf('root ::= "yes" | "no"'), "no", "maybe"),
    (GrammarSpec.regex(r"[0-9]{3}-[0-9]{4}"), "555-1234", "5551234"),
    (GrammarSpec.choice(["red", "green", 'a "quoted" one']), 'a "quoted" one', "blue"),
    (GrammarSpec.json_object(), '{"a": [1, {"b": null}]}', "[1]"),
    (GrammarSpec.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
     '{"n": 42}', '{"n": "42"}'),
    (GrammarSpec.builtin("iso_date"), "2024-02-29", "2024-13-01"),
])
def test_each_kind_compiles_and_matches(compiler, info, spec, good, bad):
    result = compiler.compile(spec)
    handle = GrammarHandle.from_serialized(result.serialized, info)
    assert run_text(handle, good)
    assert not run_text(handle, bad)


def test_repeat_is_a_memory_hit(compiler):
    spec = GrammarSpec.regex("(ab)+c")
    first = compiler.compile(spec)
    again = compiler.compile(GrammarSpec.regex("(ab)+c", param="regex"))
    assert first.source == "compiled" and again.source == "memory"
    assert again.serialized == first.serialized


def test_invalid_grammar_names_line_and_column(compiler):
    with pytest.raises(GrammarError) as e:
        compiler.compile(GrammarSpec.gbnf('root ::= "a"\n  | "b" (\n'))
    assert isinstance(e.value, ValueError)
    assert e.value.line == 3 and e.value.column == 1
    assert "/project/" not in str(e.value) and ".cc:" not in str(e.value)
    with pytest.raises(GrammarError) as e:
        compiler.compile(GrammarSpec.regex("a(b"))
    assert e.value.offset == 4 and "parenthesis" in str(e.value)
    with pytest.raises(GrammarError, match='Unsupported type "colour"'):
        compiler.compile(GrammarSpec.json_schema({"type": "colour"}))


def test_failures_are_cached_too(compiler):
    spec = GrammarSpec.gbnf("root ::= undefined_rule")
    with pytest.raises(GrammarError):
        compiler.compile(spec)
    hits = compiler.cache.memory_hits
    with pytest.raises(GrammarError, match="undefined_rule"):
        compiler.compile(spec)
    assert compiler.cache.memory_hits == hits + 1


def test_over_limit_spec_never_reaches_a_worker(info):
    c = GrammarCompiler(info, limits=GrammarLimits(max_spec_bytes=100), num_workers=1)
    try:
        with pytest.raises(GrammarLimitError, match="the limit is 100 bytes"):
            c.compile(GrammarSpec.regex("a" * 101))
        assert c.cache.misses == 1
    finally:
        c.close()


# 300 optional character classes: small and within every limit, but each prefix is a state whose token
# masks xgrammar computes, and the time grows about as the cube (100: 0.45 s, 150: 1.3 s on one core), so
# this takes many seconds. (`[a-z]{1,8000}` took a constant 0.09 s: near the deadline, a flaky runaway.)
RUNAWAY = "".join(f"[{L[i % 26]}{L[(7 * i + 3) % 26]}{L[(11 * i + 5) % 26]}]?"
                  for L in ["abcdefghijklmnopqrstuvwxyz"] for i in range(300))


def test_runaway_compile_is_stopped_and_the_next_one_works(compiler):
    with pytest.raises(GrammarTimeoutError, match="took longer than 0.15 s and was stopped"):
        compiler.compile(GrammarSpec.regex(RUNAWAY))
    # The killed worker has been replaced.
    assert compiler.compile(GrammarSpec.regex("ok+")).source == "compiled"
    with pytest.raises(GrammarTimeoutError):   # cached as a failure: answered without a worker
        compiler.compile(GrammarSpec.regex(RUNAWAY))


def test_fingerprint_depends_on_vocab_and_mask_width(info):
    same = xgr.TokenizerInfo(synthetic_vocab(), xgr.VocabType.RAW, stop_token_ids=[EOS])
    wider = xgr.TokenizerInfo(synthetic_vocab(), xgr.VocabType.RAW, stop_token_ids=[EOS], vocab_size=8192)
    other = xgr.TokenizerInfo(synthetic_vocab(100), xgr.VocabType.RAW, stop_token_ids=[EOS])
    assert fingerprint(same) == fingerprint(info)
    assert len({fingerprint(info), fingerprint(wider), fingerprint(other)}) == 3


def test_every_warm_up_spec_compiles(info):
    # A warm-up spec that failed would be skipped silently by the worker: check them all here.
    compiler, limits = xgr_compiler(info), GrammarLimits()
    specs = list(warmup_specs())
    assert len({s.spec_hash for s in specs}) == len(specs)
    for spec in specs:
        compile_spec(compiler, spec, limits)


def test_a_request_during_warm_up_is_served_within_its_deadline(info):
    # The deadline counts the request's own compile, not the warm-up step it waited for.
    c = GrammarCompiler(info, limits=GrammarLimits(compile_timeout_s=0.5), num_workers=1)
    try:
        spec = GrammarSpec.json_schema({"type": "object", "properties": {"w": {"type": "string", "maxLength": 9}},
                                        "required": ["w"]})
        handle = GrammarHandle.from_serialized(c.compile(spec).serialized, info)
        assert run_text(handle, '{"w": "ninechars"}') and not run_text(handle, '{"w": "tencharsxx"}')
    finally:
        c.close()


def test_offline_compiles_share_one_compiler_per_tokenizer(info):
    assert _offline_compiler(info) is _offline_compiler(info)


def test_an_overloaded_pool_is_not_the_specs_fault(info):
    """No worker free in time: GrammarBusyError (503 upstream), not cached, and the same spec
    compiles once a worker is free."""
    c = GrammarCompiler(info, limits=GrammarLimits(), num_workers=1, warm_up=False)
    try:
        busy = c.pool._idle.get(timeout=60)              # hold the only worker
        c.pool._startup_timeout_s = 0.05
        spec = GrammarSpec.regex("busy+")
        with pytest.raises(GrammarBusyError, match="overloaded"):
            c.compile(spec)
        assert not issubclass(GrammarBusyError, ValueError)
        c.pool._idle.put(busy)
        assert c.compile(spec).source == "compiled"
    finally:
        c.close()
