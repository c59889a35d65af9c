"""Attention over the paged KV cache.

The cache of one layer is a pair (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
A step's tokens are a flat batch [T] grouped by sequence: sequence i owns query rows
query_start_loc[i]:query_start_loc[i+1] and, after this step, seq_lens[i] tokens of context whose slots
are listed block by block in block_tables[i]. New keys/values are written to `slot_mapping` (one flat
slot per token) for the whole batch before any sequence reads, so a block filled in this step by one
sequence can already be read by another (prefix hits scheduled in the same step).

`TorchAttention` is the reference backend (CPU and GPU): it gathers each sequence's context into a
padded batch and calls SDPA with a causal mask offset by the cached context; GQA without repeating
heads (enable_gqa). Faster GPU backends implement the same `forward`.

The cache may be float8 e4m3 (EngineConfig.kv_cache_dtype="fp8", a scale of 1): keys and values are
clamped to +-448 and rounded on their way in, and read back in the query's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor       # [T] int64, flat slot = block_id * block_size + offset
    query_start_loc: torch.Tensor    # [B + 1] int32 (device)
    seq_lens: torch.Tensor           # [B] int32 (device): context length after this step
    block_tables: torch.Tensor       # [B, max_blocks] int32 (device), padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int


class AttentionBackend:
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float) -> torch.Tensor:
        raise NotImplementedError


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max   # 448


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor seen as uint8 (torch does not index or copy float8 by index on every device)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp_(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
             slot_mapping: torch.Tensor) -> None:
    for x, cache in zip((k, v), kv_cache):
        flat = as_bytes(cache).view(-1, *cache.shape[2:])
        flat.index_copy_(0, slot_mapping, as_bytes(to_cache_dtype(x, cache.dtype)))


class TorchAttention(AttentionBackend):
    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        num_seqs = len(meta.query_lens_cpu)
        block_size = k_cache.shape[1]
        max_blocks = -(-meta.max_seq_len // block_size)
        tables = meta.block_tables[:, :max_blocks].long()
        # [B, max_blocks * block_size, KVH, D] -> [B, KVH, S, D]
        keys = as_bytes(k_cache)[tables].view(k_cache.dtype).flatten(1, 2).transpose(1, 2)
        values = as_bytes(v_cache)[tables].view(v_cache.dtype).flatten(1, 2).transpose(1, 2)
        num_heads, head_dim = q.shape[1], q.shape[2]
        device = q.device
        q_len = torch.tensor(meta.query_lens_cpu, device=device)
        # Scatter the flat queries into a padded batch [B, H, Q, D].
        row = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_len)
        col = torch.arange(q.shape[0], device=device) - meta.query_start_loc[:-1].long()[row]
        padded_q = q.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
        padded_q[row, col] = q
        # Query j of sequence i sits at position seq_len - q_len + j and sees keys at positions <= it.
        seq_lens = meta.seq_lens.long()
        q_pos = (seq_lens - q_len)[:, None] + torch.arange(meta.max_query_len, device=device)[None, :]
        k_pos = torch.arange(keys.shape[2], device=device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=mask[:, None],
            scale=scale, enable_gqa=num_heads != keys.shape[1])           # [B, H, Q, D]
        return out.transpose(1, 2)[row, col]                               # [T, H, D]


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("auto", "torch"):
        if name == "auto" and device.type == "cuda":
            try:
                from services.engine.layers.gpu_attention import best_gpu_backend  # noqa: PLC0415
                return best_gpu_backend()
            except ImportError:
                pass
        return TorchAttention()
    if name in ("flex", "triton"):
        from services.engine.layers.gpu_attention import make_backend  # noqa: PLC0415
        return make_backend(name)
    raise ValueError(f"unknown attention backend {name!r}")
