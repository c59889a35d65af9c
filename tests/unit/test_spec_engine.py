"""Speculative decoding in the engine on the tiny bundled models (target + draft).

Greedy outputs are identical to plain decoding with every in-process proposer, also with stop
strings, max_tokens, penalties (the per-token processing path), grammars, n > 1 and prefix-cache
reuse of blocks written next to rolled-back guesses. Sampling: a chi-square homogeneity test
cannot tell speculative from plain sampling on short sequences, with the real draft and with a
deliberately bad one. Adaptivity and overrides: a useless proposer is switched off, per-request
`speculative` overrides and the batch-size cap are obeyed. Seeds are fixed: no flaky statistics.
"""
from __future__ import annotations

import random

import pytest
import torch

from services.draft import build_proposer
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.engine.spec_decode import Proposal, ProposalInput, Proposer
from tests.engine_checks import Oracle

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "x = ",
           "    def __repr__(self):\n        return", "for i in range(10):"]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
ENGINE = dict(num_kv_blocks=256, block_size=16)


class BadProposer(Proposer):
    """Guesses drawn from a q that disagrees with the target: the least likely tokens of a fixed set."""
    name = "bad"

    def __init__(self, ids: list[int], probs: list[float], seed: int = 0):
        self.ids, self.probs = ids, probs
        self.rng = random.Random(seed)

    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        out = []
        for inp in inputs:
            k = inp.num_speculative_tokens
            guesses = self.rng.choices(self.ids, self.probs, k=k)
            out.append(Proposal(guesses, [(list(self.ids), list(self.probs))] * k))
        return out


class OverconfidentDraft(Proposer):
    """A deliberately bad draft: guesses the draft model's most likely token and claims certainty
    (q a point mass) though the target is far from certain. About half the guesses are rejected and
    the residual norm(max(0, p - q)) decides those outputs: resampling from p there instead (the
    classic bug) would overweight the guessed token by a lot."""
    name = "draft"

    def __init__(self, inner: Proposer):
        self.inner = inner

    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        props = self.inner.propose([ProposalInput(i.request_id, i.token_ids, i.num_speculative_tokens, 1.0)
                                    for i in inputs])
        return [Proposal([ids[0] for ids, _ in p.probs]) if p is not None else None for p in props]

    def release(self, request_ids: list[str]) -> None:
        self.inner.release(request_ids)



@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return LLM(tiny_model_dir, **ENGINE)


@pytest.fixture(scope="module")
def spec_llms(tiny_model_dir, tiny_draft_dir):
    return {
        "ngram": LLM(tiny_model_dir, proposers={"ngram": build_proposer("ngram")}, speculative_method="ngram",
                     **ENGINE),
        "draft": LLM(tiny_model_dir, proposers={"draft": build_proposer("draft", tiny_draft_dir, device="cpu",
                                                                        num_kv_blocks=256)},
                     speculative_method="draft", speculative_adaptive=False, **ENGINE),
    }


def token_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [[list(c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_identical_to_plain(plain, spec_llms, method):
    llm = spec_llms[method]
    before = llm.engine.speculator.stats.num_accepted_tokens
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=7), SamplingParams(temperature=0, max_tokens=40, n=2),
              SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, presence_penalty=0.5), GREEDY]
    assert token_ids(llm, PROMPTS, params) == token_ids(plain, PROMPTS, params)
    assert llm.engine.speculator.stats.num_accepted_tokens > before   # guesses were really used
    llm.engine.kv.check_invariants()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_stop_strings_and_eos_stop_mid_run(plain, spec_llms, method):
    ref = plain.generate(PROMPTS[:2], GREEDY)
    for prompt, r in zip(PROMPTS[:2], ref):
        text = r.outputs[0].text
        stop = text[len(text) // 2:len(text) // 2 + 3]
        if not stop.strip():
            continue
        params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
        got, want = spec_llms[method].generate(prompt, params)[0].outputs[0], plain.generate(prompt, params)[0].outputs[0]
        assert (got.text, got.finish_reason, got.stop_reason) == (want.text, want.finish_reason, want.stop_reason)
        assert got.token_ids == want.token_ids
    # Without ignore_eos: EOS accepted inside a run of guesses ends the request there.
    eos = SamplingParams(temperature=0, max_tokens=64)
    assert token_ids(spec_llms[method], PROMPTS, eos) == token_ids(plain, PROMPTS, eos)


def test_prefix_cache_reuse_after_rollbacks(plain, spec_llms):
    """Blocks are registered with committed tokens only: a later request reusing the prefix of a
    speculated sequence gets the same continuation as without speculation."""
    llm = spec_llms["draft"]
    first = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    follow = first.prompt_token_ids + list(first.outputs[0].token_ids)
    hits_before = llm.engine.kv.prefix_hits
    assert token_ids(llm, [follow], GREEDY) == token_ids(plain, [follow], GREEDY)
    assert llm.engine.kv.prefix_hits - hits_before >= 4 * 16
    llm.engine.kv.check_invariants()


def test_grammar_constrained_greedy_identical(plain, spec_llms):
    from services.grammar.matcher import GrammarHandle  # noqa: PLC0415
    from services.grammar.spec import GrammarSpec  # noqa: PLC0415
    from services.grammar.tokenizer import tokenizer_info_from_hf  # noqa: PLC0415
    eng = plain.engine
    info = tokenizer_info_from_hf(eng.tokenizer, eng.vocab_size, sorted(eng.eos_token_ids))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    handle = GrammarHandle.compile(GrammarSpec.json_schema(schema), info)
    params = SamplingParams(temperature=0, max_tokens=40, grammar=handle)
    for method in ("ngram", "draft"):
        got = spec_llms[method].generate(PROMPTS[:2], params)
        want = plain.generate(PROMPTS[:2], params)
        assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]


# ---- sampling: same distribution ---------------------------------------------------------------------
def chi2_sf(x: float, dof: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def homogeneity_p_value(a: dict, b: dict) -> float:
    """Two-sample chi-square test (equal sample sizes); categories seen fewer than 10 times in
    total are pooled so the approximation holds."""
    keys = set(a) | set(b)
    rows, pool = [], [0, 0]
    for k in keys:
        x, y = a.get(k, 0), b.get(k, 0)
        if x + y < 10:
            pool[0] += x
            pool[1] += y
        else:
            rows.append((x, y))
    if sum(pool) > 0:
        rows.append(tuple(pool))
    na, nb = sum(r[0] for r in rows), sum(r[1] for r in rows)
    stat = 0.0
    for x, y in rows:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return chi2_sf(stat, len(rows) - 1)


N_SAMPLES = 400
MAX_TOKENS = 4


def sample(llm: LLM, prompt: str, seed0: int) -> list[tuple[int, ...]]:
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed0 + i)
              for i in range(N_SAMPLES)]
    return [tuple(o.outputs[0].token_ids) for o in llm.generate([prompt] * N_SAMPLES, params)]


def counts_at(samples: list[tuple[int, ...]], j: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in samples:
        out[s[j]] = out.get(s[j], 0) + 1
    return out


@pytest.mark.parametrize("draft", ["model", "bad"])
def test_spec_sampling_matches_plain_distribution(tiny_model_dir, tiny_draft_dir, plain, draft):
    """Token 1 comes from the prefill; tokens 2-3 are guesses verified by rejection sampling, token 4
    the bonus. Each position's distribution is compared (Bonferroni over the positions)."""
    proposer = build_proposer("draft", tiny_draft_dir, device="cpu", num_kv_blocks=512, top_probs=3)
    if draft == "bad":
        proposer = OverconfidentDraft(proposer)
    # Both stand in the "draft" slot: the engine treats any proposer the same way.
    llm = LLM(tiny_model_dir, proposers={"draft": proposer}, speculative_method="draft", speculative_adaptive=False,
              speculative_disable_batch_size=None, num_kv_blocks=512, block_size=16)
    prompt = PROMPTS[0]
    want = sample(plain, prompt, 0)
    got = sample(llm, prompt, 10_000)
    stats = llm.engine.speculator.stats
    assert stats.num_proposed_tokens >= 2 * N_SAMPLES     # every sample went through the spec path
    assert stats.acceptance_rate > 0.2
    for j in range(MAX_TOKENS):
        p = homogeneity_p_value(counts_at(want, j), counts_at(got, j)) * MAX_TOKENS
        assert p > 1e-3, f"token {j + 1}: spec sampling differs from plain sampling (p={p:.2g})"


# ---- adaptivity and overrides -----------------------------------------------------------------------
def test_adaptive_turns_a_useless_proposer_off(tiny_model_dir, plain):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    want = token_ids(plain, PROMPTS[:1], params)
    # Guesses the target never emits here: none is accepted, whatever k the measured costs choose.
    never = [t for t in range(5, 400) if t not in want[0][0]][:3]
    llm = LLM(tiny_model_dir, proposers={"draft": BadProposer(never, [0.5, 0.3, 0.2])},
              speculative_method="draft", **ENGINE)
    assert token_ids(llm, PROMPTS[:1], params) == want
    assert llm.engine.speculator.stats.num_accepted_tokens == 0
    stats = llm.engine.speculator.stats
    # A few steps to learn that guesses fail, then only the occasional probe with one guess.
    assert stats.num_verify_steps < 20 and stats.num_proposed_tokens < 40


def test_costs_are_measured_per_batch_size(tiny_model_dir, plain):
    """Speculation that does not pay at batch 4 turns off there; a request alone afterwards speculates
    from its first step: a cost measured at batch 4 says nothing about batch 1."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = PROMPTS[:4]
    tok = plain.engine.tokenizer
    full = [tok.encode(p) + out[0] for p, out in zip(prompts, token_ids(plain, prompts, params))]
    # Always right, and slow in the square of the number of sequences per call: worth it alone, not in a batch of four.
    llm = LLM(tiny_model_dir, proposers={"draft": Oracle(full, lambda n: 0.004 * n * n)}, speculative_method="draft",
              **ENGINE)
    stats = llm.engine.speculator.stats
    assert [o[0] for o in token_ids(llm, prompts, params)] == [f[-48:] for f in full]
    # Batch 4: 64 ms a call against steps of a few ms; a few calls to learn that, then probes only.
    assert stats.num_draft_calls < 12
    calls = stats.num_draft_calls
    assert token_ids(llm, prompts[:1], params)[0][0] == full[0][-48:]
    # Batch 1: 4 ms a call, every guess accepted: it speculates from the first decode step to the end.
    assert stats.num_draft_calls - calls >= 48 // 5
    assert stats.num_accepted_tokens == stats.num_proposed_tokens


def drive_gate(gate, phases: list[tuple[dict[bool, float], int]], bucket: int = 8) -> list[list[bool]]:
    """Runs `gate` through phases of (rates, steps), where a speculative / plain step delivers
    rates[mode] tokens in 1 ms; returns each phase's modes, step by step."""
    out, tokens, now = [], 0, 100.0
    for rates, steps in phases:
        modes = []
        for _ in range(steps):
            spec = gate(bucket, tokens, now)
            modes.append(spec)
            tokens, now = tokens + round(rates[spec]), now + 1e-3
        out.append(modes)
    return out


def test_gate_prefers_the_faster_mode_and_explores_less_and_less():
    """SpecGate (where plain steps overlap): plain first, then speculation, then the faster one, with
    exploring stretches of WINDOW steps between ever longer stretches of the faster mode."""
    from services.engine.speculator import SpecGate  # noqa: PLC0415
    # Every stretch after a switch also runs SETTLE steps that are not measured (the transition).
    st = SpecGate.SETTLE
    (p, s), (lo, hi) = (w + st for w in SpecGate.WINDOW.values()), SpecGate.EXPLOIT
    gate = SpecGate()
    # Plain 11 % faster: it is preferred, and its stretches double. Then speculation gets 3x faster
    # (acceptance rose): the next exploring stretch flips the bucket to it, and its stretches grow 4x.
    first = [False] * p + [True] * s + [False] * (lo + st) + [True] * s + [False] * (2 * lo + st)
    second = [True] * s + [True] * lo + [False] * p + [True] * (4 * lo + st) + [False] * p
    slower, faster = drive_gate(gate, [({True: 9, False: 10}, len(first)), ({True: 30, False: 10}, len(second))])
    assert slower == first and faster == second
    assert gate.preferred(8) is True and gate.preferred(1) is None
    # Buckets are independent; a mode never runs past EXPLOIT[1] steps without the other measured.
    assert drive_gate(gate, [({True: 30, False: 10}, p + s + 1)], bucket=1)[0][-1] is True
    long = drive_gate(gate, [({True: 30, False: 10}, 20 * hi)])[0]
    assert max(len(run) for run in "".join("s" if m else "p" for m in long).split("p")) <= hi + st
    # Steps with requests waiting (prefill) are not measured: they move no stretch along.
    prefilling = SpecGate()
    assert not any(prefilling(4, 10 * i, 1e-3 * i, waiting=True) for i in range(4 * p))


def test_per_request_override_and_batch_cap(tiny_model_dir, spec_llms):
    llm = spec_llms["ngram"]
    stats = llm.engine.speculator.stats
    before = stats.num_verify_steps
    llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, speculative={"enabled": False}))
    assert stats.num_verify_steps == before
    copy = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\nw = [1, 2,"
    steps, proposed, accepted = stats.num_verify_steps, stats.num_proposed_tokens, stats.num_accepted_tokens
    out = llm.generate(copy, SamplingParams(temperature=0, max_tokens=40, speculative={"num_speculative_tokens": 1}))
    assert stats.num_verify_steps > steps
    assert stats.num_proposed_tokens - proposed == stats.num_verify_steps - steps   # one guess per step
    m = out[0].metrics   # the request's own counters (they go on its decode span)
    assert (m.spec_verify_steps, m.spec_proposed_tokens, m.spec_accepted_tokens) == \
        (stats.num_verify_steps - steps, stats.num_proposed_tokens - proposed, stats.num_accepted_tokens - accepted)
    capped = LLM(tiny_model_dir, proposers={"ngram": build_proposer("ngram")}, speculative_method="ngram",
                 speculative_disable_batch_size=2, **ENGINE)
    capped.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    s = capped.engine.speculator.stats
    assert s.num_skipped_steps > 0
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative={"method": "medusa"})
    with pytest.raises(ValueError, match="needs proposers"):
        LLM(tiny_model_dir, speculative_method="ngram", **ENGINE)


def test_spec_metrics_exported(spec_llms):
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
    from services.telemetry.metrics import SpecStatsCollector  # noqa: PLC0415
    llm = spec_llms["draft"]
    llm.generate(PROMPTS[0], GREEDY)
    registry = CollectorRegistry()
    registry.register(SpecStatsCollector(lambda: llm.engine.speculator.stats, "tiny", "r0"))
    text = generate_latest(registry).decode()
    s = llm.engine.speculator.stats
    assert f'inference_spec_accepted_tokens_total{{model="tiny",replica="r0"}} {float(s.num_accepted_tokens)}' in text
    assert f'inference_spec_draft_latency_seconds_count{{model="tiny",replica="r0"}} {float(s.num_draft_calls)}' in text
    for name in ("proposed_tokens_total", "acceptance_rate", "mean_accepted_length", "fallbacks_total"):
        assert f"inference_spec_{name}{{" in text
    # What SpecGate measured (on a GPU; driven by hand here): tokens/s per bucket and mode.
    from services.engine.speculator import SpecGate, SpecStats  # noqa: PLC0415
    stats = SpecStats()
    drive_gate(SpecGate(stats.gate_rates), [({True: 9, False: 10}, 40)])
    registry = CollectorRegistry()
    registry.register(SpecStatsCollector(lambda: stats, "tiny", "r0"))
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415
    gate = next(f for f in text_string_to_metric_families(generate_latest(registry).decode())
                if f.name == "inference_spec_gate_tokens_per_second")
    assert {(x.labels["bucket"], x.labels["mode"]): round(x.value) for x in gate.samples} == \
        {("8", "plain"): 10_000, ("8", "speculative"): 9_000}
