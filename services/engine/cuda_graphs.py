"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed instead of ~20 launches a layer.

A decode step is one new token per running sequence (no prefill chunk). Such a step's forward
(embedding -> layers -> final norm) is captured once per bucket of batch sizes [1, 2, 4, 8, 16, 32,
48, ...] over static input tensors; a step of n sequences replays the smallest bucket >= n with the
rows past n padded (query length 0, slot -1: the attention kernel skips them and writes nothing).

A second set (`tokens_per_seq` = q > 1) serves speculative steps: each sequence feeds up to q
tokens that end at its newest one (the target verifying its last token and k <= q - 1 guesses, or
a draft model catching up on the tokens the target just accepted). Rows are packed back to back;
the tokens past the step's total are padding. Only the rows that sample get logits: a sequence's
last committed token and its guesses.

One-token steps capture the lm_head too, into one float32 [largest bucket, vocab] buffer that every
bucket's graph writes its rows of (a step's logits are read by its sampling before the next step's
replay, in stream order). The speculative graphs leave it out: only some of their rows sample, and
those go through the lm_head eagerly. `SampleGraphs` captures the fused sampler over that buffer, per
bucket, with and without a grammar bitmask, so that an overlapped step is two replays.

Everything else runs eagerly: prefill and mixed steps, batches above the largest bucket, and sequences
longer than the graphs' block-table width.

The step's host inputs are packed into one pinned buffer (int64: ids, positions, slots, logit rows;
then int32: query starts, context lengths, block tables) and sent with one asynchronous copy.
Needs a backend whose kernels read only device tensors (`TritonAttention`).
"""
from __future__ import annotations

import numpy as np
import torch

from services.engine.layers import fused
from services.engine.layers.attention import AttentionMetadata
from services.engine.scheduler import ScheduledRequest

MAX_GRAPH_CONTEXT = 8192   # longest sequence a graph's block table holds; longer decode steps run eagerly


def batch_buckets(max_batch: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch] if max_batch > 8 else small + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list, backend, block_size: int, max_batch: int, max_model_len: int,
                 device: torch.device, tokens_per_seq: int = 1, pool=None):
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size = block_size
        self.q = tokens_per_seq
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_context = min(max_model_len, MAX_GRAPH_CONTEXT)
        self.width = -(-self.max_context // block_size)
        t, m, w = self.max_batch * self.q, self.max_batch, self.width
        # Device inputs the graphs read, int64 then int32 in one buffer; the host fills its pinned mirror and
        # sends it with one copy.
        self.split = 8 * 4 * t
        size = self.split + 4 * (2 * m + 1 + m * w)
        self.dev = torch.zeros(size, dtype=torch.uint8, device=device)
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.i64, self.i32 = self._typed(self.dev)
        self.h64, self.h32 = self._typed(self.host)
        self.n64, self.n32 = self.h64.numpy(), self.h32.numpy()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.logits = None       # one-token steps: [max_batch, vocab] float32, written by every bucket's graph
        self.pool = pool         # shared by every graph of a runner: only one step runs at a time
        # recorded after each host->device copy: the pinned buffer is free again once it has passed
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        # Per table row: the block-id list last written there and how much of it (lists are live and
        # only grow while a request runs, so a row usually needs just its new tail, or nothing).
        self.rows: list[tuple[list[int] | None, int]] = [(None, 0)] * self.max_batch

    # ---- layout of the packed buffers -----------------------------------------------------------
    def _typed(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return buf[:self.split].view(torch.int64), buf[self.split:].view(torch.int32)

    def _v64(self, buf, n: int):
        t = self.max_batch * self.q
        return buf[:n], buf[t:t + n], buf[2 * t:2 * t + n]                # ids, positions, slots (per token)

    def _v32(self, buf, bs: int):
        m = self.max_batch
        tables = buf[2 * m + 1:].reshape(m, self.width)
        return buf[:bs + 1], buf[m + 1:m + 1 + bs], tables[:bs]           # query starts, seq lens, tables

    def _meta(self, bs: int) -> AttentionMetadata:
        _, _, slots = self._v64(self.i64, bs * self.q)
        qsl, seq_lens, tables = self._v32(self.i32, bs)
        # max_seq_len = the graphs' longest context: the split count for long decodes is fixed at capture.
        return AttentionMetadata(slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                 query_lens_cpu=[self.q] * bs, seq_lens_cpu=[self.q] * bs, max_query_len=self.q,
                                 max_seq_len=self.max_context)

    # ---- capture ----------------------------------------------------------------------------
    def _rest(self) -> None:
        """Inputs safe to capture over: every row a full query that writes nothing (slot -1)."""
        m, q = self.max_batch, self.q
        self.n64[:] = 0
        self.n64[2 * m * q:3 * m * q] = -1
        self.n32[:] = 0
        self.n32[:m + 1] = np.arange(m + 1) * q
        self.n32[m + 1:2 * m + 1] = q
        self.dev.copy_(self.host)

    @torch.inference_mode()
    def capture(self) -> None:
        q = self.q
        self._rest()
        self._logits_buffer()
        for bs in reversed(self.buckets):                      # largest first: smaller ones reuse its pool
            ids, pos, _ = self._v64(self.i64, bs * q)
            meta = self._meta(bs)
            self._forward(ids, pos, meta, bs)                  # warm-up: compiles the kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[bs] = self._forward(ids, pos, meta, bs)
            self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _logits_buffer(self) -> None:
        if self.q == 1:
            self.logits = torch.empty(self.max_batch, self.model.lm_head.out_features, dtype=torch.float32,
                                      device=self.dev.device)

    def _forward(self, ids, pos, meta: AttentionMetadata, bs: int) -> torch.Tensor:
        hidden = self.model(ids, pos, self.kv_caches, meta, self.backend)
        if self.logits is not None:
            self.model.compute_logits(hidden, out=self.logits[:bs])
        return hidden

    # ---- replay -----------------------------------------------------------------------------
    def can_run(self, scheduled: list[ScheduledRequest], ahead: bool = False) -> bool:
        """`ahead`: the step's input tokens are not appended yet (they come from the device)."""
        if not self.graphs or len(scheduled) > self.max_batch:
            return False
        if self.q == 1:
            for s in scheduled:
                r = s.request
                if s.num_new_tokens != 1 or r.spec_token_ids or r.num_computed_tokens + 1 != r.num_tokens + ahead \
                        or r.num_computed_tokens + 1 > self.max_context:
                    return False
            return True
        for s in scheduled:   # up to q tokens, ending at the newest one (guesses included)
            r = s.request
            end = r.num_computed_tokens + s.num_new_tokens
            if s.num_new_tokens > self.q or end != r.num_tokens + len(r.spec_token_ids) or end > self.max_context:
                return False
        return True

    def _fill_tables(self, tables, scheduled: list[ScheduledRequest]) -> None:
        rows = self.rows
        for i, s in enumerate(scheduled):
            blocks = s.block_ids
            written, k = rows[i]
            if written is not blocks:
                k = 0
            if k != len(blocks):
                tables[i, k:len(blocks)] = blocks[k:]
                rows[i] = (blocks, len(blocks))

    def _copy_inputs(self, bs: int, input_ids: torch.Tensor | None) -> None:
        """The pinned buffers to the device (and `copied`, the event after which they are free again)."""
        end = self.split + 4 * (2 * self.max_batch + 1 + bs * self.width)   # up to the last table row used
        self.dev[:end].copy_(self.host[:end], non_blocking=True)
        if input_ids is not None:                              # after the host copy, on the same stream
            self.i64[:input_ids.shape[0]].copy_(input_ids)
        if self.copied is not None:
            self.copied.record()

    def _launch(self, bs: int, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._copy_inputs(bs, input_ids)
        self.graphs[bs].replay()
        return self.hidden[bs]

    def run(self, scheduled: list[ScheduledRequest], compute_logits,
            input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[int]]]:
        if self.q > 1:
            return self._run_multi(scheduled, compute_logits)
        n, bs = self._pack(scheduled, input_ids)
        self._launch(bs, input_ids)
        return self.logits[:n], [[i] for i in range(n)]

    def _pack(self, scheduled: list[ScheduledRequest], input_ids: torch.Tensor | None) -> tuple[int, int]:
        """Fills the pinned buffers for a one-token-per-sequence step: (sequences, bucket)."""
        n = len(scheduled)
        bs = next(b for b in self.buckets if b >= n)
        if self.copied is not None:
            self.copied.synchronize()
        ids, pos, slots = self._v64(self.n64, bs)
        qsl, seq_lens, tables = self._v32(self.n32, bs)
        page = self.block_size
        for i, s in enumerate(scheduled):
            r = s.request
            p = r.num_computed_tokens
            if input_ids is None:
                ids[i] = r.token_ids[p]
            pos[i] = p
            blocks = s.block_ids
            slots[i] = blocks[p // page] * page + p % page
        self._fill_tables(tables, scheduled)
        ids[n:], pos[n:], slots[n:] = 0, 0, -1
        qsl[:n + 1] = np.arange(n + 1)
        qsl[n + 1:] = n                                        # padded rows: query length 0
        seq_lens[:n] = pos[:n] + 1
        seq_lens[n:] = 0
        return n, bs

    def _run_multi(self, scheduled: list[ScheduledRequest], compute_logits) -> tuple[torch.Tensor, list[list[int]]]:
        n = len(scheduled)
        bs = next(b for b in self.buckets if b >= n)
        if self.copied is not None:
            self.copied.synchronize()
        cap = bs * self.q
        ids, pos, slots = self._v64(self.n64, cap)
        t = self.max_batch * self.q
        sample = self.n64[3 * t:]                               # flat rows that get logits
        qsl, seq_lens, tables = self._v32(self.n32, bs)
        page = self.block_size
        k = rows_out = 0
        out_rows = []
        for i, s in enumerate(scheduled):
            r = s.request
            start, q = r.num_computed_tokens, s.num_new_tokens
            tokens = r.token_ids + r.spec_token_ids if r.spec_token_ids else r.token_ids
            blocks = s.block_ids
            for j in range(q):
                p = start + j
                ids[k + j], pos[k + j], slots[k + j] = tokens[p], p, blocks[p // page] * page + p % page
            qsl[i] = k
            seq_lens[i] = start + q
            first = k + r.num_tokens - 1 - start               # the last committed token, then the guesses
            num = k + q - first
            sample[rows_out:rows_out + num] = np.arange(first, k + q)
            out_rows.append(list(range(rows_out, rows_out + num)))
            rows_out += num
            k += q
        self._fill_tables(tables, scheduled)
        ids[k:], pos[k:], slots[k:] = 0, 0, -1
        qsl[n:] = k                                            # padded rows: query length 0
        seq_lens[n:] = 0
        hidden = self._launch(bs)
        idx = self.i64[3 * t:3 * t + rows_out]
        return compute_logits(hidden.index_select(0, idx)), out_rows


class ChainGraphs(DecodeGraphs):
    """A greedy draft model's passes after the first, chained in one graph: each pass feeds every
    sequence the previous pass's argmax, on the device (positions, context lengths and KV slots move
    on with it), so a call of k guesses costs one replay instead of k - 1 launches of a decode graph
    with the host's work between them. Captured per batch bucket and number of passes (1..max_passes);
    a sequence that wants fewer passes than its batch keeps running along with its KV writes turned off
    (slot -1) and its extra tokens ignored."""

    def __init__(self, model, kv_caches: list, backend, block_size: int, max_batch: int, max_model_len: int,
                 device: torch.device, max_passes: int, pool=None):
        super().__init__(model, kv_caches, backend, block_size, max_batch, max_model_len, device, pool=pool)
        self.max_passes = max_passes
        m = self.max_batch
        self.passes = torch.zeros(m, dtype=torch.long, device=device)        # per row: passes that write KV
        self.h_passes = torch.zeros(m, dtype=torch.long, pin_memory=device.type == "cuda")
        self.row_ids = torch.arange(m, device=device)
        self.tokens: dict[tuple[int, int], torch.Tensor] = {}             # (bucket, passes) -> [passes, bucket]
        self.chains: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def _chain(self, bs: int, n: int) -> torch.Tensor:
        """n greedy decode passes over the static buffers: [n, bs] tokens."""
        ids, pos, slots = self._v64(self.i64, bs)
        _, seq_lens, tables = self._v32(self.i32, bs)
        meta, page, rows = self._meta(bs), self.block_size, self.row_ids[:bs]
        out = []
        for j in range(n):
            hidden = self.model(ids, pos, self.kv_caches, meta, self.backend)
            out.append(self.model.compute_logits(hidden).argmax(-1))
            if j + 1 < n:
                ids.copy_(out[-1])
                pos.add_(1)
                seq_lens.add_(1)
                slot = tables[rows, pos // page].long() * page + pos % page
                slots.copy_(torch.where(self.passes[:bs] > j + 1, slot, -1))
        return torch.stack(out)

    @torch.inference_mode()
    def capture(self) -> None:
        for bs in reversed(self.buckets):
            for n in range(1, self.max_passes + 1):
                self._rest()               # passes move positions on: each capture starts from rest
                self._chain(bs, n)         # warm-up: compiles the kernels
                torch.cuda.synchronize()
                self._rest()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.tokens[bs, n] = self._chain(bs, n)
                self.pool = graph.pool()
                self.chains[bs, n] = graph
        self._rest()
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, passes: int, longest: int) -> bool:
        """Whether `num_seqs` sequences, the longest `longest` tokens, can run `passes` chained passes."""
        return bool(self.chains) and 0 < passes <= self.max_passes and num_seqs <= self.max_batch \
            and longest + passes <= self.max_context

    def run_chain(self, scheduled: list[ScheduledRequest], input_ids: torch.Tensor, passes: list[int]) -> torch.Tensor:
        """`input_ids` (device, one per sequence) at the sequences' next positions, each with KV slots for
        its 1 <= passes[i] <= max_passes passes: the tokens of every pass, [max(passes), len(scheduled)]
        on the device."""
        n, bs = self._pack(scheduled, input_ids)
        self.h_passes[:n] = torch.tensor(passes)
        self.h_passes[n:bs] = 0
        self.passes[:bs].copy_(self.h_passes[:bs], non_blocking=True)   # before `copied` is recorded
        return self._launch_chain(bs, max(passes), input_ids)[:, :n]

    def _launch_chain(self, bs: int, passes: int, input_ids: torch.Tensor) -> torch.Tensor:
        self._copy_inputs(bs, input_ids)
        self.chains[bs, passes].replay()
        return self.tokens[bs, passes]


class SampleGraphs:
    """The fused sampler (layers/fused.sample_rows) of one-token steps, captured per batch bucket with and
    without a grammar bitmask, over the decode graphs' logits buffer. A step's sampling is then one copy of
    its seed and temperatures and one replay, where launching the kernels and allocating their outputs
    cost the host ~150-200 us a step (1B, batch 32, a step the host is the slower side of). A bucket's rows
    past the step's count sample whatever their logits hold and are not read. The results are laid out per
    bucket: tokens in [0, bs), logprobs in [bs, 2 bs)."""

    def __init__(self, graphs: DecodeGraphs):
        self.graphs = graphs
        m, vocab = graphs.logits.shape
        device = graphs.logits.device
        self.max_batch, self.words = m, -(-vocab // 32)
        # The seed (int64), then each row's temperature (float32): written on the host, one copy a step. Two
        # pinned buffers in turn: the next step's is written while this one's copy may still be queued.
        self.inputs = torch.zeros(8 + 4 * m, dtype=torch.uint8, device=device)
        self.staged = [torch.zeros(8 + 4 * m, dtype=torch.uint8, pin_memory=device.type == "cuda") for _ in (0, 1)]
        self.mask = torch.zeros(m, self.words, dtype=torch.int32, device=device)
        self.limit = torch.full((m,), -1, dtype=torch.int32, device=device)
        self.both = torch.zeros(2 * m, dtype=torch.float64, device=device)
        self.tokens: dict[tuple[int, bool], torch.Tensor] = {}
        self.replays: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None   # their own: a step's tokens (a graph's output) are read by the next forward graph
        self._limit_key = None

    def _run(self, bs: int, masked: bool) -> torch.Tensor:
        g, seed, temp = self.graphs, self.inputs[:8].view(torch.int64), self.inputs[8:].view(torch.float32)
        mask = dict(mask=self.mask[:bs], mask_limit=self.limit[:bs]) if masked else {}
        return fused.sample_rows(g.logits[:bs], temp[:bs], seed, out=self.both[:2 * bs], **mask)[0]

    @torch.inference_mode()
    def capture(self) -> None:
        g = self.graphs
        g.logits.zero_()
        for bs in reversed(g.buckets):
            for masked in (False, True):
                self._run(bs, masked)                          # warm-up: compiles the kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.tokens[bs, masked] = self._run(bs, masked)
                self.pool = graph.pool()
                self.replays[bs, masked] = graph
        torch.cuda.synchronize()

    def takes(self, logits: torch.Tensor) -> bool:
        """Whether `logits` are the first rows of the decode graphs' logits (the step they just ran)."""
        return logits.data_ptr() == self.graphs.logits.data_ptr() and logits.shape[0] <= self.max_batch

    def sample(self, temps: tuple, seed: int, masks=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Launches the sampling of the step whose logits the decode graphs hold, one row per temperature
        (0: greedy); `masks` (matcher.FilledMasks): the grammar's bitmasks. Returns the tokens [n] on the
        device, the bucket's results [2 bs] (tokens, then logprobs) and where the logprobs start (bs)."""
        n = len(temps)
        bs = next(b for b in self.graphs.buckets if b >= n)
        self.staged.reverse()
        staged = self.staged[0].numpy()
        staged[:8].view(np.int64)[0] = seed
        staged[8:8 + 4 * n].view(np.float32)[:] = temps
        self.inputs.copy_(self.staged[0], non_blocking=True)
        masked = masks is not None
        if masked:
            bitmask = masks.bitmask
            w = min(bitmask.shape[1], self.words)
            self.mask[:bitmask.shape[0], :w].copy_(bitmask[:, :w], non_blocking=True)
            key = masks.limit_key(n)
            if key != self._limit_key:   # the same rows step after step: sent again only when they change
                limits = torch.tensor(masks.limits(n), dtype=torch.int32, pin_memory=self.inputs.is_cuda)
                self.limit[:n].copy_(limits, non_blocking=True)
                self._limit_key = key
        self._launch(bs, masked)
        return self.tokens[bs, masked][:n], self.both[:2 * bs], bs

    def _launch(self, bs: int, masked: bool) -> None:
        self.replays[bs, masked].replay()
