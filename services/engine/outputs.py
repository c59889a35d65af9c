"""What the engine gives back: vLLM's RequestOutput / CompletionOutput shape.

`text`/`token_ids`/`logprobs` are cumulative; `delta_*` hold what is new since the previous
output of the same request (what a streaming server sends). Text never ends inside a UTF-8
character: undecodable trailing bytes are held back until the next token completes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None           # 1 = most likely
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None   # one dict per generated token
    finish_reason: str | None = None   # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0         # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    # [spec] this request's speculative decoding: guesses scored and accepted, verify steps, time spent
    # waiting for its proposer's calls, and proposer calls that failed or timed out (plain steps instead)
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0
    spec_draft_s: float = 0.0
    spec_fallbacks: int = 0


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0
