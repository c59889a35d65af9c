"""Random paged-attention inputs for comparing backends (shared by the GPU tests and the microbenchmark).

Sequences get random cached context and query lengths, their blocks are a random permutation of the
cache, and the first two share their first full blocks (a prefix hit), as the block manager makes them.
"""
from __future__ import annotations

import torch

from services.engine.layers.attention import AttentionMetadata


def random_paged_inputs(q_lens: list[int], ctx_lens: list[int], num_heads: int, num_kv_heads: int,
                        head_dim: int, block_size: int = 16, dtype=torch.float32, device="cpu",
                        seed: int = 0, share_prefix: bool = True):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, k = [], 0
    for n in blocks_per_seq:
        tables.append(perm[k:k + n])
        k += n
    if share_prefix and len(tables) >= 2:
        shared = min(ctx_lens[0], ctx_lens[1]) // block_size     # full cached blocks only
        tables[1][:shared] = tables[0][:shared]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    total = sum(q_lens)
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(dtype)
    k_new = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_new = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots, qsl = [], [0]
    for table, c, ql in zip(tables, ctx_lens, q_lens):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c, c + ql))
        qsl.append(qsl[-1] + ql)
    max_blocks = max(blocks_per_seq)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_lens_cpu=list(q_lens), seq_lens_cpu=seq_lens, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(k_new), to(v_new), (to(k_cache), to(v_cache)), meta


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def every_float8_value(head_dim: int, dtype=torch.float32, device="cpu"):
    """Decode inputs whose sequences have a single key each, so that attention returns its V row as it is:
    the V rows hold every finite float8 e4m3 value (and zeros), the cache is float8. Returns the inputs of
    `random_paged_inputs` and the expected output [T, heads, D] (two query heads per KV head)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[~values.isnan()]
    rows = -(-len(values) // head_dim)
    v_rows = torch.cat([values, values.new_zeros(rows * head_dim - len(values))]).view(rows, 1, head_dim)
    q, k, _, cache, meta = random_paged_inputs([1] * rows, [0] * rows, 2, 1, head_dim, dtype=dtype, device=device)
    v = v_rows.to(dtype).to(device)
    cache = tuple(t.to(torch.float8_e4m3fn) for t in cache)
    return (q, k, v, cache, meta), v.expand(rows, 2, head_dim)
