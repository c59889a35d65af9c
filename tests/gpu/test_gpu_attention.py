"""The GPU attention backends compute what TorchAttention computes, on random paged inputs (bf16 and
float32): decode, prefill, prefill over a cached prefix, shared prefix blocks, split-KV decode; and over a
float8 cache, written with torch's rounding and saturation."""
from __future__ import annotations

import pytest
import torch

from services.engine.layers.attention import TorchAttention
from services.engine.layers import fused
from services.engine.layers.gpu_attention import TritonAttention, make_backend, write_kv_fused
from services.engine.layers.rotary import RotaryEmbedding
from paged_inputs import every_float8_value, random_paged_inputs, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [  # (query lens, cached context lens, heads, kv heads, head dim)
    ([1, 1, 1, 1], [40, 37, 5, 300], 14, 2, 64),         # decode, Qwen2.5-0.5B heads (group 7)
    ([1] * 8, [1000, 2047, 17, 600, 64, 1, 512, 900], 32, 8, 64),   # decode, long contexts (splits)
    ([1], [3000], 32, 8, 128),                           # batch-1 decode, Llama-8B heads
    ([57, 200, 1], [32, 16, 0], 32, 8, 128),             # prefill over cached prefixes + a decode
    ([130], [0], 6, 6, 64),                              # plain prefill, no GQA
]


# Flex compiles a kernel per shape (tens of seconds each): two shapes, bf16 only.
PARAMS = [("triton", dt, c) for dt in (torch.bfloat16, torch.float32) for c in CASES] + \
    [("flex", torch.bfloat16, CASES[0]), ("flex", torch.bfloat16, CASES[3])]


@pytest.mark.parametrize("name,dtype,case", PARAMS)
def test_backend_matches_torch_attention(name, dtype, case):
    q_lens, ctx_lens, h, kvh, d = case
    for seed in (0, 1):                                   # fresh random inputs each time
        q, k, v, cache, meta = random_paged_inputs(q_lens, ctx_lens, h, kvh, d, dtype=dtype, device="cuda",
                                                   seed=seed)
        ref_cache = tuple(t.clone() for t in cache)
        ref = TorchAttention().forward(q.double(), k.double(), v.double(),
                                       tuple(t.double() for t in ref_cache), meta, d ** -0.5)
        TorchAttention().forward(q, k, v, ref_cache, meta, d ** -0.5)        # reference cache writes
        out = make_backend(name).forward(q, k, v, cache, meta, d ** -0.5)
        assert torch.isfinite(out).all()
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        assert rel_err(out, ref) < tol, (name, case, seed, rel_err(out, ref))
        assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])


def test_split_decode_equals_unsplit():
    q, k, v, cache, meta = random_paged_inputs([1, 1], [4000, 700], 32, 8, 128, dtype=torch.bfloat16,
                                               device="cuda", seed=3)
    backend = TritonAttention()
    assert backend.num_splits(meta, 2, 8) > 1
    split = backend.forward(q, k, v, tuple(t.clone() for t in cache), meta, 128 ** -0.5)
    backend.max_splits = 1
    whole = backend.forward(q, k, v, tuple(t.clone() for t in cache), meta, 128 ** -0.5)
    assert rel_err(split, whole) < 1e-2


FP8 = torch.float8_e4m3fn


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("case", CASES)
def test_triton_over_an_fp8_cache(case):
    q_lens, ctx_lens, h, kvh, d = case
    q, k, v, cache, meta = random_paged_inputs(q_lens, ctx_lens, h, kvh, d, dtype=torch.bfloat16, device="cuda")
    cache = tuple(t.to(FP8) for t in cache)
    ref_cache = tuple(t.clone() for t in cache)
    TorchAttention().forward(q, k, v, ref_cache, meta, d ** -0.5)                    # torch's rounding
    ref = TorchAttention().forward(q.double(), k.double(), v.double(), tuple(t.clone() for t in cache), meta,
                                   d ** -0.5)
    out = TritonAttention().forward(q, k, v, cache, meta, d ** -0.5)
    assert same_bytes(cache[0], ref_cache[0]) and same_bytes(cache[1], ref_cache[1])
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)
    # Values past the float8 range saturate at +-448 in both writes (not NaN).
    write_kv_fused(k * 300, v * 300, cache, meta.slot_mapping)
    TorchAttention().forward(q, k * 300, v * 300, ref_cache, meta, d ** -0.5)
    assert same_bytes(cache[0], ref_cache[0]) and same_bytes(cache[1], ref_cache[1])
    assert cache[0].float().abs().max() == 448.0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_float8_value_of_v_reads_back_exactly(head_dim):
    """A float8 V goes to fp16 a pair at a time (read as int16 pairs, one cvt each): with one key a sequence,
    attention returns each V row exactly, every finite value (subnormals, +-448) included."""
    inputs, want = every_float8_value(head_dim, torch.bfloat16, "cuda")
    out = TritonAttention().forward(*inputs, head_dim ** -0.5)
    assert torch.equal(out.float(), want.float())


def test_rotary_write_kv_into_an_fp8_cache_rounds_once():
    """RoPE in float32 then one rounding to float8: against rotating into a bf16 cache and converting that,
    the only differences are double-rounding cases, one float8 step apart."""
    q, k, v, cache, meta = random_paged_inputs([40, 1], [0, 20], 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    pos = torch.cat([torch.arange(40), torch.tensor([20])]).cuda()
    rope = RotaryEmbedding(128, 64, {"rope_theta": 10000.0, "rope_type": "default"}).to("cuda")
    cos, sin = rope.cos, rope.sin
    bf16 = tuple(t.clone() for t in cache)
    f8 = tuple(t.to(FP8) for t in cache)
    fused.rotary_write_kv_(q.clone(), k.clone(), v, pos, cos, sin, bf16, meta.slot_mapping)
    fused.rotary_write_kv_(q.clone(), k.clone(), v, pos, cos, sin, f8, meta.slot_mapping)
    for a, b in zip(f8, bf16):
        b = b.to(FP8)
        differ = a.view(torch.uint8) != b.view(torch.uint8)
        assert differ.float().mean() < 3e-2     # ~1 % measured: bf16 lands on a float8 tie ~1 time in 64
        assert ((a.float() - b.float()).abs() <= b.float().abs() / 8 + 2 ** -9)[differ].all()
