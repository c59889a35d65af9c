"""Fused GPU kernels for the decoder's elementwise work: one launch where eager PyTorch takes 5-15.

A decode step of a small model is launch-bound: RMSNorm alone is ~7 kernels (cast, square, mean,
rsqrt, two multiplies, cast back), rotary embedding ~15 (gathers, casts, cat, negate, multiply-add
for q and for k), SiLU-and-multiply 2; at 1-2 us each, a 24-layer model spends more time in them
than in its GEMMs. These Triton kernels do each in one pass, in float32 registers:

- `add_rms_norm(x, residual, w)`: residual <- x + residual (rounded to the model dtype, as the eager
  add is), returns rms_norm(residual) * w. With residual None, plain RMSNorm (the first layer).
- `rotary_(q, k, positions, cos, sin)`: rotate-half RoPE on q [T, H, D] and k [T, KVH, D] in place
  (strided views into the fused qkv output are fine).
- `rotary_write_kv_(q, k, v, positions, cos, sin, kv_cache, slots)`: the same RoPE, with rotated k and v
  written straight into the paged KV cache (TritonAttention then skips its own write).
- `silu_and_mul(gate_up)`: [T, 2I] -> silu(gate) * up, [T, I].
  Both this and `add_rms_norm` take `quant=True` to write float8 rows and their scales for a float8 layer
  (layers/quant.py), exactly what quantizing their output would give.
- `sample_rows(logits, temperature, seed)`: Gumbel-max sampling and the chosen token's logprob in one pass
  (rows of small batches split over several programs, then merged).
- `gemv(x, weight, bias, scale=)`: a one-row linear layer at the memory bandwidth (batch-1 decode), also over
  float8 weights with a scale per row.

The eager reference is what models/llama.py runs on the CPU; tests/gpu compares the two.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from services.engine.layers.attention import FP8_MAX

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:   # a Triton without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None


def _pdl_available() -> bool:
    """Programmatic dependent launch (Hopper and later, a Triton that can launch with it; INFER_PDL=0
    turns it off): a kernel's programs are scheduled while the kernel before it finishes, and wait in
    `pdl_enter` until it has, instead of the GPU draining between the two. A batch-1 decode step is ~300
    such back-to-back kernels."""
    if os.environ.get("INFER_PDL", "1") == "0" or gdc_wait is None or not torch.cuda.is_available():
        return False
    from triton.backends.nvidia.compiler import CUDAOptions
    return torch.cuda.get_device_capability() >= (9, 0) and "launch_pdl" in CUDAOptions.__dataclass_fields__


_PDL_ON = _pdl_available()
PDL = tl.constexpr(_PDL_ON)
PDL_LAUNCH = {"launch_pdl": True} if _PDL_ON else {}   # every kernel of this file and gpu_attention.py launches with it


@triton.jit
def pdl_enter():
    """Early in every kernel, before it writes anything or reads what a kernel before may write: with PDL,
    wait until the kernel before has finished and its writes are visible, then let the next kernel's
    programs be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


TL_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def store_fp8_row(Q_row, S_row, offs, mask, y):
    """One row of float8 activations (layers/quant.py): y (float32, the whole row) times 448 / its largest
    magnitude into Q_row[offs], and the scale (amax / 448) into S_row[0]; an all-zero row stays zero."""
    amax = tl.maximum(tl.max(tl.abs(y), 0), 1e-12)
    tl.store(Q_row + offs, (y * (TL_FP8_MAX / amax)).to(Q_row.dtype.element_ty), mask=mask)
    tl.store(S_row, amax / TL_FP8_MAX)


@triton.jit
def _add_rms_norm_kernel(X, R, W, Out, S, stride_x, stride_r, stride_o, N, eps,
                         HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + row * stride_x + offs, mask=m, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(R + row * stride_r + offs, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(W + offs, mask=m, other=0.0)
    y = w * (xf * rstd).to(w.dtype)
    if QUANT:   # Out is float8, S its scales
        store_fp8_row(Out + row * stride_o, S + row, offs, m, y.to(tl.float32))
    else:
        tl.store(Out + row * stride_o + offs, y, mask=m)


def fp8_row_warps(block: int) -> int:
    """Warps for a program that quantizes one row of `block` values (store_fp8_row)."""
    return min(16, max(4, block // 1024))


def fp8_rows(t: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for t rows of float8 activations and their scales (layers/quant.py)."""
    return (torch.empty(t, n, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(t, 1, dtype=torch.float32, device=device))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 quant: bool = False):
    """x, residual: [T, N] (residual updated in place to x + residual). Returns the normed rows, or with
    `quant` the normed rows as float8 with a scale per row, (q [T, N], scale [T, 1]), for a float8 layer."""
    n = x.shape[-1]
    out = fp8_rows(x.shape[0], n, x.device) if quant else torch.empty_like(x)
    rows, scales = out if quant else (out, out)   # scales unused without quant
    if x.shape[0]:
        r = residual if residual is not None else x
        _add_rms_norm_kernel[(x.shape[0],)](x, r, weight, rows, scales, x.stride(0), r.stride(0), rows.stride(0), n,
                                            eps, HAS_RESIDUAL=residual is not None, QUANT=quant,
                                            BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8,
                                            **PDL_LAUNCH)
    return out


@triton.jit
def cast_for(x, Ptr):
    """x in Ptr's element type; into a float8 KV cache clamped to +-448 first, as `to_cache_dtype` does
    (layers/attention.py)."""
    if Ptr.dtype.element_ty.is_fp8():
        x = tl.clamp(x.to(tl.float32), -TL_FP8_MAX, TL_FP8_MAX)
    return x.to(Ptr.dtype.element_ty)


@triton.jit
def _cos_sin(Pos, Cos, Sin, t, stride_c, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Token t's cos and sin rows [1, HALF_PAD] at its position, with the column offsets and their mask."""
    pos = tl.load(Pos + t)
    d = tl.arange(0, HALF_PAD)
    dm = d < HALF
    cos = tl.load(Cos + pos * stride_c + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(Sin + pos * stride_c + d, mask=dm, other=0.0)[None, :]
    return cos, sin, d, dm


@triton.jit
def _rotate_heads(Src, Dst, src_h, dst_h, cos, sin, d, dm, H: tl.constexpr, H_PAD: tl.constexpr,
                  HALF: tl.constexpr):
    """A token's H heads from Src (head stride src_h) rotated into Dst (head stride dst_h; Dst may be Src),
    neox style: halves [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]."""
    h = tl.arange(0, H_PAD)[:, None]
    m = (h < H) & dm[None, :]
    src = Src + h * src_h + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dst = Dst + h * dst_h + d[None, :]
    tl.store(dst, cast_for(x1 * cos - x2 * sin, Dst), mask=m)
    tl.store(dst + HALF, cast_for(x2 * cos + x1 * sin, Dst), mask=m)


@triton.jit
def _rotary_kernel(Q, K, Pos, Cos, Sin, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                   HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, HQ_PAD: tl.constexpr,
                   HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    cos, sin, d, dm = _cos_sin(Pos, Cos, Sin, t, stride_c, HALF, HALF_PAD)
    q, k = Q + t * stride_qt, K + t * stride_kt
    _rotate_heads(q, q, stride_qh, stride_qh, cos, sin, d, dm, HQ, HQ_PAD, HALF)
    _rotate_heads(k, k, stride_kh, stride_kh, cos, sin, d, dm, HK, HK_PAD, HALF)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, H, D], k [T, KVH, D] (last dim contiguous), rotated in place; cos/sin [P, D] float32."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if t:
        _rotary_kernel[(t,)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             cos.stride(0), HQ=hq, HK=hk, HALF=d // 2, HQ_PAD=triton.next_power_of_2(hq),
                             HK_PAD=triton.next_power_of_2(hk), HALF_PAD=triton.next_power_of_2(d // 2),
                             num_warps=4, **PDL_LAUNCH)
    return q, k


@triton.jit
def _rotary_kv_kernel(Q, K, V, KC, VC, Pos, Cos, Sin, Slots, stride_qt, stride_qh, stride_kt, stride_kh,
                      stride_vt, stride_vh, stride_c, stride_slot, HQ: tl.constexpr, HK: tl.constexpr,
                      HALF: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """Token t: q rotated in place; k rotated and v copied into the paged cache at flat slot Slots[t]
    (nothing written for slot < 0: padding)."""
    pdl_enter()
    t = tl.program_id(0).to(tl.int64)
    cos, sin, d, dm = _cos_sin(Pos, Cos, Sin, t, stride_c, HALF, HALF_PAD)
    q = Q + t * stride_qt
    _rotate_heads(q, q, stride_qh, stride_qh, cos, sin, d, dm, HQ, HQ_PAD, HALF)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:
        _rotate_heads(K + t * stride_kt, KC + slot * stride_slot, stride_kh, 2 * HALF, cos, sin, d, dm, HK,
                      HK_PAD, HALF)
        h = tl.arange(0, HK_PAD)[:, None]
        m = (h < HK) & dm[None, :]
        vsrc = V + t * stride_vt + h * stride_vh + d[None, :]
        vdst = VC + slot * stride_slot + h * (2 * HALF) + d[None, :]
        tl.store(vdst, cast_for(tl.load(vsrc, mask=m), VC), mask=m)
        tl.store(vdst + HALF, cast_for(tl.load(vsrc + HALF, mask=m), VC), mask=m)


def rotary_write_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                     slot_mapping: torch.Tensor) -> None:
    """`rotary_` and the paged K/V write in one launch: q [T, H, D] rotated in place, rotated k and v
    [T, KVH, D] (last dim contiguous) written to the cache [blocks, block_size, KVH, D] at the slots."""
    t, hq, d = q.shape
    hk = k.shape[1]
    k_cache, v_cache = kv_cache
    if t:
        _rotary_kv_kernel[(t,)](q, k, v, k_cache, v_cache, positions, cos, sin, slot_mapping, q.stride(0),
                                q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                                k_cache.stride(1), HQ=hq, HK=hk, HALF=d // 2, HQ_PAD=triton.next_power_of_2(hq),
                                HK_PAD=triton.next_power_of_2(hk), HALF_PAD=triton.next_power_of_2(d // 2),
                                num_warps=4, **PDL_LAUNCH)


@triton.jit
def _silu_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr):
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (g / (1.0 + tl.exp(-g)) * u).to(Out.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_fp8_kernel(X, Q, S, stride_x, N, BLOCK: tl.constexpr):
    """silu(gate) * up of a whole row, rounded to X's dtype as silu_and_mul stores it, then to float8."""
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + offs, mask=m, other=0.0).to(tl.float32)
    y = (g / (1.0 + tl.exp(-g)) * u).to(X.dtype.element_ty).to(tl.float32)
    store_fp8_row(Q + row * N, S + row, offs, m, y)


def silu_and_mul(gate_up: torch.Tensor, quant: bool = False):
    """[T, 2I] -> silu(gate) * up, [T, I]; with `quant` as float8 with a scale per row (see add_rms_norm)."""
    t, two_n = gate_up.shape
    n = two_n // 2
    if quant:
        q, scale = fp8_rows(t, n, gate_up.device)
        block = triton.next_power_of_2(n)
        if t:
            _silu_mul_fp8_kernel[(t,)](gate_up, q, scale, gate_up.stride(0), n, BLOCK=block,
                                       num_warps=fp8_row_warps(block), **PDL_LAUNCH)
        return q, scale
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                     BLOCK=block, num_warps=4, **PDL_LAUNCH)
    return out


@triton.jit(do_not_specialize=["seed", "SPLITS"])   # one compiled kernel for every step's seed and batch size
def _sample_kernel(Logits, stride, Temp, OutTok, OutLp, Out, Part, V, chunk, seed, SPLITS, Mask, MaskLimit,
                   mask_stride, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, SEED_PTR: tl.constexpr):
    """One row's chunk of the vocabulary: Gumbel-max sampling at the row's temperature (0: argmax), and
    the chosen token's log-probability under the untempered row (logit - logsumexp), in one pass. With
    one chunk a row (SPLITS == 1) it writes the results; otherwise its partial (max, sum of exp, best
    score, best index) for `_sample_merge_kernel`. HAS_MASK: a row with MaskLimit >= 0 keeps only the
    tokens below it whose bit is set in its row of Mask (int32 words, a grammar's token bitmask). SEED_PTR:
    `seed` points at the seed in device memory (a CUDA graph's input)."""
    pdl_enter()
    if SEED_PTR:
        seed = tl.load(seed).to(tl.int32)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    temp = tl.load(Temp + row)
    limit = tl.load(MaskLimit + row) if HAS_MASK else -1
    inv_t = 1.0 / tl.where(temp > 0, temp, 1.0)   # greedy rows: 1 (their score is x), so -inf * 0 never makes NaN
    noise = tl.where(temp > 0, 1.0, 0.0)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.zeros([], tl.int64)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < hi
        x = tl.load(Logits + row * stride + offs, mask=ok, other=float("-inf")).to(tl.float32)
        if HAS_MASK:
            if limit >= 0:
                words = tl.load(Mask + row * mask_stride + offs // 32, mask=ok & (offs < limit), other=0)
                x = tl.where(((words >> (offs % 32)) & 1) != 0, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
        u = tl.rand(seed, (row * V + offs).to(tl.int32))   # the element's own draw: the same for any split
        gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-20)))
        score = tl.where(temp > 0, x * inv_t + noise * gumbel, x)
        score = tl.where(ok & (x > float("-inf")), score, float("-inf"))
        blk = tl.max(score, 0)
        idx = tl.argmax(score, 0)
        take = blk > best
        best_idx = tl.where(take, (start + idx).to(tl.int64), best_idx)
        best = tl.where(take, blk, best)
    if SPLITS == 1:
        chosen = tl.load(Logits + row * stride + best_idx).to(tl.float32)
        lp = chosen - (m + tl.log(s))
        tl.store(OutTok + row, best_idx)
        tl.store(OutLp + row, lp)
        tl.store(Out + row, best_idx.to(tl.float64))
        tl.store(Out + tl.num_programs(0) + row, lp.to(tl.float64))
    else:
        p = Part + (row * SPLITS + split) * 4
        tl.store(p, m)
        tl.store(p + 1, s)
        tl.store(p + 2, best)
        tl.store(p + 3, best_idx.to(tl.float32))   # exact: vocabularies are far below 2**24


@triton.jit(do_not_specialize=["SPLITS"])
def _sample_merge_kernel(Logits, stride, OutTok, OutLp, Out, Part, SPLITS, BLOCK_S: tl.constexpr):
    """One row: its chunks' partials -> the token with the best score (the first, on ties) and its logprob."""
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_S)
    ok = k < SPLITS
    p = Part + (row * SPLITS + k) * 4
    m = tl.load(p, mask=ok, other=float("-inf"))
    s = tl.load(p + 1, mask=ok, other=0.0)
    best = tl.load(p + 2, mask=ok, other=float("-inf"))
    idx = tl.load(p + 3, mask=ok, other=0.0)
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - m_safe), 0.0), 0)
    first = tl.argmax(best, 0)
    tok = tl.sum(tl.where(k == first, idx, 0.0), 0).to(tl.int64)
    chosen = tl.load(Logits + row * stride + tok).to(tl.float32)
    lp = chosen - (m_all + tl.log(total))
    tl.store(OutTok + row, tok)
    tl.store(OutLp + row, lp)
    tl.store(Out + row, tok.to(tl.float64))
    tl.store(Out + tl.num_programs(0) + row, lp.to(tl.float64))


SAMPLE_BLOCK = 2048
SAMPLE_PROGRAMS = 256   # rows x chunks to aim for: a few small batches' rows would leave most SMs idle
MAX_SPLITS = 128        # chunks a row at most (one merge kernel for every batch size: no compile per shape)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, seed: int | torch.Tensor,
                splits: int | None = None, mask: torch.Tensor | None = None, mask_limit: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32, temperature [B] (0 = greedy). Returns (tokens [B] int64, logprobs [B]):
    the same distribution as softmax(logits / t) sampling; `seed` (31 bits, or an int64 [1] device tensor
    holding it) picks the noise. Small batches split each row's vocabulary over several programs (`splits`,
    default: enough for about SAMPLE_PROGRAMS in all; the tokens do not depend on it) and merge their
    partials in a second kernel.
    `mask` int32 [B, W] (token bitmasks) with `mask_limit` int32 [B]: row i samples only the tokens
    below mask_limit[i] whose bit is set in mask[i], as if the others' logits were -inf; a row whose
    limit is -1 is not masked. `out` float64 [2B] also receives the tokens, then the logprobs: the host's
    copy of a step in one transfer, with no kernels to convert and join them."""
    b, v = logits.shape
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    lps = torch.empty(b, dtype=torch.float32, device=logits.device)
    if not b:
        return tokens, lps
    if out is None:
        out = torch.empty(2 * b, dtype=torch.float64, device=logits.device)
    blocks = triton.cdiv(v, SAMPLE_BLOCK)
    want = min(blocks, MAX_SPLITS, max(1, SAMPLE_PROGRAMS // b) if splits is None else splits)
    chunk = triton.cdiv(blocks, want) * SAMPLE_BLOCK
    n = triton.cdiv(v, chunk)
    part = torch.empty(b * n * 4 if n > 1 else 1, dtype=torch.float32, device=logits.device)
    has_mask = mask is not None
    _sample_kernel[(b, n)](logits, logits.stride(0), temperature, tokens, lps, out, part, v, chunk, seed, n,
                           mask if has_mask else tokens, mask_limit if has_mask else tokens,
                           mask.stride(0) if has_mask else 0, BLOCK=SAMPLE_BLOCK, HAS_MASK=has_mask,
                           SEED_PTR=isinstance(seed, torch.Tensor), num_warps=8, **PDL_LAUNCH)
    if n > 1:
        _sample_merge_kernel[(b,)](logits, logits.stride(0), tokens, lps, out, part, n,
                                   BLOCK_S=MAX_SPLITS, num_warps=1, **PDL_LAUNCH)
    return tokens, lps


@triton.jit
def _gemv_kernel(X, W, Scale, Bias, Y, N, K, stride_w, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = W x (* scale) (+ b) for one row x [K]: BLOCK_N rows of W a program, products summed in float32
    registers across the whole of K and reduced once at the end (then times the row's scale: float8 weights,
    layers/quant.py). The weights are read-only, so the first tile is loaded before waiting on the kernel
    before (PDL): the weight stream does not stop between kernels."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    w_rows = W + rows.to(tl.int64)[:, None] * stride_w
    ks = tl.arange(0, BLOCK_K)
    km = ks < K
    w = tl.load(w_rows + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
    pdl_enter()
    x = tl.load(X + ks, mask=km, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        x = tl.load(X + ks, mask=km, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_SCALE:
        y *= tl.load(Scale + rows, mask=rm, other=0.0)
    if HAS_BIAS:
        y += tl.load(Bias + rows, mask=rm, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rm)


def gemv_blocks(n: int, k: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [n, k] weight. Two rows a program, 1024 or 2048 columns an
    iteration: within 3 % of the best of 40 block shapes for every linear layer of Qwen2.5-0.5B,
    Llama-3.2-1B and Llama-3.1-8B on an H100 (loadtest/bench_gemv.py --sweep, gemv_h100.json). Float8
    weights (itemsize 1) with 4 warps: 5-12 % faster than with 8 on the 8B's layers (48 shapes swept)."""
    if itemsize == 1:
        return (2, 2048, 4)
    return (2, 2048, 8) if k >= 4096 else (2, 1024, 4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         blocks: tuple[int, int, int] | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a single row: x [1, K] (contiguous), weight [N, K] (row-contiguous) -> [1, N]; with
    `scale` (float32, N values) the weight is float8 and row n of it stands for weight[n] * scale[n].
    cuBLAS runs one row through GEMM tiles: on an H100 it reads a batch-1 decode's small weights at
    0.4-2 TB/s (a 2 MB qkv in 4.6 us, this kernel 3.0 us) and the large ones ~10 % below this kernel."""
    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = blocks or gemv_blocks(n, k, weight.element_size())
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, scale if scale is not None else weight,
                                             bias if bias is not None else weight, y, n, k, weight.stride(0),
                                             HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **PDL_LAUNCH)
    return y
