"""The fused Triton kernels (layers/fused.py) against the eager ops the CPU path runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from services.engine.layers import fused  # noqa: E402
from services.engine.layers.rotary import _apply  # noqa: E402
from tests.engine_checks import check_norm_and_silu_quantize_their_output  # noqa: E402

DTYPES = [torch.bfloat16, torch.float32]


def tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


def ref_rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 896), (37, 2048), (130, 4096), (0, 896)])
def test_add_rms_norm(dtype, t, n):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(t, n, device="cuda", generator=g).to(dtype)
    res = torch.randn(t, n, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    torch.testing.assert_close(fused.add_rms_norm(x, None, w, 1e-6), ref_rms_norm(x, w, 1e-6), **tol(dtype))
    want_res = res + x
    out = fused.add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(res, want_res, atol=0, rtol=0)       # the residual add rounds as eager does
    torch.testing.assert_close(out, ref_rms_norm(want_res, w, 1e-6), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(14, 2, 64), (32, 8, 128), (4, 4, 96)])
def test_rotary_in_place_on_qkv_views(dtype, hq, hk, d):
    t = 19
    g = torch.Generator("cuda").manual_seed(1)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device="cuda", generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    pos = torch.randint(0, 500, (t,), device="cuda", generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = torch.outer(torch.arange(512, device="cuda").float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    want_q, want_k = _apply(q, c, s), _apply(k, c, s)
    v_before = qkv[:, (hq + hk) * d:].clone()
    fused.rotary_(q, k, pos, cos, sin)
    torch.testing.assert_close(q, want_q, **tol(dtype))
    torch.testing.assert_close(k, want_k, **tol(dtype))
    assert torch.equal(qkv[:, (hq + hk) * d:], v_before)            # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 4864), (64, 8192), (3, 100)])
def test_silu_and_mul(dtype, t, n):
    x = torch.randn(t, 2 * n, device="cuda").to(dtype)
    gate, up = x.split(n, dim=-1)
    torch.testing.assert_close(fused.silu_and_mul(x), F.silu(gate) * up, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,bias", [(1152, 896, True), (896, 4864, False), (151936, 896, False), (37, 100, False)])
def test_gemv_matches_linear(dtype, n, k, bias):
    g = torch.Generator("cuda").manual_seed(1)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    x = torch.randn(1, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    torch.testing.assert_close(fused.gemv(x, w, b), F.linear(x, w, b), **tol(dtype))


def test_sample_rows_greedy_and_logprobs():
    g = torch.Generator("cuda").manual_seed(2)
    logits = torch.randn(9, 50000, device="cuda", generator=g) * 3
    logits[3, :1000] = float("-inf")                                 # masked tokens (grammar, bans)
    tokens, lps = fused.sample_rows(logits, torch.zeros(9, device="cuda"), seed=5)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(lps, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))


@pytest.mark.parametrize("rows,vocab", [(1, 151936), (5, 128256), (300, 32000)])
def test_sample_rows_split_vocabulary_draws_the_same_tokens(rows, vocab):
    """Small batches split each row over several programs: the same tokens (every element keeps its own
    noise) and logprobs as one program a row, greedy and sampled rows mixed."""
    g = torch.Generator("cuda").manual_seed(rows)
    logits = torch.randn(rows, vocab, device="cuda", generator=g) * 4
    logits[0, 1000:] = float("-inf")                                 # a row masked past its first chunk
    temp = torch.tensor([0.0, 0.8, 1.3] * rows, device="cuda")[:rows]
    one, one_lp = fused.sample_rows(logits, temp, seed=11, splits=1)
    split, split_lp = fused.sample_rows(logits, temp, seed=11)
    assert torch.equal(one, split)
    torch.testing.assert_close(one_lp, split_lp)
    torch.testing.assert_close(split_lp, logits.log_softmax(-1).gather(1, split[:, None]).squeeze(1))
    assert split[0] == logits[0].argmax()


@pytest.mark.parametrize("rows", [1, 32])
def test_sample_rows_with_a_grammar_bitmask_is_xgrammars_mask_applied_first(rows):
    """The bitmask inside the sampling kernel gives the tokens and logprobs of the logits masked by
    xgrammar's own kernel (a 128k vocabulary padded to 128,512 logits), unconstrained rows untouched."""
    from services.grammar.matcher import apply_token_bitmask  # noqa: PLC0415
    g = torch.Generator("cuda").manual_seed(rows)
    vocab, width = 128256, 128512
    logits = torch.randn(rows, width, device="cuda", generator=g) * 4
    mask = torch.randint(-2**31, 2**31 - 1, (rows, -(-vocab // 32)), device="cuda", generator=g, dtype=torch.int32)
    mask[0] &= torch.randint(-2**31, 2**31 - 1, mask[0].shape, device="cuda", generator=g, dtype=torch.int32)
    constrained = [i for i in range(rows) if i % 3 != 1]
    limit = torch.tensor([vocab if i in constrained else -1 for i in range(rows)], dtype=torch.int32, device="cuda")
    temp = torch.tensor([0.0, 0.8, 1.3] * rows, device="cuda")[:rows]
    want = logits.clone()
    apply_token_bitmask(want, mask, constrained, vocab)
    tokens, lps = fused.sample_rows(logits, temp, seed=5, mask=mask, mask_limit=limit)
    ref, ref_lp = fused.sample_rows(want, temp, seed=5)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(lps, ref_lp)


def test_sample_rows_follows_the_tempered_distribution():
    """8 tokens, temperature 0.7, 4000 rows: observed counts against softmax(logits / 0.7)."""
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, float("-inf")], device="cuda")
    rows = 4000
    logits = base.repeat(rows, 1)
    counts = torch.zeros(8, device="cuda")
    for seed in range(5):
        tokens, _ = fused.sample_rows(logits, torch.full((rows,), 0.7, device="cuda"), seed=seed)
        counts += torch.bincount(tokens, minlength=8).float()
    expected = (base / 0.7).softmax(-1) * counts.sum()
    assert counts[7] == 0                                            # a masked token is never drawn
    chi2 = (((counts - expected) ** 2) / expected.clamp_min(1e-9))[:7].sum().item()
    assert chi2 < 22.5, (counts.tolist(), expected.tolist())         # 6 dof, p = 0.001


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch is Hopper's")
def test_kernels_launch_dependent_on_hopper_and_chain_in_a_graph():
    """The batch-1 ITL figures rest on PDL: it must be on here (unless INFER_PDL=0), and a chain of
    dependent launches captured in a CUDA graph must compute what it computes eagerly."""
    import os
    if os.environ.get("INFER_PDL", "1") != "0":
        assert fused._PDL_ON and fused.PDL_LAUNCH == {"launch_pdl": True}
    g = torch.Generator("cuda").manual_seed(3)
    w1 = torch.randn(2048, 1024, device="cuda", generator=g, dtype=torch.bfloat16) / 32
    w2 = torch.randn(1024, 1024, device="cuda", generator=g, dtype=torch.bfloat16) / 32
    norm = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 1024, device="cuda", generator=g, dtype=torch.bfloat16)

    def chain(x):   # each kernel reads what the one before wrote
        for _ in range(8):
            x = fused.gemv(fused.silu_and_mul(fused.gemv(fused.add_rms_norm(x, None, norm, 1e-6), w1)), w2)
        return x

    want = chain(x)
    static = x.clone()
    chain(static)   # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_quantize_rows_rounds_to_the_nearest_float8():
    """On the GPU's conversion: every value within half a float8 step of itself (2^-4 relative for normal
    values, 2^-10 of the scale for subnormal ones), the largest at 448 times the scale."""
    from services.engine.layers.quant import quantize_rows   # noqa: PLC0415
    g = torch.Generator("cuda").manual_seed(6)
    x = torch.randn(5, 4096, device="cuda", generator=g) * torch.tensor([[1e-3], [1.0], [300.0], [0.0], [1.0]],
                                                                        device="cuda")
    q, scale = quantize_rows(x.bfloat16())
    x = x.bfloat16().float()
    back = q.float() * scale
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -10).all()
    assert q[:3].float().abs().amax(1).tolist() == [448.0] * 3 and not q[3].float().any()


@pytest.mark.parametrize("m", [1, 3, 17, 128, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_linear_layer_within_float8_rounding(m, bias):
    """A float8 layer against its bf16 original: one row through the GEMV (weights rounded), more through
    torch._scaled_mm (activations too); the relative error of the product is float8's (~4 % on random data)."""
    from services.engine.layers.quant import Fp8Linear   # noqa: PLC0415
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 tensor cores need compute capability 8.9+")
    torch.manual_seed(m)
    layer = torch.nn.Linear(2048, 3072, bias=bias, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
    want, got = layer(x).float(), Fp8Linear(layer)(x).float()
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 0.06


@pytest.mark.parametrize("t", [3, 130])
def test_norm_and_silu_quantize_what_they_write(t):
    """With `quant`, add+RMSNorm and SiLU-and-mul write exactly their bf16 output quantized row by row."""
    g = torch.Generator("cuda").manual_seed(t)
    x, r = (torch.randn(t, 4096, device="cuda", generator=g).bfloat16() for _ in range(2))
    w = torch.randn(4096, device="cuda", generator=g).bfloat16()
    gate_up = (torch.randn(t, 2 * 14336, device="cuda", generator=g) * 3).bfloat16()
    check_norm_and_silu_quantize_their_output(x, r, w, 1e-5, gate_up)
