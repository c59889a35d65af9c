"""What crosses the Ray handle between the gateway and an LLMServer replica: plain dataclasses.

A replica call is `generate(ReplicaRequest)` streaming `ReplicaChunk`s; a refusal is a chunk whose
`error` is set (then nothing follows). Tokens, text and logprobs in a chunk are deltas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



@dataclass(slots=True, frozen=True)
class ErrorInfo:
    """A refusal as plain data: HTTP-style status plus OpenAI's error fields."""
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None


@dataclass(slots=True, frozen=True)
class ReplicaRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]             # SamplingParams keyword arguments (grammar excluded)
    prompt: str | None = None
    priority: int = 0
    cache_salt: str | None = None        # the tenant: prefix-cache blocks are never shared across tenants
    structured: dict[str, Any] | None = None   # {"kind": json_schema|json_object|grammar|regex|choice, "spec": ...}
    speculative: dict[str, Any] | None = None
    deadline: float | None = None        # time.time() after which the engine aborts the request
    trace_carrier: dict[str, str] = field(default_factory=dict)
    # Salted block hashes of the prompt, read by the prefix-aware router (services.prefix_cache.router).
    prefix_block_hashes: list[bytes] | None = None


@dataclass(slots=True, frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob]


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True, frozen=True)
class Timing:
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass(slots=True)
class ReplicaChunk:
    choices: list[ChoiceDelta] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False
    timing: Timing | None = None       # on the last chunk
    error: ErrorInfo | None = None
