"""GPU attention backends over the paged KV cache: a Triton kernel and a FlexAttention variant.

Both implement `AttentionBackend.forward` (see attention.py for the cache layout and metadata) and
compute exactly what `TorchAttention` computes, without gathering the context into a padded copy:

- `TritonAttention`: one kernel writes the step's K and V into their slots (one launch for both),
  then one kernel does decode and prefill-over-a-cached-prefix alike. A program owns one sequence,
  one tile of its queries and one KV head; its tile rows are (query token, query head of that KV
  head's GQA group), so each K/V tile is loaded once for the whole group (no repeated heads). It
  walks the sequence's block table BLOCK_N tokens at a time with an online softmax (flash-attention
  style) and stops at the tile's last causal position. It reads only device tensors, so it is safe
  inside a CUDA graph; rows with query length 0 (graph padding) exit at once, slots < 0 are skipped.
  Long decode contexts are split over NUM_SPLITS programs per sequence (flash-decoding) and merged
  by a second small kernel, so batch-1 decode still fills the GPU. A float8 cache is read as such (half
  the bytes of bf16) and converted to fp16 in registers by the hardware's conversion; in decode V is loaded as
  int16 pairs, so that its copies are 16 bytes wide, and each pair converted by one instruction.
- `FlexAttentionBackend`: `flex_attention` over the whole cache seen as one long sequence, with a
  block mask whose KV block indices are the request's block table (KV block = cache block), and a
  mask_mod that maps a physical slot back to its logical position (a cached block sits at the same
  logical index in every request that shares it, since block hashes are chained from the start).

`best_gpu_backend()` returns the faster on the H100 (Triton; measured in loadtest/results/).
Run on the CPU for tests with TRITON_INTERPRET=1 (Triton) or eager flex (slow reference math).
"""
from __future__ import annotations

import os

import torch

from services.engine.layers import fused
from services.engine.layers.fused import PDL_LAUNCH, cast_for, pdl_enter
from services.engine.layers.attention import AttentionBackend, AttentionMetadata

import triton
import triton.language as tl

_SPLIT_MIN_TOKENS = 512   # below this context a decode sequence is one program (splitting costs a merge)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter runs no inline PTX


@triton.jit
def _write_kv_kernel(K, V, KC, VC, slots, stride_k, stride_v, stride_slot,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    """One program per token: its K and V rows [KVH * D] go to flat slot `slots[t]` (skipped if < 0)."""
    pdl_enter()
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, ROW_PAD)
    m = offs < ROW
    tl.store(KC + slot * stride_slot + offs, cast_for(tl.load(K + t * stride_k + offs, mask=m), KC), mask=m)
    tl.store(VC + slot * stride_slot + offs, cast_for(tl.load(V + t * stride_v + offs, mask=m), VC), mask=m)


@triton.jit
def _fp8_pairs(Ptr, offs, mask, BY_BITS: tl.constexpr):
    """Loads float8 e4m3 values as int16 pairs (16-byte copies) and returns the even and the odd ones as fp16:
    one `cvt.rn.f16x2.e4m3x2` a pair. In the interpreter (`BY_BITS`) by moving bits instead: sign to bit 15,
    exponent and mantissa up by 7, which gives the value times 2^-8 (the exponent biases differ by 8;
    subnormals included), then times 2^8."""
    x = tl.load(Ptr + offs, mask=mask, other=0)
    if not BY_BITS:
        return tl.inline_asm_elementwise("{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
                                         "=h,=h,h", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    x = x.to(tl.uint16, bitcast=True)
    even = (((x & 0x80) << 8) | ((x & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
    odd = ((x & 0x8000) | ((x & 0x7F00) >> 1)).to(tl.uint16).to(tl.float16, bitcast=True)
    return (even.to(tl.float32) * 256.0).to(tl.float16), (odd.to(tl.float32) * 256.0).to(tl.float16)


@triton.jit
def _paged_attn_kernel(Q, KC, VC, Out, Part_acc, Part_ml, block_tables, seq_lens, query_start_loc, scale_log2,
                       stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_ot, stride_oh, stride_bt,
                       G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       PREC: tl.constexpr, V_PAIRS: tl.constexpr, INTERPRETED: tl.constexpr):
    pdl_enter()
    seq = tl.program_id(0)
    tile = tl.program_id(1)          # query tile (prefill) or KV split (decode, NUM_SPLITS > 1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    q_tile = tile if NUM_SPLITS == 1 else 0
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    ctx = seq_len - q_len                                    # tokens before this step's queries
    offs_m = tl.arange(0, BLOCK_Q * G_PAD)
    q_idx = q_tile * BLOCK_Q + offs_m // G_PAD
    head = kvh * G + offs_m % G_PAD
    row_ok = (q_idx < q_len) & (offs_m % G_PAD < G)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q = tl.load(Q + (q_start + q_idx).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale_log2
    if KC.dtype.element_ty.is_fp8():
        # A float8 cache converts to fp16 in one instruction a pair: q and p go to fp16 too, with the softmax
        # scale folded into q first (which keeps it far inside fp16's range).
        q, qk_scale = (q.to(tl.float32) * scale_log2).to(tl.float16), 1.0
    q_pos = ctx + q_idx
    kv_end = tl.minimum(seq_len, ctx + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))   # causal bound of the tile
    kv_lo = 0
    kv_hi = kv_end
    if NUM_SPLITS > 1:
        per = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = tile * per
        kv_hi = tl.minimum(kv_end, kv_lo + per)
    m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)
    if V_PAIRS:   # a float8 V read as int16 pairs: even and odd columns accumulate apart
        acc_even = tl.zeros([BLOCK_Q * G_PAD, D_PAD // 2], tl.float32)
        acc_odd = tl.zeros([BLOCK_Q * G_PAD, D_PAD // 2], tl.float32)
        V_pairs = VC.to(tl.pointer_type(tl.int16), bitcast=True)
        offs_pair = tl.arange(0, D_PAD // 2)
    kv_base = kvh * stride_kh
    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        page = tl.load(block_tables + seq * stride_bt + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        kv_off = page * stride_kb + (offs_n % PAGE) * stride_kt + kv_base
        k = tl.load(KC + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale                    # [M, N], log2 units
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row may see no key in this block
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_PAIRS:
            # Decode: loaded as float8, V came in 8-byte copies (its tile is transposed for the dot), and float8
            # decode read at 2.2 TB/s. As int16 pairs it comes in 16-byte copies: 13-21 % faster on decode
            # shapes, slower on prefill ones, which keep the float8 loads. K the same way gained nothing
            # (loadtest/results/NOTES.md).
            v_even, v_odd = _fp8_pairs(V_pairs, tl.multiple_of(kv_off // 2, 8)[:, None] + offs_pair[None, :],
                                       n_ok[:, None], INTERPRETED)
            p16 = p.to(tl.float16)
            acc_even = acc_even * alpha[:, None] + tl.dot(p16, v_even)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p16, v_odd)
        else:
            v = tl.load(VC + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PREC)
        m_i = m_new
    if V_PAIRS:
        acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_Q * G_PAD, D_PAD])   # columns interleaved back
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        rows = (q_start + q_idx).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(Out + rows + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Partial results of this split for the decode row (q_idx == 0), merged by _merge_splits_kernel.
        H = tl.num_programs(2) * G
        base = (seq * NUM_SPLITS + tile) * H + head
        tl.store(Part_acc + base[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(Part_ml + base * 2, m_i, mask=row_ok)
        tl.store(Part_ml + base * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(Out, Part_acc, Part_ml, query_start_loc, stride_ot, stride_oh, H,
                         NUM_SPLITS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    pdl_enter()
    seq = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(query_start_loc + seq)
    if tl.load(query_start_loc + seq + 1) == q_start:
        return
    splits = tl.arange(0, NUM_SPLITS)
    base = (seq * NUM_SPLITS + splits) * H + h
    m = tl.load(Part_ml + base * 2)
    l = tl.load(Part_ml + base * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_max))               # empty splits weigh 0
    offs_d = tl.arange(0, D_PAD)
    acc = tl.load(Part_acc + base[:, None] * D_PAD + offs_d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(Out + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < D)


def write_kv_fused(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D] (row-contiguous); one launch writes both into the cache."""
    k_cache, v_cache = kv_cache
    row = k_cache.shape[2] * k_cache.shape[3]
    if k.shape[0] == 0:
        return
    _write_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                    k_cache.stride(1), ROW=row, ROW_PAD=triton.next_power_of_2(row), **PDL_LAUNCH)


class TritonAttention(AttentionBackend):
    """Paged flash attention in Triton. `num_splits` is the split count for long decode contexts."""

    graph_safe = True   # reads only device tensors (and max_query_len / max_seq_len, fixed per graph)

    def __init__(self, max_splits: int = 16):
        self.max_splits = max_splits
        # (BLOCK_N, num_warps, num_stages) of decode and of prefill steps (loadtest/bench_attention.py --sweep)
        self.decode_tile, self.prefill_tile = (128, 4, 3), (64, 4, 2)

    def num_splits(self, meta: AttentionMetadata, num_seqs: int, num_kv_heads: int) -> int:
        """Split decode contexts so that about 2 waves of programs cover the GPU's SMs (132 on an H100)."""
        if meta.max_query_len != 1 or meta.max_seq_len < _SPLIT_MIN_TOKENS:
            return 1
        want = max(1, 264 // max(num_seqs * num_kv_heads, 1))
        return min(triton.next_power_of_2(want), self.max_splits, triton.next_power_of_2(meta.max_seq_len // 256))

    fuses_rotary = True   # forward(rotary=(positions, cos, sin)) applies RoPE in the K/V write's launch

    def forward(self, q, k, v, kv_cache, meta, scale, rotary=None):
        k_cache, v_cache = kv_cache
        if rotary is not None:
            fused.rotary_write_kv_(q, k, v, *rotary, kv_cache, meta.slot_mapping)
        else:
            if k.stride(-1) != 1 or k.stride(1) != k.shape[2]:
                k = k.contiguous()
            if v.stride(-1) != 1 or v.stride(1) != v.shape[2]:
                v = v.contiguous()
            write_kv_fused(k, v, kv_cache, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        group_pad = triton.next_power_of_2(group)
        num_seqs = meta.block_tables.shape[0]
        out = torch.empty_like(q)
        d_pad = triton.next_power_of_2(head_dim)
        splits = self.num_splits(meta, num_seqs, num_kv_heads)
        if meta.max_query_len == 1:
            block_q, (block_n, warps, stages) = max(1, 16 // group_pad), self.decode_tile   # rows: group, to 16
        else:
            block_q, (block_n, warps, stages) = max(1, 64 // group_pad), self.prefill_tile
        grid = (num_seqs, splits if splits > 1 else triton.cdiv(meta.max_query_len, block_q), num_kv_heads)
        # A decode program over a float8 cache takes 222 registers a thread, so two fit an SM (ncu: 12.5 %
        # occupancy, the DRAM half busy). Capped at 168, three fit: 8-10 % faster on the 8B's heads (same over
        # bf16 is slower: it is bound by bytes already).
        fp8_decode = meta.max_query_len == 1 and k_cache.dtype == torch.float8_e4m3fn
        limits = {"maxnreg": 168} if fp8_decode else {}
        part_acc = part_ml = out            # unused unless split
        if splits > 1:
            part_acc = torch.empty(num_seqs * splits * num_heads, d_pad, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(num_seqs * splits * num_heads * 2, dtype=torch.float32, device=q.device)
        _paged_attn_kernel[grid](
            q, k_cache, v_cache, out, part_acc, part_ml, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            scale * 1.4426950408889634,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            out.stride(0), out.stride(1), meta.block_tables.stride(0),
            G=group, G_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, D=head_dim, D_PAD=d_pad,
            PAGE=k_cache.shape[1], NUM_SPLITS=splits, num_warps=warps, num_stages=stages,
            PREC="ieee" if q.dtype == torch.float32 else "tf32",    # float32: exact, no tf32
            V_PAIRS=fp8_decode and head_dim == d_pad, INTERPRETED=_INTERPRETED, **PDL_LAUNCH, **limits)
        if splits > 1:
            _merge_splits_kernel[(num_seqs, num_heads)](out, part_acc, part_ml, meta.query_start_loc,
                                                        out.stride(0), out.stride(1), num_heads,
                                                        NUM_SPLITS=splits, D=head_dim, D_PAD=d_pad, **PDL_LAUNCH)
        return out


def make_backend(name: str) -> AttentionBackend:
    if name == "triton":
        return TritonAttention()
    if name == "flex":
        from services.engine.layers.flex_attention import FlexAttentionBackend  # noqa: PLC0415
        return FlexAttentionBackend()
    raise ValueError(f"unknown GPU attention backend {name!r}; use 'triton' or 'flex'")


def best_gpu_backend() -> AttentionBackend:
    """The faster backend on the H100 in loadtest/results/attention_backends.json: Triton."""
    return TritonAttention()
