"""Grammar-constrained decoding in the engine on the tiny model: outputs valid by construction,
EOS only when the grammar is complete, max_tokens first → "length", n > 1, preemption,
ids past the tokenizer's vocabulary never sampled."""
from __future__ import annotations

import json

import jsonschema
import pytest

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.grammar.matcher import GrammarHandle
from services.grammar.spec import GrammarSpec
from services.grammar.tokenizer import tokenizer_info_from_hf
from services.grammar.validate import validate_text

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age"]}
PROMPTS = ["Describe a person as JSON:", "x = "]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, num_kv_blocks=256, block_size=16)


def grammar(llm: LLM, spec: GrammarSpec) -> GrammarHandle:
    eng = llm.engine
    info = tokenizer_info_from_hf(eng.tokenizer, eng.vocab_size, sorted(eng.eos_token_ids))
    return GrammarHandle.compile(spec, info)


def check_finished(spec: GrammarSpec, out) -> None:
    result = validate_text(spec, out.text)
    if out.finish_reason == "stop":
        assert result.ok, f"{out.text!r}: {result.message}"
    else:   # cut by max_tokens: a valid prefix (possibly already complete), never an invalid "stop"
        assert out.finish_reason == "length"
        assert result.ok or result.offset == len(out.text), f"{out.text!r}: {result.message}"


def test_json_schema_sampled_with_n(llm):
    spec = GrammarSpec.json_schema(PERSON)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=48,
                                                grammar=grammar(llm, spec)))
    finished = 0
    for o in outs:
        assert len(o.outputs) == 3
        for c in o.outputs:
            check_finished(spec, c)
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), PERSON)
                finished += 1
    assert finished >= 1


@pytest.mark.parametrize("spec", [GrammarSpec.choice(["yes", "no", "maybe"]), GrammarSpec.builtin("iso_date"),
                                  GrammarSpec.regex(r"[A-Z][a-z]{2,5} [0-9]{1,3}")])
def test_short_grammars_finish_with_stop(llm, spec):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=40, grammar=grammar(llm, spec)))
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop" and validate_text(spec, c.text).ok, c.text
        assert c.token_ids[-1] in llm.engine.eos_token_ids   # EOS was allowed only once complete


def test_max_tokens_before_completion_is_length(llm):
    spec = GrammarSpec.json_schema(PERSON)
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, grammar=grammar(llm, spec)))[0]
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    result = validate_text(spec, c.text)
    assert not result.ok and result.offset == len(c.text)   # three tokens cannot close the object


def test_grammar_outranks_min_tokens(llm):
    spec = GrammarSpec.choice(["no"])
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, min_tokens=8, max_tokens=16,
                                                    grammar=grammar(llm, spec)))[0]
    assert out.outputs[0].text == "no" and out.outputs[0].finish_reason == "stop"


def test_preemption_keeps_matchers_in_step(tiny_model_dir):
    small = LLM(tiny_model_dir, num_kv_blocks=14, block_size=8, max_num_batched_tokens=64)
    spec = GrammarSpec.builtin("arithmetic")
    prompts = [p + " " * i for i in range(2) for p in PROMPTS]
    outs = small.generate(prompts, SamplingParams(temperature=1.0, seed=11, max_tokens=32, grammar=grammar(small, spec)))
    assert small.engine.scheduler.num_preemptions > 0
    for o in outs:
        check_finished(spec, o.outputs[0])


def test_unconstrained_rows_beside_constrained_ones(llm):
    spec = GrammarSpec.choice(["yes", "no"])
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(PROMPTS[1:], free)[0].outputs[0].token_ids
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=8, grammar=grammar(llm, spec)), free])
    assert outs[0].outputs[0].text in ("yes", "no")
    assert outs[1].outputs[0].token_ids == alone


def test_ids_past_the_tokenizer_are_never_sampled(llm):
    spec = GrammarSpec.regex("[a-z ]{1,30}")
    n_tok = len(llm.engine.tokenizer)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=2.0, seed=5, max_tokens=30, grammar=grammar(llm, spec)))
    for o in outs:
        assert all(t < n_tok for t in o.outputs[0].token_ids)


def test_speculative_decoding_keeps_grammar_and_greedy_output(llm, tiny_model_dir):
    from services.draft import build_proposer
    spec_llm = LLM(tiny_model_dir, proposers={"ngram": build_proposer("ngram")}, num_kv_blocks=256,
                   block_size=16, speculative_method="ngram", num_speculative_tokens=4,
                   speculative_adaptive=False)
    spec = GrammarSpec.regex(r"(ab|cd|[0-9]){1,40}")
    prompt = ["ab12cd ab12cd ab12cd ab12cd ab12cd ab"]
    params = lambda g: SamplingParams(temperature=0, max_tokens=24, grammar=g)  # noqa: E731
    plain = llm.generate(prompt, params(grammar(llm, spec)))[0].outputs[0]
    fast = spec_llm.generate(prompt, params(grammar(spec_llm, spec)))[0].outputs[0]
    assert spec_llm.engine.speculator.stats.num_proposed_tokens > 0
    assert fast.token_ids == plain.token_ids
    check_finished(spec, fast)
