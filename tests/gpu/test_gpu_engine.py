"""The GPU path (Triton attention, CUDA graphs, GPU sampling) generates what the CPU reference path
generates: same weights, greedy decoding, a batch with different prompt lengths and a shared prefix.

float32 on both sides: identical tokens. bf16 on the GPU against float32 on the CPU: log-probabilities
of the first generated token within bf16 tolerance, and identical tokens for a short horizon on the
trained tiny model (random weights give near-ties that bf16 rounding may flip, so there only the
positions where the reference's top-2 margin exceeds the tolerance are compared).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from loadtest.bench_engine import ensure_tokenizer
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from tests.engine_checks import (check_overlapped_decoding, check_overlapped_grammar, check_overlapped_tier_export,
                                 check_sampling_graphs, grammar_runner)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
DUMMY = REPO / "loadtest" / "configs" / "qwen2.5-0.5b"
PROMPTS = [list(range(100, 133)), list(range(100, 133)) + [7, 8, 9], [5] * 3, list(range(1000, 1200))]
BF16_LOGPROB_TOL = 0.15


def tokenizer_dir(tiny_model_dir: str) -> str:
    if not (Path(tiny_model_dir) / "tokenizer.json").exists():
        pytest.skip("the tiny model (models/tiny-target) is not there yet")
    return tiny_model_dir


def pair(model: str, tokenizer: str, dummy: bool, gpu_dtype: str):
    common = dict(tokenizer=tokenizer, load_format="dummy" if dummy else "auto", max_num_seqs=8,
                  max_model_len=512, num_kv_blocks=256, seed=0)
    cpu = LLM(model, device="cpu", dtype="float32", **common)
    gpu = LLM(model, device="cuda", dtype=gpu_dtype, **common)
    # Dummy weights are drawn by each device's generator: give the GPU model the CPU's weights
    # (in place, so the captured CUDA graphs still point at them).
    with torch.no_grad():
        for p_gpu, p_cpu in zip(gpu.engine.runner.model.parameters(), cpu.engine.runner.model.parameters()):
            p_gpu.copy_(p_cpu)
    assert gpu.engine.runner.graphs is not None and gpu.engine.runner.graphs.graphs
    return cpu, gpu


def generate(llm: LLM, n: int):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=5))
    return [o.outputs[0] for o in outs]


def test_dummy_config_float32_tokens_identical():
    cpu, gpu = pair(str(DUMMY), ensure_tokenizer(None), True, "float32")
    for c, g in zip(generate(cpu, 16), generate(gpu, 16)):
        assert g.token_ids == c.token_ids
        for lc, lg in zip(c.logprobs, g.logprobs):
            for t, lp in lc.items():
                if t in lg:
                    assert abs(lg[t].logprob - lp.logprob) < 1e-3


def compare_bf16(cpu_outs, gpu_outs, horizon: int, require_all: bool, tol: float = BF16_LOGPROB_TOL) -> int:
    compared = 0
    for c, g in zip(cpu_outs, gpu_outs):
        first_c, first_g = c.logprobs[0], g.logprobs[0]
        for t, lp in first_c.items():
            if t in first_g:
                assert abs(first_g[t].logprob - lp.logprob) < tol, (t, lp, first_g[t])
        for i in range(horizon):
            top = sorted((lp.logprob for lp in c.logprobs[i].values()), reverse=True)
            if not require_all and top[0] - top[1] < tol:
                break                                          # a near-tie: the rest may diverge
            assert g.token_ids[i] == c.token_ids[i], (i, c.token_ids[:horizon], g.token_ids[:horizon])
            compared += 1
    return compared


def test_dummy_config_bf16_within_tolerance():
    cpu, gpu = pair(str(DUMMY), ensure_tokenizer(None), True, "bfloat16")
    compare_bf16(generate(cpu, 8), generate(gpu, 8), 8, require_all=False)


def test_tiny_model_bf16_tokens_identical(tiny_model_dir):
    tok = tokenizer_dir(tiny_model_dir)
    cpu, gpu = pair(tiny_model_dir, tok, False, "bfloat16")
    assert compare_bf16(generate(cpu, 8), generate(gpu, 8), 8, require_all=False) >= len(PROMPTS)


def test_fp8_kv_cache_decodes_close_to_bf16(tiny_model_dir):
    """The same GPU model with a bf16 and a float8 KV cache: first-token log-probabilities within 0.3 (the
    CPU test sees up to ~0.12 against float32), greedy tokens alike up to the first near-tie."""
    common = dict(tokenizer=tokenizer_dir(tiny_model_dir), device="cuda", max_num_seqs=8, max_model_len=512,
                  num_kv_blocks=256, seed=0)
    bf16, fp8 = LLM(tiny_model_dir, **common), LLM(tiny_model_dir, kv_cache_dtype="fp8", **common)
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn and fp8.engine.runner.graphs.graphs
    assert compare_bf16(generate(bf16, 8), generate(fp8, 8), 8, require_all=False, tol=0.3) >= len(PROMPTS)
    check_overlapped_decoding(fp8, PROMPTS, [1, 5, 17, 40], longest=3)


def test_fp8_weights_decode_close_to_bf16(tiny_model_dir):
    """quantization="fp8" (float8 weights in every decoder layer, activations per token): first-token
    log-probabilities within 0.5 of bf16's, greedy tokens alike up to the first near-tie; the CUDA graphs
    replay what the eager path computes (up to the order of attention's sums: a graph splits long decode
    contexts by its longest one, the eager path by the batch's), and every KV block comes back."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 tensor cores need compute capability 8.9+")
    common = dict(tokenizer=tokenizer_dir(tiny_model_dir), device="cuda", max_num_seqs=8, max_model_len=512,
                  num_kv_blocks=256, seed=0)
    bf16, fp8 = LLM(tiny_model_dir, **common), LLM(tiny_model_dir, quantization="fp8", **common)
    layer = fp8.engine.runner.model.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn and fp8.engine.runner.graphs.graphs
    assert fp8.engine.runner.model.lm_head.weight.dtype == torch.bfloat16
    assert compare_bf16(generate(bf16, 8), generate(fp8, 8), 8, require_all=False, tol=0.5) >= len(PROMPTS) // 2
    eager = LLM(tiny_model_dir, quantization="fp8", enforce_eager=True, **common)
    assert compare_bf16(generate(eager, 12), generate(fp8, 12), 12, require_all=False) >= len(PROMPTS)
    check_overlapped_decoding(fp8, PROMPTS, [1, 5, 17, 40], longest=3)
    assert fp8.engine.kv.num_free_blocks == fp8.engine.kv.num_blocks


def test_sampling_graphs_draw_what_the_sampler_draws(tiny_model_dir):
    check_sampling_graphs(lambda: LLM(tiny_model_dir, device="cuda", max_num_seqs=8, max_model_len=512,
                                      num_kv_blocks=256, seed=0), PROMPTS[:3], max_tokens=24)


def test_overlapped_decoding_matches_step_by_step():
    llm = LLM(str(DUMMY), tokenizer=ensure_tokenizer(None), load_format="dummy", device="cuda", dtype="float32",
              max_num_seqs=8, max_model_len=512, num_kv_blocks=256, seed=0)
    check_overlapped_decoding(llm, PROMPTS, [1, 5, 17, 40], longest=3)


@pytest.mark.parametrize("mask_worker", ["off", "on"])
def test_overlapped_decoding_with_grammar_rows(tiny_model_dir, mask_worker):
    """Masks filled in the engine's process and in the mask worker's (its shared bitmask page-locked)."""
    llm = LLM(tiny_model_dir, device="cuda", dtype="float32", max_num_seqs=8, num_kv_blocks=256, seed=0,
              grammar_mask_worker=mask_worker)
    check_overlapped_grammar(llm, ["Name and age as JSON:", "def add(a, b):\n", "Is it true? Answer:"])
    worker = llm.engine.mask_worker
    if worker is not None:
        assert not worker.failed and worker._step > 10 and worker._pinned
        worker.close()


def test_a_mask_worker_that_dies_while_the_gpu_waits_for_it_loses_nothing(tiny_model_dir):
    """An overlapped step's sampling waits on the GPU for the mask workers' flags. A worker stopped
    before it read its rows, then killed: the engine fills them and sets the flags, the GPU goes on,
    and the text is the same as with every mask filled in the engine's process."""
    prompts = ["Name and age as JSON:", "def add(a, b):\n", "Is it true? Answer:"]

    def make(mode: str) -> LLM:
        return LLM(tiny_model_dir, device="cuda", dtype="float32", max_num_seqs=8, num_kv_blocks=256, seed=0,
                   grammar_mask_worker=mode)
    want = grammar_runner(make("off"), prompts)()
    llm = make("on")
    worker, gated = llm.engine.mask_worker, []
    assert worker._gate is not None
    submit, collect = worker.submit, worker.collect

    def stop_then_submit(*args):
        if worker._step == 6:
            os.kill(worker._procs[0].pid, signal.SIGSTOP)
        return submit(*args)

    def collect_then_kill(order=None, gate=False):
        stopped = worker._step == 7 and not gated
        if stopped and not gate:                   # a blocking collect would wait for it: this test is moot
            worker._procs[0].kill()
        masks = collect(order, gate)
        if stopped:
            gated.append(gate and masks is not None)
            worker._procs[0].kill()
        return masks
    worker.submit, worker.collect = stop_then_submit, collect_then_kill
    assert grammar_runner(llm, prompts)() == want
    assert gated == [True] and worker.failed
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_overlapped_steps_export_the_blocks_they_fill():
    from services.prefix_cache.store import MemoryKVStore
    from services.prefix_cache.tier import KVTier
    from services.prefix_cache.tier_config import KVTierConfig
    tier = KVTier(KVTierConfig(write_policy="computed"), store=MemoryKVStore(2**30))
    llm = LLM(str(DUMMY), tokenizer=ensure_tokenizer(None), load_format="dummy", device="cuda", dtype="bfloat16",
              max_num_seqs=8, max_model_len=512, num_kv_blocks=256, seed=0, kv_tier=tier)
    check_overlapped_tier_export(llm, tier, PROMPTS, max_tokens=40)
    tier.close()
