"""FlexAttention over the paged KV cache (the alternative to the Triton kernel in gpu_attention.py).

The cache of a layer, [num_blocks, block_size, KVH, D], is seen as one long key sequence
[1, KVH, num_blocks * block_size, D] shared by every request (batch broadcast, no copy). Queries
are scattered into a padded batch [B, H, max_query_len, D]. The block mask's KV block size is the
cache block size and its KV indices for request b are b's block table, so flex only visits b's own
blocks (sparsity does the paging). Causality needs each slot's logical position: a cached block has
the same logical index in every request that shares it (block hashes are chained from the first
block), so one physical -> logical table per step is well defined.

On the GPU `flex_attention` runs compiled (one compile per new shape, dynamic after that); on the
CPU it runs eager, materialising the scores (tests only).
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from services.engine.layers.attention import AttentionBackend, AttentionMetadata, write_kv

_Q_BLOCK = 128


class FlexAttentionBackend(AttentionBackend):
    def __init__(self):
        self._flex = None
        self._mask_key = None
        self._mask = None

    def _fn(self, device: torch.device):
        if self._flex is None:
            if device.type == "cuda":
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                self._flex = torch.compile(flex_attention, dynamic=True)
            else:
                self._flex = flex_attention
        return self._flex

    def block_mask(self, meta: AttentionMetadata, num_blocks: int, page: int) -> BlockMask:
        """Built once per step (the first layer) and reused by the other layers: same metadata object."""
        if self._mask_key is meta:
            return self._mask
        device = meta.block_tables.device
        tables = meta.block_tables.long()                                     # [B, MB]
        num_seqs, max_blocks = tables.shape
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).long()
        seq_lens = meta.seq_lens.long()
        ctx = seq_lens - q_lens
        used = torch.arange(max_blocks, device=device)[None, :] < ((seq_lens + page - 1) // page)[:, None]
        phys_to_logical = torch.zeros(num_blocks, dtype=torch.long, device=device)
        phys_to_logical[tables[used]] = torch.arange(max_blocks, device=device).expand(num_seqs, -1)[used]
        num_q_blocks = -(-meta.max_query_len // _Q_BLOCK)
        last_q = torch.minimum((torch.arange(num_q_blocks, device=device)[None, :] + 1) * _Q_BLOCK, q_lens[:, None])
        kv_num = ((ctx[:, None] + last_q + page - 1) // page).clamp(min=1)   # causal bound per q block
        kv_num = torch.where(last_q > 0, kv_num, torch.zeros_like(kv_num)).to(torch.int32)
        kv_idx = tables.to(torch.int32)[:, None, None, :].expand(-1, 1, num_q_blocks, -1).contiguous()

        def mask_mod(b, h, q_idx, kv_idx_):
            # The slot is b's iff b's table holds its block at that block's logical index (eager flex
            # ignores the block sparsity, so membership is checked here too).
            physical = kv_idx_ // page
            logical_block = phys_to_logical[physical]
            logical = logical_block * page + kv_idx_ % page
            return ((tables[b, logical_block] == physical) & (logical <= ctx[b] + q_idx)
                    & (q_idx < q_lens[b]))

        self._mask = BlockMask.from_kv_blocks(kv_num[:, None], kv_idx, BLOCK_SIZE=(_Q_BLOCK, page),
                                              mask_mod=mask_mod, compute_q_blocks=False,
                                              seq_lengths=(meta.max_query_len, num_blocks * page))
        self._mask_key = meta
        return self._mask

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        num_blocks, page, num_kv_heads, head_dim = k_cache.shape
        num_seqs = meta.block_tables.shape[0]
        device = q.device
        q_lens = torch.tensor(meta.query_lens_cpu, device=device)
        row = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
        col = torch.arange(q.shape[0], device=device) - meta.query_start_loc[:-1].long()[row]
        padded_q = q.new_zeros(num_seqs, meta.max_query_len, q.shape[1], head_dim)
        padded_q[row, col] = q
        keys = k_cache.view(1, num_blocks * page, num_kv_heads, head_dim).transpose(1, 2)
        values = v_cache.view(1, num_blocks * page, num_kv_heads, head_dim).transpose(1, 2)
        mask = self.block_mask(meta, num_blocks, page)
        # The kernel's KV tile must divide the mask's KV block (= the cache block, often 16).
        opts = {"BLOCK_N": page, "BLOCK_M": 64} if device.type == "cuda" else None
        out = self._fn(device)(padded_q.transpose(1, 2), keys, values, block_mask=mask, scale=scale,
                               enable_gqa=q.shape[1] != num_kv_heads, kernel_options=opts)   # [B, H, Q, D]
        return out.transpose(1, 2)[row, col]
