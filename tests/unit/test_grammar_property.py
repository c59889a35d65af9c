"""Property tests: hypothesis-generated JSON Schemas decoded by the tiny model at temperature 1;
every output that finished ("stop") validates with `jsonschema`, every output cut by max_tokens is a
valid prefix. Library grammars likewise. Examples are batched into one engine call each so the
suite stays CI-sized (a few batches of short outputs)."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.grammar import library
from services.grammar.matcher import GrammarHandle
from services.grammar.spec import GrammarSpec
from services.grammar.tokenizer import tokenizer_info_from_hf
from services.grammar.validate import validate_text

NAMES = st.sampled_from(["id", "name", "ok", "tags", "score", "kind", "x", "note"])
WORDS = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=6)


def leaf() -> st.SearchStrategy[dict]:
    def int_range(bounds: tuple[int, int]) -> dict:
        lo, hi = sorted(bounds)
        return {"type": "integer", "minimum": lo, "maximum": hi}

    return st.one_of(
        st.integers(0, 12).map(lambda n: {"type": "string", "maxLength": n}),
        st.tuples(st.integers(-50, 50), st.integers(-50, 50)).map(int_range),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda ws: {"enum": ws}),
        WORDS.map(lambda w: {"const": w}),
    )


def objects(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=3))
        required = draw(st.lists(st.sampled_from(sorted(props)), unique=True, max_size=len(props)))
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return build()


def arrays(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": max(t[1], t[2])})


SCHEMAS = st.recursive(leaf(), lambda kids: st.one_of(objects(kids), arrays(kids)), max_leaves=5)
TOP = st.one_of(objects(SCHEMAS), arrays(SCHEMAS), leaf())


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, num_kv_blocks=512, block_size=16, max_num_seqs=32)


@pytest.fixture(scope="module")
def info(llm):
    eng = llm.engine
    return tokenizer_info_from_hf(eng.tokenizer, eng.vocab_size, sorted(eng.eos_token_ids))


def decode(llm, handles: list[GrammarHandle], seed: int, max_tokens: int, n: int = 1):
    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=max_tokens, n=n, grammar=h)
              for i, h in enumerate(handles)]
    return llm.generate(["{\"" if i % 2 else "Answer:" for i in range(len(handles))], params)


def test_generated_schemas_produce_valid_json(llm, info):
    finished = []

    @settings(max_examples=3, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(TOP, min_size=12, max_size=12))
    def check(schemas):
        specs = [GrammarSpec.json_schema(s) for s in schemas]
        outs = decode(llm, [GrammarHandle.compile(s, info) for s in specs], seed=len(finished), max_tokens=40)
        for schema, spec, out in zip(schemas, specs, outs):
            c = out.outputs[0]
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)
                finished.append(c.text)
            else:
                assert c.finish_reason == "length"
                r = validate_text(spec, c.text)
                assert r.ok or r.offset == len(c.text), f"{schema} → {c.text!r}: {r.message}"

    check()
    assert len(finished) >= 6, finished   # most short schemas complete within 40 tokens


def test_library_grammar_outputs_are_accepted(llm, info):
    names = library.names()
    specs = [GrammarSpec.builtin(n) for n in names]
    outs = decode(llm, [GrammarHandle.compile(s, info) for s in specs], seed=100, max_tokens=32, n=2)
    stopped = 0
    for name, spec, out in zip(names, specs, outs):
        for c in out.outputs:
            r = validate_text(spec, c.text)
            if c.finish_reason == "stop":
                assert r.ok, f"{name}: {c.text!r}: {r.message}"
                stopped += 1
            else:
                assert r.ok or r.offset == len(c.text), f"{name}: {c.text!r}: {r.message}"
    assert stopped >= 4
