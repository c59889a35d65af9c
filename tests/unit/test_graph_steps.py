"""The host side of the CUDA-graph steps (services/engine/cuda_graphs.py), on the CPU.

A graph replays its captured forward over static input buffers. Here a stand-in replays by running
that forward again on the same buffers (the Triton kernels in Triton's interpreter), so what is
checked is everything the host does: packing a step's tokens, positions, slots, query starts,
context lengths and block tables into the buffers, padding partial buckets, and picking the rows
that get logits. Greedy outputs must equal the eager engine's, token for token (float32).
"""
from __future__ import annotations

import os

import pytest
import torch

from services.draft import build_proposer
from services.engine.cuda_graphs import ChainGraphs, DecodeGraphs, SampleGraphs
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from tests.engine_checks import (check_overlapped_decoding, check_overlapped_grammar, check_overlapped_tier_export,
                                 check_sampling_graphs, eager_spec_steps)

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the GPU tests cover this with real graphs")

COMMON = dict(device="cpu", dtype="float32", num_kv_blocks=256, max_num_seqs=4, seed=0)
PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
           "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2,",
           "import os\n"]


class ReplayByRerun(DecodeGraphs):
    """Graphs whose replay re-runs the forward on the static buffers (no CUDA here)."""

    def capture(self) -> None:
        self.graphs = dict.fromkeys(self.buckets)
        self._logits_buffer()
        self.replays = 0

    def _launch(self, bs: int, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._copy_inputs(bs, input_ids)
        self.replays += 1
        ids, pos, _ = self._v64(self.i64, bs * self.q)
        return self._forward(ids, pos, self._meta(bs), bs)


class SampleByRerun(SampleGraphs):
    """Sampling graphs whose replay runs the fused sampler again on their static buffers."""

    def capture(self) -> None:
        self.calls = 0

    def _launch(self, bs: int, masked: bool) -> None:
        self.tokens[bs, masked] = self._run(bs, masked)
        self.calls += 1


class ChainByRerun(ChainGraphs):
    """Chain graphs whose replay runs the chained passes again on the static buffers."""

    def capture(self) -> None:
        self.chains = {(bs, n): None for bs in self.buckets for n in range(1, self.max_passes + 1)}
        self.replays = 0

    def _launch_chain(self, bs: int, passes: int, input_ids: torch.Tensor) -> torch.Tensor:
        self._copy_inputs(bs, input_ids)
        self.replays += 1
        return self._chain(bs, passes)


def with_graphs(llm: LLM, spec_query_len: int | None) -> LLM:
    r = llm.engine.runner
    args = (r.model, r.kv_caches, r.backend, r.block_size, 4, 256, r.device)
    r.graphs = ReplayByRerun(*args)
    r.graphs.capture()
    llm.engine.sampler.graphs = SampleByRerun(r.graphs)
    llm.engine.sampler.graphs.capture()
    if spec_query_len:
        r.spec_graphs = ReplayByRerun(*args, tokens_per_seq=spec_query_len)
        r.spec_graphs.capture()
    return llm


def outputs(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=24 - 5 * i, ignore_eos=True) for i in range(len(PROMPTS))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return outputs(LLM(tiny_model_dir, **COMMON))


def test_decode_steps_on_graph_buffers(tiny_model_dir, plain):
    llm = with_graphs(LLM(tiny_model_dir, attention_backend="triton", **COMMON), None)
    llm.engine._can_overlap = lambda *a: False      # step by step here; overlapped below
    assert outputs(llm) == plain
    assert llm.engine.runner.graphs.replays > 10


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_overlapped_decoding_matches_step_by_step(tiny_model_dir, kv_cache_dtype):
    """Overlapped decoding on graph buffers, with the fused sampling kernel in Triton's interpreter; also
    over a float8 KV cache (the interpreter rounds to float8 its own way, so only against itself)."""
    llm = with_graphs(LLM(tiny_model_dir, attention_backend="triton", kv_cache_dtype=kv_cache_dtype, **COMMON), None)
    check_overlapped_decoding(llm, PROMPTS, [24, 19, 14], longest=0)


def test_sampling_graphs_draw_what_the_sampler_draws(tiny_model_dir):
    check_sampling_graphs(lambda: with_graphs(LLM(tiny_model_dir, attention_backend="triton", **COMMON), None),
                          PROMPTS, max_tokens=12)


def test_overlapped_decoding_with_grammar_rows(tiny_model_dir):
    llm = with_graphs(LLM(tiny_model_dir, attention_backend="triton", **COMMON), None)
    check_overlapped_grammar(llm, PROMPTS)


def test_overlapped_grammar_rows_in_the_mask_worker(tiny_model_dir):
    """The same check with the masks filled by the worker process, overlapped steps included."""
    llm = with_graphs(LLM(tiny_model_dir, attention_backend="triton", grammar_mask_worker="on", **COMMON), None)
    engine, ahead = llm.engine, []
    submit = engine._submit_masks
    engine._submit_masks = lambda *a, **k: ahead.append(submit(*a, **k)) or ahead[-1]
    check_overlapped_grammar(llm, PROMPTS)
    assert any(v is not None for v in ahead) and not engine.mask_worker.failed
    engine.mask_worker.close()


def test_overlapped_steps_export_the_blocks_they_fill(tiny_model_dir):
    """Blocks filled by overlapped steps reach the tier with the KV they hold (the shared check), and a
    cold engine on the same store loads the prompts plus their outputs and continues alike."""
    from services.prefix_cache.store import MemoryKVStore
    from services.prefix_cache.tier import KVTier
    from services.prefix_cache.tier_config import KVTierConfig
    store = MemoryKVStore(2**30)
    tier = KVTier(KVTierConfig(write_policy="computed"), store=store)
    llm = with_graphs(LLM(tiny_model_dir, attention_backend="triton", kv_tier=tier, **COMMON), None)
    outs = check_overlapped_tier_export(llm, tier, PROMPTS, max_tokens=24)
    longer = [llm.engine.tokenizer.encode(p) + o for p, o in zip(PROMPTS, outs)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(tiny_model_dir, **COMMON).generate(longer, params)]
    cold_tier = KVTier(KVTierConfig(), store=store)
    cold = LLM(tiny_model_dir, kv_tier=cold_tier, **COMMON)
    assert [o.outputs[0].token_ids for o in cold.generate(longer, params)] == want
    assert cold_tier.stats.blocks_hit == sum((len(p) - 1) // 16 for p in longer)
    tier.close()
    cold_tier.close()


def test_speculative_steps_on_graph_buffers(tiny_model_dir, plain):
    llm = with_graphs(LLM(tiny_model_dir, attention_backend="triton", proposers={"ngram": build_proposer("ngram")},
                          speculative_method="ngram", speculative_adaptive=False, **COMMON), 5)
    runner = llm.engine.runner
    eager = eager_spec_steps(runner)
    assert outputs(llm) == plain
    assert llm.engine.speculator.stats.num_accepted_tokens > 0
    # Steps with guesses replay (rows with fewer guesses than k included) unless a prefill rides along.
    assert runner.spec_graphs.replays > 0 and not any(eager)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("chained", [False, True], ids=["pass-by-pass", "chained"])
def test_greedy_draft_passes_on_device_tokens(tiny_draft_dir, chained):
    """The draft model's greedy passes after the first take their input ids from the device (no
    read between passes; `chained`: all in one replay of the chain graphs): its guesses equal the
    eager draft's, over calls that roll back, append and ask for different k per sequence."""
    from services.draft.draft_model import DraftModel
    from services.draft.protocol import DraftCall
    from services.engine.layers.gpu_attention import TritonAttention

    eager = DraftModel(tiny_draft_dir, device="cpu", dtype="float32", num_kv_blocks=128)
    fast = DraftModel(tiny_draft_dir, device="cpu", dtype="float32", num_kv_blocks=128)
    r = fast.runner
    r.backend = TritonAttention()
    args = (r.model, r.kv_caches, r.backend, r.block_size, 4, 256, r.device)
    r.graphs, r.spec_graphs = ReplayByRerun(*args), ReplayByRerun(*args, tokens_per_seq=5)
    r.graphs.capture()
    r.spec_graphs.capture()
    fast.chain = ChainByRerun(*args, max_passes=3) if chained else None
    if chained:
        fast.chain.capture()
    on_device, greedy_on_device = [0], fast._greedy_on_device

    def counted(*a):
        on_device[0] += 1
        return greedy_on_device(*a)
    fast._greedy_on_device = counted
    prompts = [list(range(10, 40)), list(range(50, 61)), [7, 8, 9] * 6]
    sent = [0] * len(prompts)
    calls = [DraftCall(f"s{j}", 0, p, 4, 0.0) for j, p in enumerate(prompts)]
    for round_ in range(4):
        want, got = eager.propose(calls), fast.propose(calls)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert all(len(w.token_ids) == c.num_speculative_tokens for w, c in zip(want, calls))
        # The target accepted the first j guesses of sequence j and added a token of its own.
        nxt = []
        for j, (c, w) in enumerate(zip(calls, want)):
            sent[j] = c.prefix_len + len(c.new_token_ids)
            new = w.token_ids[:j % 3] + [100 + round_]
            nxt.append(DraftCall(c.seq_id, sent[j], new, 2 + (j + round_) % 3, 0.0))
        calls = nxt
    assert on_device[0] == 4 and r.spec_graphs.replays > 0
    assert fast.chain.replays == 4 if chained else r.graphs.replays > 0
    fast.kv.check_invariants()
