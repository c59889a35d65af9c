"""Speculative decoding on the GPU: verification steps (and the draft model's catch-up steps) replay
CUDA graphs, and greedy outputs stay those of plain decoding (float32: exact).

Prompts are copy-heavy (n-gram guesses get accepted) with different lengths; the requests finish at
different steps, so the graphs see partly padded buckets and rows with fewer than k guesses.
"""
from __future__ import annotations

import pytest
import torch

from services.draft import build_proposer
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from tests.engine_checks import Oracle, eager_spec_steps, overlapped_steps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = dict(device="cuda", dtype="float32", num_kv_blocks=512, max_num_seqs=8, seed=0)
PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
           "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2,",
           "import os\nimport sys\nimport os\n",
           "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\nclass Point:\n"]


def counting(graphs):
    """Wraps graphs.run to count replays."""
    calls = [0]
    run = graphs.run

    def wrapped(*a, **kw):
        calls[0] += 1
        return run(*a, **kw)
    graphs.run = wrapped
    return calls


def outputs(llm: LLM, max_tokens: int) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=max_tokens - 7 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_steps_replay_graphs_with_plain_outputs(tiny_model_dir, tiny_draft_dir, method):
    plain = outputs(LLM(tiny_model_dir, **COMMON), 48)
    proposer = build_proposer(method, draft_model=tiny_draft_dir, device="cuda", dtype="float32",
                              num_kv_blocks=512) if method == "draft" else build_proposer(method)
    llm = LLM(tiny_model_dir, proposers={method: proposer}, speculative_method=method, num_speculative_tokens=4,
              speculative_adaptive=False, **COMMON)
    runner = llm.engine.runner
    assert runner.spec_graphs is not None and runner.spec_graphs.q == 5
    verify_replays = counting(runner.spec_graphs)
    catch_up = counting(proposer.model.runner.spec_graphs) if method == "draft" else None
    eager = eager_spec_steps(runner)
    assert outputs(llm, 48) == plain
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    # Steps with guesses replay (rows with fewer guesses than k included) unless a prefill rides along.
    assert verify_replays[0] > 0 and not any(eager)
    if catch_up is not None:
        assert catch_up[0] > 0
    # Nothing leaked: every block is back once the requests are done.
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_adaptive_speculation_compares_with_overlapped_plain_steps(tiny_model_dir):
    """Where plain steps overlap, adaptive speculation measures both modes (SpecGate): an always-right
    proposer that answers at once is kept on; the same proposer taking 20 ms a call is hardly asked
    (k and the gate turn it off; which plain mode then wins on the tiny model is the machine's call).
    Outputs stay plain decoding's either way."""
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    plain = LLM(tiny_model_dir, **COMMON)
    want = [list(o.outputs[0].token_ids) for o in plain.generate(PROMPTS[:1], params)]
    full = [plain.engine.tokenizer.encode(PROMPTS[0]) + want[0]]
    for delay, faster in ((0.0, True), (0.02, False)):
        llm = LLM(tiny_model_dir, proposers={"draft": Oracle(full, lambda n, d=delay: d)}, speculative_method="draft",
                  **COMMON)
        ahead = overlapped_steps(llm.engine)
        for _ in range(2):   # the second pass re-explores: a first decision taken amid compilation is revisited
            assert [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS[:1], params)] == want
        spec = llm.engine.speculator
        if faster:
            assert spec.gate.preferred(1) is True, spec.stats.gate_rates
        else:
            assert spec.stats.num_draft_calls < 24, spec.stats   # of ~190 tokens
        assert ahead   # the plain stretches overlap
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
