"""The in-engine side of structured output: a compiled grammar per request, a matcher per sequence,
and the per-step token masks. The engine imports only this module.

    handle = GrammarHandle.from_serialized(json_text, tokenizer_info)   # from the GrammarService
    params = SamplingParams(..., grammar=handle)       # the engine calls handle.new_matcher() per sequence
    # each step (services/engine/sampler.py): apply_grammar_masks(logits, requests)
    # each accepted token (services/engine/llm_engine.py): matcher.accept_token(t); is_terminated()

Bitmask: int32 [batch, ceil(V_tok / 32)], bit j of a row = token j allowed; V_tok is the
tokenizer info's vocabulary size. The model's logits may be wider (padded heads): ids past
V_tok are masked too, so they can never be sampled under a grammar.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from services.grammar.tokenizer import fingerprint
from services.telemetry import metrics

NEG_INF = float("-inf")


class Matcher:
    """One sequence's position in the grammar. Cheap; created per sequence (n > 1: one each)."""
    __slots__ = ("_m", "_stop_ids", "_pending", "num_accepted")

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int] | None = None) -> None:
        self._m = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        self._stop_ids = frozenset(self._m.stop_token_ids)
        self._pending: list[int] = []
        self.num_accepted = 0

    def accept_token(self, token_id: int) -> bool:
        """False if the grammar cannot take the token (state unchanged)."""
        ok = self.synced().accept_token(int(token_id))
        self.num_accepted += ok
        return ok

    def defer(self, token_id: int) -> None:
        """accept_token, but only when the matcher is next used: a token that is not a stop token cannot
        terminate the grammar, so is_terminated() is known without it. The engine appends tokens this
        way, and when the mask worker fills this sequence's masks its own matcher never has to catch up."""
        if token_id in self._stop_ids:
            self.accept_token(token_id)
        else:
            self._pending.append(token_id)

    def synced(self) -> xgr.GrammarMatcher:
        """The xgrammar matcher, after it took the deferred tokens."""
        if self._pending:
            pending, self._pending = self._pending, []
            for t in pending:
                self.num_accepted += self._m.accept_token(t)
        return self._m

    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: the sequence must end."""
        return False if self._pending else self._m.is_terminated()   # (stop tokens are never deferred)

    def is_completed(self) -> bool:
        """The text so far is a complete match (a stop token may still be pending)."""
        return self.synced().is_completed()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative decoding's rejected drafts)."""
        if num_tokens > 0:
            self.synced().rollback(num_tokens)
            self.num_accepted -= num_tokens

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row] (CPU int32). False: all allowed."""
        m = self.synced()
        if m.is_terminated():   # stop tokens only
            fill_rows([m], bitmask, [row])
            return True
        return m.fill_next_token_bitmask(bitmask, row)

    @property
    def stop_token_ids(self) -> list[int]:
        return sorted(self._stop_ids)


def _bit(i: int) -> int:
    # int32 words: bit 31 is the sign bit.
    return (1 << i) if i < 31 else -(1 << 31)


class GrammarHandle:
    """An immutable compiled grammar for one tokenizer; shared by all sequences that use it."""
    __slots__ = ("compiled", "tokenizer_info", "vocab_size", "spec_hash", "stop_token_ids")

    def __init__(self, compiled: xgr.CompiledGrammar, tokenizer_info: xgr.TokenizerInfo,
                 spec_hash: str | None = None, stop_token_ids: list[int] | None = None) -> None:
        self.compiled = compiled
        self.tokenizer_info = tokenizer_info
        self.vocab_size = tokenizer_info.vocab_size
        self.spec_hash = spec_hash
        self.stop_token_ids = stop_token_ids

    @staticmethod
    def from_serialized(serialized: str, tokenizer_info: xgr.TokenizerInfo, *, spec_hash: str | None = None,
                        stop_token_ids: list[int] | None = None) -> "GrammarHandle":
        compiled = xgr.CompiledGrammar.deserialize_json(serialized, tokenizer_info)
        return GrammarHandle(compiled, tokenizer_info, spec_hash, stop_token_ids)

    @staticmethod
    def compile(spec: Any, tokenizer_info: xgr.TokenizerInfo, limits: Any = None) -> "GrammarHandle":
        """Compile in this process, with the limits checks but no deadline (offline use, tests)."""
        from services.grammar.compiler import compile_spec  # noqa: PLC0415
        from services.grammar.spec import GrammarLimits, GrammarSpec  # noqa: PLC0415
        spec = GrammarSpec.from_dict(spec)
        compiled = compile_spec(_offline_compiler(tokenizer_info), spec, limits or GrammarLimits())
        return GrammarHandle(compiled, tokenizer_info, spec.spec_hash)

    @property
    def tokenizer_fingerprint(self) -> str:
        return fingerprint(self.tokenizer_info)

    def new_matcher(self, stop_token_ids: list[int] | None = None) -> Matcher:
        return Matcher(self.compiled, stop_token_ids or self.stop_token_ids)

    def __repr__(self) -> str:
        return f"GrammarHandle(spec={self.spec_hash and self.spec_hash[:12]}, vocab_size={self.vocab_size})"


_OFFLINE: dict[int, tuple[xgr.TokenizerInfo, xgr.GrammarCompiler]] = {}


def _offline_compiler(tokenizer_info: xgr.TokenizerInfo) -> xgr.GrammarCompiler:
    """One long-lived compiler per TokenizerInfo object, so its token-mask cache carries over."""
    hit = _OFFLINE.get(id(tokenizer_info))
    if hit is None or hit[0] is not tokenizer_info:
        from services.grammar.compiler import xgr_compiler  # noqa: PLC0415
        hit = (tokenizer_info, xgr_compiler(tokenizer_info))
        while len(_OFFLINE) >= 4:   # a few tokenizers per process at most; drop the oldest
            _OFFLINE.pop(next(iter(_OFFLINE)))
        _OFFLINE[id(tokenizer_info)] = hit
    return hit[1]


def allocate_token_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """All-allowed int32 bitmask [batch, ceil(vocab_size / 32)] on the CPU."""
    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None,
                        vocab_size: int | None = None) -> None:
    """In place: logits[r, j] = -inf where bit j of bitmask[r] is 0, for r in rows (None = all).
    logits [B, V] on any device; bitmask [B', W] int32 (CPU or logits' device), row r of the
    bitmask belongs to row r of logits. `vocab_size` (default W*32, capped at V) is the mask's real
    width; columns of logits past it are set to -inf in those rows."""
    if rows is not None and not rows:
        return
    v = logits.shape[-1]
    width = min(v, vocab_size if vocab_size is not None else bitmask.shape[-1] * 32)
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    idx = None   # every row (and in order); else the rows, through pinned memory: no wait for the forward pass
    if rows is not None and not len(rows) == logits.shape[0] == bitmask.shape[0]:
        idx = torch.tensor(rows, dtype=torch.int32, pin_memory=logits.is_cuda).to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=width, indices=idx)
    if v > width:
        logits[slice(None) if idx is None else idx.long(), width:] = NEG_INF


class _Buffers:
    """One reusable CPU bitmask per mask width (pinned when a GPU is present, for async copies)."""

    def __init__(self) -> None:
        self._by_width: dict[int, torch.Tensor] = {}

    def get(self, batch: int, vocab_size: int) -> torch.Tensor:
        words = (vocab_size + 31) // 32
        buf = self._by_width.get(words)
        if buf is None or buf.shape[0] < batch:
            buf = torch.empty((max(batch, 64), words), dtype=torch.int32,
                              pin_memory=torch.cuda.is_available())
            self._by_width[words] = buf
        return buf[:batch]


_BUFFERS = _Buffers()


@dataclass(slots=True)
class FilledMasks:
    bitmask: torch.Tensor      # int32 [B, ceil(vocab_size / 32)] on the CPU; row i = requests[i]
    rows: list[int]            # the constrained rows
    vocab_size: int            # the mask's real width (tokenizer info vocab size)
    fill_s: float              # CPU time spent filling

    def limit_key(self, n: int) -> tuple:
        """What `limits(n)` depends on: the same from step to step while the same rows decode."""
        return n, self.vocab_size, tuple(self.rows)

    def limits(self, n: int) -> list[int]:
        """The sampling kernel's per-row mask limit for a batch of n rows: the mask's width where a row is
        constrained, -1 (not masked) elsewhere."""
        on = set(self.rows)
        return [self.vocab_size if i in on else -1 for i in range(n)]


def fill_grammar_bitmask(requests: list[Any]) -> FilledMasks | None:
    """CPU half of a step's masking: fill the rows of requests that have a matcher (None when no
    row is constrained). Reads only matcher state, so it can run while the device computes the
    forward pass."""
    t0 = time.perf_counter()
    rows = [i for i, r in enumerate(requests) if r.matcher is not None]
    if not rows:
        return None
    vocab_size = requests[rows[0]].sampling_params.grammar.vocab_size
    bitmask = _BUFFERS.get(len(requests), vocab_size)
    fill_rows([requests[i].matcher.synced() for i in rows], bitmask, rows)
    return FilledMasks(bitmask, rows, vocab_size, time.perf_counter() - t0)


def fill_rows(matchers: list[xgr.GrammarMatcher], bitmask: torch.Tensor, rows: list[int],
              batch: xgr.BatchGrammarMatcher | None = None) -> None:
    """bitmask[rows[k]] = the tokens matchers[k] allows next; stop tokens only once it has terminated
    (nothing may follow, and an all-zero row could not be sampled). Several rows are filled by `batch`
    (default: xgrammar's thread pool)."""
    live = [k for k, m in enumerate(matchers) if not m.is_terminated()]
    if len(live) > 1:
        # In the engine's process xgrammar fills the rows on its own threads, outside the GIL: at
        # batch 32 this is the difference between hiding behind the forward pass and not.
        (batch or _batch_matcher()).batch_fill_next_token_bitmask([matchers[k] for k in live], bitmask, [rows[k] for k in live])
    elif live:
        matchers[live[0]].fill_next_token_bitmask(bitmask, rows[live[0]])
    for k in set(range(len(matchers))).difference(live):
        bitmask[rows[k]].zero_()
        for t in matchers[k].stop_token_ids:
            bitmask[rows[k], t // 32] |= _bit(t % 32)


_BATCH: xgr.BatchGrammarMatcher | None = None


def _batch_matcher() -> xgr.BatchGrammarMatcher:
    global _BATCH
    if _BATCH is None:
        _BATCH = xgr.BatchGrammarMatcher("auto")
    return _BATCH


def apply_grammar_masks(logits: torch.Tensor, requests: list[Any], filled: FilledMasks | None = None) -> None:
    """Mask logits [B, V] in place for the requests (row i = requests[i]) that have a matcher.
    `filled`: fill_grammar_bitmask(requests) when it already ran (overlapped with the forward)."""
    t0 = time.perf_counter()
    earlier_s = filled.fill_s if filled is not None else 0.0
    filled = filled or fill_grammar_bitmask(requests)
    if filled is None:
        return
    bitmask, rows, vocab_size = filled.bitmask, filled.rows, filled.vocab_size
    # Rows where the sampler already banned tokens (min_tokens bans EOS) may have nothing left
    # once the grammar's mask is applied (the grammar wants to stop): the grammar wins there.
    banned = [i for i in rows if requests[i].num_output_tokens < requests[i].sampling_params.min_tokens]
    apply_token_bitmask(logits, bitmask, rows, vocab_size)
    if banned:
        dead = torch.isneginf(logits[banned]).all(-1).tolist()
        for i, is_dead in zip(banned, dead):
            if is_dead:   # typically only EOS is allowed: uniform over what the grammar allows
                allowed = _allowed(bitmask[i], logits.shape[-1], vocab_size).to(logits.device)
                logits[i] = torch.where(allowed, 0.0, NEG_INF)
    # Fill time counts whether it ran here or earlier, overlapped with the forward pass.
    metrics.GRAMMAR_MASK_SECONDS.observe(time.perf_counter() - t0 + earlier_s)


def _allowed(bitmask_row: torch.Tensor, v: int, vocab_size: int) -> torch.Tensor:
    """bool [v]: bit j of the row set (and j < vocab_size)."""
    words = bitmask_row.to(torch.int64) & 0xFFFFFFFF
    bits = (words[:, None] >> torch.arange(32)) & 1
    allowed = bits.flatten().bool()[:v]
    if allowed.shape[0] < v:
        allowed = torch.cat([allowed, torch.zeros(v - allowed.shape[0], dtype=torch.bool)])
    allowed[vocab_size:] = False
    return allowed
