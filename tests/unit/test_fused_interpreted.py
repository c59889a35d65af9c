"""Fused GPU kernels (layers/fused.py: `sample_rows`, `gemv`; the attention kernel's float8 V) in Triton's
interpreter, on the CPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the GPU tests run the compiled kernel")

from services.engine.layers import fused  # noqa: E402
from services.engine.layers.gpu_attention import TritonAttention  # noqa: E402
from tests.engine_checks import check_norm_and_silu_quantize_their_output  # noqa: E402
from tests.gpu.paged_inputs import every_float8_value  # noqa: E402


@pytest.mark.parametrize("splits", [None, 2, 3])
def test_split_rows_draw_what_one_program_a_row_draws(splits):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5000, generator=g) * 4
    logits[2, 100:] = float("-inf")                       # everything past the first chunk masked
    temp = torch.tensor([0.0, 0.8, 1.3])
    one, one_lp = fused.sample_rows(logits, temp, seed=7, splits=1)
    out = torch.empty(6, dtype=torch.float64)                # the host's copy: tokens, then logprobs
    tokens, lps = fused.sample_rows(logits, temp, seed=7, splits=splits, out=out)
    assert torch.equal(tokens, one) and torch.equal(out, torch.cat([tokens.double(), lps.double()]))
    assert tokens[0] == logits[0].argmax() and tokens[2] < 100
    torch.testing.assert_close(lps, one_lp)
    torch.testing.assert_close(lps, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))


@pytest.mark.parametrize("splits", [1, 3])
def test_a_seed_read_from_device_memory_draws_what_the_same_seed_as_an_argument_draws(splits):
    """The sampling CUDA graphs (cuda_graphs.SampleGraphs) hand the kernel its seed in a tensor."""
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1)) * 3
    temp = torch.tensor([1.0, 0.7, 0.0, 1.5])
    tokens, lps = fused.sample_rows(logits, temp, seed=12345, splits=splits)
    from_memory, memory_lps = fused.sample_rows(logits, temp, seed=torch.tensor([12345]), splits=splits)
    assert torch.equal(from_memory, tokens) and torch.equal(memory_lps, lps)
    assert not torch.equal(fused.sample_rows(logits, temp, seed=torch.tensor([54321]), splits=splits)[0], tokens)


@pytest.mark.parametrize("splits", [1, 3])
def test_a_token_bitmask_in_the_kernel_is_the_bitmask_applied_first(splits):
    """Rows with a limit keep the tokens below it whose bit is set (bit 31 included); a row whose limit
    is -1 is untouched: tokens and logprobs as if the masked logits had been -inf."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5000, generator=g) * 4
    mask = torch.randint(-2**31, 2**31 - 1, (3, 160), generator=g, dtype=torch.int32)   # 5120 bits a row
    limit = torch.tensor([4990, -1, 5000], dtype=torch.int32)
    mask[2] = 0
    mask[2, 3] = -2**31 | 1                                # only tokens 96 and 127 allowed
    temp = torch.tensor([0.9, 0.0, 1.1])
    want = logits.clone()
    want[0] = _masked(logits[0], mask[0], 4990)
    want[2] = _masked(logits[2], mask[2], 5000)
    tokens, lps = fused.sample_rows(logits, temp, seed=3, splits=splits, mask=mask, mask_limit=limit)
    ref, ref_lp = fused.sample_rows(want, temp, seed=3, splits=splits)
    assert torch.equal(tokens, ref) and tokens[2] in (96, 127)
    torch.testing.assert_close(lps, ref_lp)


def _masked(row: torch.Tensor, words: torch.Tensor, limit: int) -> torch.Tensor:
    bits = ((words.to(torch.int64)[:, None] >> torch.arange(32)) & 1).flatten()[:row.shape[0]].bool()
    bits[limit:] = False
    return row.masked_fill(~bits, float("-inf"))


@pytest.mark.parametrize("n,k,bias", [(1152, 896, True), (896, 4864, False), (37, 100, False)])
def test_gemv_is_a_one_row_linear(n, k, bias):
    g = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    # Against float64: float32 sums of k terms of size ~sqrt(k) differ by ~1e-4 between summation orders.
    want = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    torch.testing.assert_close(fused.gemv(x, w, b), want, atol=5e-4, rtol=1e-4)


def test_rotary_write_kv_is_rotary_then_the_cache_write():
    from services.engine.layers.attention import write_kv
    from services.engine.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(4)
    t, hq, hk, d, blocks, page = 5, 6, 2, 16, 4, 4
    rope = RotaryEmbedding(d, 64, {"rope_theta": 10000.0, "rope_type": "default"})
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)       # q, k, v as strided views, as in the model
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    positions = torch.tensor([0, 3, 7, 8, 20])
    slots = torch.tensor([1, 6, -1, 9, 15])                     # -1: a padding row writes nothing
    cache = torch.zeros(2, blocks, page, hk, d)
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    fused.rotary_write_kv_(q, k, v, positions, rope.cos, rope.sin, (cache[0], cache[1]), slots)

    ref = torch.zeros_like(cache)
    keep = slots >= 0
    write_kv(ref_k[keep], v[keep], (ref[0], ref[1]), slots[keep])
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(cache, ref)


def test_rotary_in_place_matches_the_eager_rope():
    from services.engine.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(5)
    rope = RotaryEmbedding(16, 64, {"rope_theta": 10000.0, "rope_type": "default"})
    qkv = torch.randn(4, (6 + 2 * 2) * 16, generator=g)
    q, k, _ = (x.view(4, -1, 16) for x in qkv.split([6 * 16, 2 * 16, 2 * 16], dim=-1))
    positions = torch.tensor([0, 5, 9, 63])
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    fused.rotary_(q, k, positions, rope.cos, rope.sin)
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_float8_value_of_v_reads_back_exactly(head_dim):
    """The bit moves that turn a float8 V into fp16 (int16 pairs): one key a sequence returns its V row, every
    finite float8 value included. The rows are float8 values already, so the interpreter's own rounding to
    float8 (in the K/V write) leaves them as they are."""
    inputs, want = every_float8_value(head_dim)
    assert torch.equal(TritonAttention().forward(*inputs, head_dim ** -0.5), want)


def test_gemv_over_float8_weights_applies_each_rows_scale():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 300, generator=g).to(torch.float8_e4m3fn)
    scale = torch.rand(1, 40, generator=g) + 0.5
    x = torch.randn(1, 300, generator=g)
    want = F.linear(x, w.float() * scale.t())
    torch.testing.assert_close(fused.gemv(x, w, scale=scale), want, atol=5e-4, rtol=1e-4)


def test_rows_quantize_to_float8_with_their_own_scales():
    """Each row's largest magnitude maps to 448 and sets its scale; values that float8 holds exactly come back
    exactly (the interpreter's own float32 -> float8 rounding is not the GPU's, so rounding is tested on the
    GPU: tests/gpu/test_gpu_fused.py); an all-zero row stays zero."""
    from services.engine.layers.quant import quantize_rows   # noqa: PLC0415
    g = torch.Generator().manual_seed(5)
    v = torch.randn(4, 700, generator=g).mul(60).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    v[:, 9] = 448.0
    v[3] = 0.0
    powers = torch.tensor([[2.0 ** -12], [1.0], [2.0 ** 5], [1.0]])
    q, scale = quantize_rows(v * powers)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert torch.equal(q.float(), v) and torch.equal(scale[:3], powers[:3])


@pytest.mark.parametrize("residual", [False, True])
def test_norm_and_silu_hand_a_float8_layer_what_quantizing_their_output_gives(residual):
    """add+RMSNorm and SiLU-and-mul with `quant` write float8 rows and scales: exactly their own output
    quantized row by row (models/llama.py hands them to a float8 layer instead of quantizing again)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 96, generator=g), torch.randn(96, generator=g)
    r = torch.randn(5, 96, generator=g) if residual else None
    gate_up = torch.randn(5, 2 * 80, generator=g) * 3
    check_norm_and_silu_quantize_their_output(x, r, w, 1e-6, gate_up)


def test_a_float8_layer_keeps_a_scale_per_output_channel():
    """Fp8Linear quantizes W row by row (a row is an output channel): values float8 holds come back exactly,
    each row's scale is its largest magnitude / 448."""
    from services.engine.layers.quant import Fp8Linear   # noqa: PLC0415
    g = torch.Generator().manual_seed(8)
    v = torch.randn(40, 96, generator=g).mul(60).clamp(-440, 440).to(torch.float8_e4m3fn).float()
    v[:, 3] = 448.0
    powers = torch.tensor([[2.0 ** -10]] * 20 + [[2.0 ** 3]] * 20)
    layer = torch.nn.Linear(96, 40, bias=False)
    layer.weight.data = v * powers
    fp8 = Fp8Linear(layer)
    assert fp8.weight.dtype == torch.float8_e4m3fn and torch.equal(fp8.weight.float(), v)
    assert torch.equal(fp8.weight_scale, powers.t()) and fp8.out_dtype == torch.float32
