"""One sequence being generated: its tokens, how many have their KV computed, and its sampling state.

The invariant the scheduler works on: `num_computed_tokens <= num_tokens`. Each step schedules
`num_tokens_with_spec - num_computed_tokens` more tokens (clipped by budget): a prompt's first chunk,
the rest of a chunked prefill, the tail after a prefix-cache hit, or one decode token plus draft
tokens all take this one path. A request with n > 1 is n of these ("children") in one group.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from services.engine.outputs import Logprob, RequestMetrics
from services.engine.sampling_params import SamplingParams
from services.prefix_cache.hashing import BlockHash, block_hashes, root_hash


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    block_size: int
    metrics: RequestMetrics
    priority: int = 0
    cache_salt: str | None = None
    index: int = 0                      # position among the group's n outputs
    arrival_seq: int = 0                # FCFS tie-break inside a priority
    token_ids: list[int] = field(default_factory=list)         # prompt + output
    num_computed_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)    # draft tokens to verify this step
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)  # full blocks of token_ids, salted chain
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None   # per-request seed: same tokens whatever the batch
    mirostat_mu: float | None = None
    matcher: Any = None                         # grammar matcher (services.grammar.matcher) or None
    output_text: str = ""

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.block_hashes = block_hashes(self.token_ids, self.block_size, self.cache_salt)
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed + self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.token_ids) + len(self.spec_token_ids)

    @property
    def max_tokens(self) -> int:
        """Output tokens allowed: the request's max_tokens, bounded by the context length."""
        room = self.max_model_len - self.num_prompt_tokens
        mt = self.sampling_params.max_tokens
        return room if mt is None else min(mt, room)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.num_tokens % self.block_size == 0:
            parent = self.block_hashes[-1] if self.block_hashes else root_hash(self.cache_salt)
            self.block_hashes.extend(block_hashes(self.token_ids, self.block_size, self.cache_salt,
                                                  start=len(self.block_hashes), parent=parent))

    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: higher priority first, then first come first served."""
        return (-self.priority, self.arrival_seq)
