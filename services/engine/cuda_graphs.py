"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed instead of ~20 launches a layer.

A decode step is one new token per running sequence (no prefill chunk, no draft tokens). Such a
step's forward (embedding -> layers -> final norm) is captured once per bucket of batch sizes
[1, 2, 4, 8, 16, 32, 48, ...] over static input tensors; a step of n sequences replays the smallest
bucket >= n with the rows past n padded (query length 0, slot -1: the attention kernel skips them
and writes nothing). Everything else runs eagerly: prefill and mixed steps, speculative steps,
batches above the largest bucket, sequences longer than the graphs' block-table width, and the
lm_head (only the n real rows, outside the graph, so no [bucket, vocab] buffer per graph).

The step's host inputs are packed into two pinned buffers (int64: ids, positions, slots; int32:
query starts, context lengths, block tables) and sent with two asynchronous copies.
Needs a backend whose kernels read only device tensors (`TritonAttention`).
"""
from __future__ import annotations

import numpy as np
import torch

from services.engine.layers.attention import AttentionMetadata
from services.engine.scheduler import ScheduledRequest

MAX_GRAPH_CONTEXT = 8192   # longest sequence a graph's block table holds; longer decode steps run eagerly


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch] if max_batch > 8 else small + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list, backend, block_size: int, max_batch: int, max_model_len: int,
                 device: torch.device):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_context = min(max_model_len, MAX_GRAPH_CONTEXT)
        self.width = -(-self.max_context // block_size)
        m, w = self.max_batch, self.width
        # Device inputs the graphs read; the host fills the pinned mirrors then copies.
        self.i64 = torch.zeros(3 * m, dtype=torch.long, device=device)
        self.i32 = torch.zeros(2 * m + 1 + m * w, dtype=torch.int32, device=device)
        self.h64 = torch.zeros(3 * m, dtype=torch.long).pin_memory()
        self.h32 = torch.zeros(2 * m + 1 + m * w, dtype=torch.int32).pin_memory()
        self.n64, self.n32 = self.h64.numpy(), self.h32.numpy()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.pool = None
        self.copied = None       # event after the last host->device copy: the pinned buffers are free again
        # Per table row: the block-id list last written there and how much of it (lists are live and
        # only grow while a request runs, so a row usually needs just its new tail, or nothing).
        self.rows: list[tuple[list[int] | None, int]] = [(None, 0)] * self.max_batch

    # ---- layout of the packed buffers -----------------------------------------------------------
    def _v64(self, buf, bs: int):
        m = self.max_batch
        return buf[:bs], buf[m:m + bs], buf[2 * m:2 * m + bs]              # ids, positions, slots

    def _v32(self, buf, bs: int):
        m = self.max_batch
        tables = buf[2 * m + 1:].reshape(m, self.width)
        return buf[:bs + 1], buf[m + 1:m + 1 + bs], tables[:bs]           # query starts, seq lens, tables

    def _meta(self, bs: int) -> AttentionMetadata:
        ids, pos, slots = self._v64(self.i64, bs)
        qsl, seq_lens, tables = self._v32(self.i32, bs)
        # max_seq_len = the graphs' longest context: the split count for long decodes is fixed at capture.
        return AttentionMetadata(slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                 query_lens_cpu=[1] * bs, seq_lens_cpu=[1] * bs, max_query_len=1,
                                 max_seq_len=self.max_context)

    # ---- capture ----------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        self.n64[:] = 0
        self.n64[2 * self.max_batch:] = -1                      # slots: write nothing while capturing
        self.n32[:] = 0
        self.n32[:self.max_batch + 1] = np.arange(self.max_batch + 1)
        self.n32[self.max_batch + 1:2 * self.max_batch + 1] = 1
        self.i64.copy_(self.h64)
        self.i32.copy_(self.h32)
        for bs in reversed(self.buckets):                      # largest first: smaller ones reuse its pool
            ids, pos, _ = self._v64(self.i64, bs)
            meta = self._meta(bs)
            self.model(ids, pos, self.kv_caches, meta, self.backend)   # warm-up: compiles the kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[bs] = self.model(ids, pos, self.kv_caches, meta, self.backend)
            self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    # ---- replay -----------------------------------------------------------------------------
    def can_run(self, scheduled: list[ScheduledRequest], ahead: bool = False) -> bool:
        """`ahead`: the step's input tokens are not appended yet (they come from the device)."""
        if not self.graphs or len(scheduled) > self.max_batch:
            return False
        for s in scheduled:
            r = s.request
            if s.num_new_tokens != 1 or r.spec_token_ids or r.num_computed_tokens + 1 != r.num_tokens + ahead \
                    or r.num_computed_tokens + 1 > self.max_context:
                return False
        return True

    def run(self, scheduled: list[ScheduledRequest], compute_logits,
            input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[int]]]:
        n = len(scheduled)
        bs = next(b for b in self.buckets if b >= n)
        if self.copied is not None:
            self.copied.synchronize()
        ids, pos, slots = self._v64(self.n64, bs)
        qsl, seq_lens, tables = self._v32(self.n32, bs)
        page = self.block_size
        rows = self.rows
        for i, s in enumerate(scheduled):
            r = s.request
            p = r.num_computed_tokens
            if input_ids is None:
                ids[i] = r.token_ids[p]
            pos[i] = p
            blocks = s.block_ids
            slots[i] = blocks[p // page] * page + p % page
            written, k = rows[i]
            if written is not blocks:
                k = 0
            if k != len(blocks):
                tables[i, k:len(blocks)] = blocks[k:]
                rows[i] = (blocks, len(blocks))
        ids[n:], pos[n:], slots[n:] = 0, 0, -1
        qsl[:n + 1] = np.arange(n + 1)
        qsl[n + 1:] = n                                        # padded rows: query length 0
        seq_lens[:n] = pos[:n] + 1
        seq_lens[n:] = 0
        m = self.max_batch
        self.i64.copy_(self.h64, non_blocking=True)
        end32 = 2 * m + 1 + bs * self.width
        self.i32[:end32].copy_(self.h32[:end32], non_blocking=True)
        if input_ids is not None:                              # after the host copy, on the same stream
            self.i64[:n].copy_(input_ids)
        self.copied = torch.cuda.Event()
        self.copied.record()
        self.graphs[bs].replay()
        logits = compute_logits(self.hidden[bs][:n])
        return logits, [[i] for i in range(n)]
