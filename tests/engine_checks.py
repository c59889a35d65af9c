"""Checks shared by the CPU tests (the graph steps: tests/unit/test_graph_steps.py; the kernels in Triton's
interpreter: tests/unit/test_fused_interpreted.py) and the GPU tests."""
from __future__ import annotations

import time

import torch

from services.engine.sampling_params import SamplingParams
from services.engine.spec_decode import Proposal, ProposalInput, Proposer


class Oracle(Proposer):
    """Always right: guesses the target's own greedy continuation (looked up by prefix among
    `continuations`: prompt + output ids), after sleeping delay(number of sequences in the call) s."""
    name = "oracle"

    def __init__(self, continuations: list[list[int]], delay):
        self.continuations, self.delay = continuations, delay

    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        time.sleep(self.delay(len(inputs)))
        out = []
        for inp in inputs:
            full = next(c for c in self.continuations if c[:len(inp.token_ids)] == inp.token_ids)
            out.append(Proposal(full[len(inp.token_ids):][:inp.num_speculative_tokens]))
        return out


def eager_spec_steps(runner) -> list[bool]:
    """Watches `runner`'s eager path: one entry per step with guesses that took it, True when the
    step had the shape the speculative graphs serve (every row at its newest token), i.e. missed them."""
    seen: list[bool] = []
    prepare = runner.prepare

    def spy(scheduled):
        if any(s.request.spec_token_ids for s in scheduled):
            seen.append(all(s.request.num_computed_tokens + 1 == s.request.num_tokens for s in scheduled))
        return prepare(scheduled)
    runner.prepare = spy
    return seen


def overlapped_steps(engine) -> list:
    """Counts the engine's overlapped steps from now on: one entry per `_step_ahead` call."""
    calls: list = []
    ahead = engine._step_ahead
    engine._step_ahead = lambda: calls.append(1) or ahead()
    return calls


def check_overlapped_decoding(llm, prompts: list, lengths: list[int], longest: int) -> None:
    """Plain sampling decodes overlapped (the next step launched before this one's tokens are read);
    logprobs turn that off. Same tokens either way, also when request `longest` stops early on a
    stop id (its extra launched row is dropped), and every KV block comes back."""
    engine = llm.engine
    calls = overlapped_steps(engine)

    def run(logprobs, stop_ids=()):
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=logprobs,
                                 stop_token_ids=list(stop_ids)) for m in lengths]
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    reference = run(logprobs=0)
    assert not calls                                       # logprobs: step by step
    assert run(logprobs=None) == reference and calls       # overlapped, same tokens
    cut = lengths[longest] // 2
    stop = reference[longest][cut]
    calls.clear()
    want = run(logprobs=0, stop_ids=[stop])
    assert len(want[longest]) <= cut + 1
    assert run(logprobs=None, stop_ids=[stop]) == want and calls
    engine.kv.check_invariants()
    assert engine._inflight is None or all(s.request.is_finished for s in engine._inflight.scheduled)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def check_norm_and_silu_quantize_their_output(x, residual, weight, eps: float, gate_up) -> None:
    """With `quant`, add+RMSNorm and SiLU-and-mul (layers/fused.py) write float8 rows and scales that are exactly
    their own output quantized row by row (models/llama.py hands them to a float8 layer instead of quantizing
    again). `residual` (or None) is updated in place, as the norm does."""
    from services.engine.layers import fused  # noqa: PLC0415
    from services.engine.layers.quant import quantize_rows  # noqa: PLC0415

    def same(got, want) -> bool:
        return all(torch.equal(a.float(), b.float()) for a, b in zip(got, want))

    want = quantize_rows(fused.add_rms_norm(x, None if residual is None else residual.clone(), weight, eps))
    assert same(fused.add_rms_norm(x, residual, weight, eps, quant=True), want)
    assert same(fused.silu_and_mul(gate_up, quant=True), quantize_rows(fused.silu_and_mul(gate_up)))


def check_sampling_graphs(make_llm, prompts: list, max_tokens: int) -> None:
    """Overlapped steps at temperature 1, sampled by replays of the sampling graphs (cuda_graphs.SampleGraphs;
    3 rows in a bucket of 4 put the logprobs at 4) and by the sampler's own launches: the same tokens,
    log-probabilities within float32 rounding (the split of a row's vocabulary follows the batch size), every
    KV block back. `make_llm()`: a new engine with sampling graphs (or their stand-in)."""
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)

    def run(graphs: bool) -> list:
        llm = make_llm()
        engine, appended, replays = llm.engine, [], []
        if graphs:
            sample = engine.sampler.graphs.sample
            engine.sampler.graphs.sample = lambda *a: replays.append(1) or sample(*a)
        else:
            engine.sampler.graphs = None
        append = engine._append
        engine._append = lambda req, group, token, lp, *a: appended.append((req.request_id, token, lp)) \
            or append(req, group, token, lp, *a)
        llm.generate(prompts, params)
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        assert len(replays) >= max_tokens // 2 if graphs else not replays
        return sorted(appended)

    replayed, launched = run(graphs=True), run(graphs=False)
    assert len(replayed) == max_tokens * len(prompts)
    assert [r[:2] for r in replayed] == [r[:2] for r in launched]
    assert max(abs(a[2] - b[2]) for a, b in zip(replayed, launched)) < 1e-4


def grammar_runner(llm, prompts: list):
    """run(logprobs) -> [(text, finish_reason)] of prompts[:3] decoded greedily as a JSON Schema row,
    an unconstrained row and a choice row."""
    from services.grammar.matcher import GrammarHandle  # noqa: PLC0415
    from services.grammar.spec import GrammarSpec  # noqa: PLC0415
    from services.grammar.tokenizer import tokenizer_info_from_hf  # noqa: PLC0415
    engine = llm.engine
    info = tokenizer_info_from_hf(engine.tokenizer, engine.vocab_size, sorted(engine.eos_token_ids))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    js = GrammarHandle.compile(GrammarSpec.json_schema(schema), info)
    choice = GrammarHandle.compile(GrammarSpec.choice(["yes", "no", "maybe not"]), info)

    def run(logprobs=None):
        params = [SamplingParams(temperature=0.0, max_tokens=40, grammar=js, logprobs=logprobs),
                  SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=logprobs),
                  SamplingParams(temperature=0.0, max_tokens=30, grammar=choice, logprobs=logprobs)]
        return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in llm.generate(prompts[:3], params)]
    return run


def check_overlapped_grammar(llm, prompts: list) -> None:
    """Constrained rows decode overlapped too (each step's masks filled while its forward pass runs),
    beside an unconstrained row: the same text as step by step, every finished output valid, the
    choice row that completes its grammar early stops (its launched row dropped), blocks come back."""
    import json  # noqa: PLC0415
    engine = llm.engine
    run = grammar_runner(llm, prompts)
    calls = overlapped_steps(engine)
    reference = run(logprobs=0)
    assert not calls                                       # logprobs: step by step
    got = run(logprobs=None)
    assert got == reference and calls                      # overlapped, same text
    if got[0][1] == "stop":
        assert set(json.loads(got[0][0])) == {"name", "age"}
    assert got[2] in (("yes", "stop"), ("no", "stop"), ("maybe not", "stop"))
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def check_overlapped_tier_export(llm, tier, prompts: list, max_tokens: int) -> list:
    """With the KV tier on (write policy "computed"), decoding still overlaps, and every block that
    became full, prompt or decode, is in the tier's store with exactly the KV the cache holds.
    Returns the greedy outputs."""
    engine = llm.engine
    calls = overlapped_steps(engine)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    assert calls
    tier.writer.flush(timeout_s=60)
    ids = [engine.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    bs = engine.kv.block_size
    # Distinct full blocks (prompts may share a prefix); the last token's KV is never written.
    full = {tuple((p + o)[:(k + 1) * bs]) for p, o in zip(ids, outs) for k in range((len(p) + len(o) - 1) // bs)}
    assert tier.stats.blocks_exported >= len(full) > sum(len(p) // bs for p in ids)
    cached = list(engine.kv.cached.items())
    blobs = tier.store.get_many([tier.key(h) for h, _ in cached])
    for (h, block), blob in zip(cached, blobs):
        assert blob is not None
        want = torch.stack([torch.stack([k[block.block_id], v[block.block_id]]) for k, v in engine.runner.kv_caches])
        assert torch.equal(tier.codec.decode(h, blob), want.cpu())
    return outs
