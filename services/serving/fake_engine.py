"""A small deterministic stand-in for AsyncEngine, injected into LLMServer by unit tests.

It honours the parts of the engine contract the serving layer relies on: per-yield deltas, n > 1
in one RequestOutput, max_tokens, stop strings, logprobs, RequestMetrics timestamps, abort on
cancel (counted in `aborted`), stats with running/waiting counts and KV usage, health. Token i of
a request is (last prompt token + i + 1) mod vocab; its text is the tokenizer's decoding.
`FakeTokenizer` is character-level (id = code point) with a minimal chat template.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from services.engine.sampling_params import SamplingParams


class FakeTokenizer:
    eos_token_id = 0
    vocab_size = 512

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [min(ord(ch), self.vocab_size - 1) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass(slots=True)
class FakeStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    last_step_time: float = 0.0
    is_alive: bool = True


class FakeEngine:
    NUM_BLOCKS = 64
    BLOCK_SIZE = 16

    def __init__(self, config=None, step_s: float = 0.002, max_num_seqs: int = 4) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = 256
        self.step_s = step_s
        self.max_num_seqs = max_num_seqs
        self.running: dict[str, int] = {}     # request id -> KV blocks held
        self.waiting = 0
        self.aborted: list[str] = []
        self.alive = True
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._slots = asyncio.Semaphore(max_num_seqs)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.check_against(self.tokenizer.vocab_size, self.max_model_len, len(prompt_token_ids))

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        self.validate(prompt_token_ids, params)
        metrics = RequestMetrics(arrival_time=time.time())
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        metrics.first_scheduled_time = time.time()
        blocks = math.ceil((len(prompt_token_ids) + (params.max_tokens or 0)) / self.BLOCK_SIZE) * params.n
        self.running[request_id] = blocks
        self.prompt_tokens_total += len(prompt_token_ids)
        outs = [CompletionOutput(i, "", []) for i in range(params.n)]
        finished = False
        try:
            for step in range(params.max_tokens or 16):
                await asyncio.sleep(self.step_s)
                if not self.alive:
                    raise RuntimeError("fake engine loop is dead")
                for c in outs:
                    if c.finished:
                        c.delta_text, c.delta_token_ids, c.delta_logprobs = "", [], None
                        continue
                    tok = (prompt_token_ids[-1] + step + 1 + c.index) % self.tokenizer.vocab_size
                    piece = self.tokenizer.decode([tok])
                    before = len(c.text)
                    c.delta_token_ids = [tok]
                    c.token_ids.append(tok)
                    c.text += piece
                    self.generation_tokens_total += 1
                    if params.logprobs is not None:
                        d = {tok: Logprob(-0.5, 1, piece)}
                        for k in range(params.logprobs):
                            alt = (tok + k + 1) % self.tokenizer.vocab_size
                            d[alt] = Logprob(-1.0 - k, k + 2, self.tokenizer.decode([alt]))
                        c.delta_logprobs = [d]
                        c.logprobs = (c.logprobs or []) + [d]
                    hit = next((s for s in params.stop if s in c.text), None)
                    if hit is not None:
                        c.text = c.text[:c.text.index(hit)]
                        c.finish_reason, c.stop_reason = "stop", hit
                    elif step + 1 == params.max_tokens:
                        c.finish_reason = "length"
                    c.delta_text = c.text[before:]   # a matched stop string is never sent
                now = time.time()
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
                finished = all(c.finished for c in outs)
                if finished:
                    metrics.finished_time = now
                yield RequestOutput(request_id, prompt, prompt_token_ids, outs, finished, metrics)
                if finished:
                    return
        finally:
            self.running.pop(request_id, None)
            self._slots.release()
            if not finished and request_id not in self.aborted:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running and request_id not in self.aborted:
            self.aborted.append(request_id)

    def stats(self) -> FakeStats:
        used = sum(self.running.values())
        return FakeStats(len(self.running), self.waiting, used / self.NUM_BLOCKS, self.NUM_BLOCKS - used,
                         self.NUM_BLOCKS, prompt_tokens_total=self.prompt_tokens_total,
                         generation_tokens_total=self.generation_tokens_total, last_step_time=time.monotonic(),
                         is_alive=self.alive)

    def check_health(self) -> None:
        if not self.alive:
            raise RuntimeError("fake engine loop is dead")

    def shutdown(self) -> None:
        self.alive = False
