"""A draft model on our own engine: its ModelRunner, a paged KV cache per sequence, k guesses per call.

Runs the draft side of the protocol (services/draft/protocol.py) for many sequences at once: the
first forward pass of a call computes every sequence's uncomputed tokens (a whole prompt for a new
sequence, usually one or two tokens otherwise), the next k-1 passes one guess each. Sequences are
kept in LRU order; when KV blocks run out the least recently used sequences not in the current call
are evicted (their next call is answered `lost`). Prefix caching is off here: guesses are written
into blocks and later overwritten, which a shared cached block must never be.
Not thread-safe: one caller at a time (the DraftServer runs one batch at a time).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from services.draft.protocol import DraftCall, DraftReply
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.loader import load_config
from services.engine.model_runner import ModelRunner
from services.engine.outputs import RequestMetrics
from services.engine.request import Request
from services.engine.sampler import on_device
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledRequest

_PARAMS = SamplingParams(max_tokens=None)


@dataclass(slots=True, eq=False)
class _Seq:
    req: Request                 # token_ids = committed tokens + this draft's last guesses
    num_committed: int


class DraftModel:
    def __init__(self, model_dir: str, device: str = "auto", dtype: str = "auto", num_kv_blocks: int | None = None,
                 kv_cache_memory_gb: float = 0.25, block_size: int = 16, top_probs: int = 8, seed: int = 0,
                 load_format: str = "auto", catch_up_graph_len: int = 5):
        if top_probs < 1:
            raise ValueError(f"top_probs must be >= 1, got {top_probs}")
        self.config = EngineConfig(model=model_dir, device=device, dtype=dtype, num_kv_blocks=num_kv_blocks,
                                   kv_cache_memory_gb=kv_cache_memory_gb, block_size=block_size, seed=seed,
                                   enable_prefix_caching=False, load_format=load_format)
        self.hf_config = load_config(model_dir)
        # The first pass of a call feeds the tokens the target accepted since the last one (at most
        # k + 1): on a GPU, steps of up to `catch_up_graph_len` tokens per sequence replay CUDA graphs.
        self.runner = ModelRunner(self.config, self.hf_config, spec_query_len=catch_up_graph_len)
        # Greedy passes after the first: chained in one CUDA graph (up to catch_up_graph_len - 2 of them).
        self.chain = self._capture_chain(catch_up_graph_len - 2)
        self.kv = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching=False)
        self.max_model_len = self.hf_config.max_position_embeddings
        self.vocab_size = self.hf_config.vocab_size
        self.top_probs = top_probs
        self.generator = torch.Generator().manual_seed(seed)
        self.seqs: OrderedDict[str, _Seq] = OrderedDict()
        self.num_evictions = 0

    # ---- protocol ------------------------------------------------------------------------------
    def propose(self, calls: list[DraftCall]) -> list[DraftReply]:
        replies: dict[int, DraftReply] = {}
        active: list[tuple[int, DraftCall, _Seq, int]] = []
        seen: set[str] = set()
        for i, c in enumerate(calls):
            if c.seq_id in seen:   # one sequence twice in a batch: the caller is confused; make it resend
                replies[i] = DraftReply(c.seq_id, lost=True)
                continue
            seen.add(c.seq_id)
            seq = self._sync(c)
            if seq is None:
                replies[i] = DraftReply(c.seq_id, lost=True)
                continue
            k = min(c.num_speculative_tokens, self.max_model_len - seq.req.num_tokens)
            if k <= 0:
                replies[i] = DraftReply(c.seq_id)
                continue
            active.append((i, c, seq, k))
        guesses: dict[int, list[int]] = {i: [] for i, *_ in active}
        probs: dict[int, list] = {i: [] for i, *_ in active}
        protected = {c.seq_id for _, c, _, _ in active}
        done: set[int] = set()     # out of KV memory: it answers with the guesses it has
        if self._can_draft_on_device(active):
            self._greedy_on_device(active, guesses, protected, done)
        else:
            self._passes_on_host(active, guesses, probs, protected, done)
        for i, c, _, _ in active:
            replies[i] = DraftReply(c.seq_id, token_ids=guesses[i], probs=probs[i] if c.temperature > 0 else None)
        return [replies[i] for i in range(len(calls))]

    def release(self, seq_ids: list[str]) -> None:
        for sid in seq_ids:
            seq = self.seqs.pop(sid, None)
            if seq is not None:
                self.kv.free(seq.req)

    @property
    def num_sequences(self) -> int:
        return len(self.seqs)

    # ---- internals -----------------------------------------------------------------------------
    def _capture_chain(self, max_passes: int):
        """Chain graphs over the batch sizes and context of the runner's speculative graphs."""
        r = self.runner
        if r.spec_graphs is None or max_passes < 1:
            return None
        from services.engine.cuda_graphs import ChainGraphs  # noqa: PLC0415
        chain = ChainGraphs(r.model, r.kv_caches, r.backend, r.block_size, r.spec_graphs.max_batch,
                            r.spec_graphs.max_context, r.device, max_passes, pool=r.spec_graphs.pool)
        chain.capture()
        return chain

    def _schedule_pass(self, active: list, step: int, protected: set[str], done: set[int]) -> tuple[list, list]:
        """The sequences that still want a guess at pass `step` and have KV room for it (the others
        are `done`: they answer with what they have). Each feeds what it has not computed: its new
        tokens at the first pass, then its last guess (on the device path, not appended yet)."""
        scheduled, kept = [], []
        for entry in active:
            i, _, seq, k = entry
            if i in done or step >= k:
                continue
            req = seq.req
            num_new = max(req.num_tokens - req.num_computed_tokens, 1)
            if not self._allocate(seq, num_new, protected):
                done.add(i)
                continue
            scheduled.append(ScheduledRequest(req, num_new, self.kv.block_ids(req.request_id)))
            kept.append(entry)
        return scheduled, kept

    def _passes_on_host(self, active: list, guesses: dict[int, list[int]], probs: dict[int, list],
                        protected: set[str], done: set[int]) -> None:
        """One pass per guess position, each guess read from the device and appended before the next."""
        for step in range(max((k for *_, k in active), default=0)):
            scheduled, kept = self._schedule_pass(active, step, protected, done)
            if not scheduled:
                break
            logits, rows = self.runner.execute(scheduled)     # one row per sequence: its last position
            logits = logits[[r[0] for r in rows]]
            for s in scheduled:
                s.request.num_computed_tokens += s.num_new_tokens
            tokens, dists = self._sample(logits, [c.temperature for _, c, _, _ in kept])
            for (i, _, seq, _), t, d in zip(kept, tokens, dists):
                seq.req.append_token(t)
                guesses[i].append(t)
                if d is not None:
                    probs[i].append(d)

    def _can_draft_on_device(self, active: list) -> bool:
        """Greedy calls whose every pass after the first fits the CUDA graphs (batch, context)."""
        graphs = self.runner.graphs
        return (graphs is not None and 0 < len(active) <= graphs.max_batch
                and all(c.temperature <= 0 and seq.req.num_tokens + k <= graphs.max_context
                        for _, c, seq, k in active))

    def _greedy_chained(self, active: list, guesses: dict[int, list[int]], protected: set[str],
                        done: set[int]) -> bool:
        """The first pass, then the others in one replay of the chain graphs (ChainGraphs): one wait at
        the end. False (nothing done) where the chain does not fit; the caller then runs pass by pass."""
        most = max(k for *_, k in active) - 1
        if not self.chain.fits(len(active), most, max(seq.req.num_tokens for _, _, seq, _ in active)):
            return False
        scheduled, kept = self._schedule_pass(active, 0, protected, done)
        if not scheduled:
            return True
        logits, rows = self.runner.execute(scheduled)
        first = logits[[r[0] for r in rows]].argmax(-1)
        for s in scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        chained = []   # (column in `kept`, passes): those with KV room for their chained passes
        for col, (i, _, seq, k) in enumerate(kept):
            if k > 1 and self._allocate(seq, k - 1, protected):
                chained.append((col, k - 1))
            elif k > 1:
                done.add(i)   # no room: it answers with its first guess
        out = first
        if chained:
            cols = [col for col, _ in chained]
            step = [ScheduledRequest(kept[col][2].req, 1, self.kv.block_ids(kept[col][2].req.request_id))
                    for col in cols]
            ids = first[on_device(cols, torch.long, first.device)] if len(cols) != len(kept) else first
            out = torch.cat([first, self.chain.run_chain(step, ids, [p for _, p in chained]).flatten()])
        tokens, n, m = out.tolist(), len(kept), len(chained)   # the call's one wait
        where = {col: (j, p) for j, (col, p) in enumerate(chained)}   # column in the chain's output, passes
        for col, (i, _, seq, _) in enumerate(kept):
            j, p = where.get(col, (0, 0))
            for t in [tokens[col]] + [tokens[n + r * m + j] for r in range(p)]:
                seq.req.append_token(t)
                guesses[i].append(t)
            seq.req.num_computed_tokens += p
        return True

    def _greedy_on_device(self, active: list, guesses: dict[int, list[int]], protected: set[str],
                          done: set[int]) -> None:
        """Each pass after the first takes the previous pass's argmax as its input ids straight from
        the device (the engine's overlapped decoding, within one call): k passes, one wait at the end.
        With chain graphs, the passes after the first are one replay."""
        if self.chain is not None and self._greedy_chained(active, guesses, protected, done):
            return
        passes: list[tuple[list[tuple[int, _Seq]], torch.Tensor]] = []   # (who, their tokens on the device)
        prev: list[int] = []
        for step in range(max(k for *_, k in active)):
            scheduled, kept = self._schedule_pass(active, step, protected, done)
            if not scheduled:
                break
            who = [(i, seq) for i, _, seq, _ in kept]
            if step == 0:
                logits, rows = self.runner.execute(scheduled)
                logits = logits[[r[0] for r in rows]]
            else:
                ids = passes[-1][1]
                if len(who) != len(prev):   # some sequences have all their guesses (or no memory left)
                    at = {i: j for j, i in enumerate(prev)}
                    ids = ids[on_device([at[i] for i, _ in who], torch.long, ids.device)]
                logits, _ = self.runner.execute(scheduled, input_ids=ids)
            for s in scheduled:
                s.request.num_computed_tokens += s.num_new_tokens
            passes.append((who, logits.argmax(-1)))
            prev = [i for i, _ in who]
        if not passes:
            return
        tokens = torch.cat([t for _, t in passes]).tolist()
        k = 0
        for who, _ in passes:
            for i, seq in who:
                seq.req.append_token(tokens[k])
                guesses[i].append(tokens[k])
                k += 1

    def _sync(self, c: DraftCall) -> _Seq | None:
        """Roll the sequence back to the caller's committed prefix and append what is new."""
        seq = self.seqs.get(c.seq_id)
        if c.prefix_len == 0:
            if seq is not None:
                self.release([c.seq_id])
            if not c.new_token_ids:
                return None
            req = Request(c.seq_id, list(c.new_token_ids), _PARAMS, frozenset(), self.max_model_len,
                          self.config.block_size, RequestMetrics(0.0))
            seq = self.seqs[c.seq_id] = _Seq(req, len(c.new_token_ids))
            return seq
        if seq is None or seq.num_committed < c.prefix_len:
            return None
        req = seq.req
        dropped = req.token_ids[c.prefix_len:]
        # KV stays valid for the dropped guesses that the target accepted (they equal the new tokens).
        same = 0
        while same < min(len(dropped), len(c.new_token_ids)) and dropped[same] == c.new_token_ids[same]:
            same += 1
        req.token_ids = req.token_ids[:c.prefix_len] + list(c.new_token_ids)
        req.block_hashes = req.block_hashes[:len(req.token_ids) // self.config.block_size]
        req.num_computed_tokens = min(req.num_computed_tokens, c.prefix_len + same, req.num_tokens - 1)
        seq.num_committed = req.num_tokens
        self.seqs.move_to_end(c.seq_id)
        return seq

    def _allocate(self, seq: _Seq, num_new: int, protected: set[str]) -> bool:
        while not self.kv.allocate_slots(seq.req, num_new):
            victim = next((sid for sid in self.seqs if sid not in protected), None)
            if victim is None:
                return False
            self.release([victim])
            self.num_evictions += 1
        return True

    def _sample(self, logits: torch.Tensor, temperatures: list[float]):
        """Greedy rows: argmax, no distribution. Sampled rows: q = softmax(logits / T) truncated to
        the top `top_probs` and renormalised; the guess is drawn from that q."""
        tokens = logits.argmax(-1).tolist()
        dists: list = [None] * len(temperatures)
        for j, t in enumerate(temperatures):
            if t <= 0:
                continue
            p = (logits[j].float() / t).softmax(-1)
            top = torch.topk(p, min(self.top_probs, p.shape[0]))
            q = top.values / top.values.sum()
            pick = int(torch.multinomial(q.cpu(), 1, generator=self.generator))
            tokens[j] = int(top.indices[pick])
            dists[j] = (top.indices.tolist(), q.tolist())
        return tokens, dists
