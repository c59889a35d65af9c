"""Folding replica chunks into whole choices (unary replies) and usage/timing (both surfaces)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.serving.wire import ReplicaChunk, Timing, TokenLogprob


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(slots=True)
class Accumulator:
    n: int
    started: float = field(default_factory=time.perf_counter)
    choices: list[ChoiceResult] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    timing: Timing | None = None
    first_token_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        self.choices = [ChoiceResult(i) for i in range(self.n)]

    def add(self, chunk: ReplicaChunk) -> None:
        now = time.perf_counter()
        self.usage.prompt_tokens = chunk.num_prompt_tokens
        self.usage.cached_tokens = chunk.num_cached_tokens
        for d in chunk.choices:
            c = self.choices[d.index]
            c.text += d.text
            c.token_ids.extend(d.token_ids)
            self.usage.completion_tokens += len(d.token_ids)
            if d.token_ids and self.first_token_s is None:
                self.first_token_s = now - self.started
            if d.logprobs is not None:
                c.logprobs = (c.logprobs or []) + d.logprobs
            if d.finish_reason is not None:
                c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        if chunk.timing is not None:
            self.timing = chunk.timing
        if chunk.finished:
            self.e2e_s = now - self.started

    def timing_dict(self) -> dict:
        t = self.timing or Timing()
        return {"queue_s": t.queue_s, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
                "time_to_first_token_s": self.first_token_s or 0.0, "e2e_s": self.e2e_s or 0.0}
