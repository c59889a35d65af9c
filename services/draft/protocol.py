"""What a caller and a draft model exchange (in process, or over a Ray handle to the DraftServer).

The caller remembers how many tokens of each sequence it has sent; the draft keeps the sequence
(and its KV) between calls, plus its own last guesses. Each call says: "I sent you `prefix_len`
tokens before (all committed), here are the committed tokens since (`new_token_ids`), guess k".
The draft rolls back to `prefix_len` (dropping its guesses, keeping the KV of those that turned out
right), appends, and guesses. A draft that no longer holds `prefix_len` tokens of the sequence
(evicted, restarted, another replica) answers `lost`, and the caller resends from prefix_len = 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class DraftCall:
    seq_id: str
    prefix_len: int                  # 0 = new_token_ids is the whole sequence
    new_token_ids: list[int]
    num_speculative_tokens: int
    temperature: float               # 0 = greedy guesses (argmax, no probabilities)


@dataclass(slots=True, frozen=True)
class DraftReply:
    seq_id: str
    lost: bool = False
    token_ids: list[int] = field(default_factory=list)
    # Per guess: (ids, probabilities) of the top few draft probabilities, renormalised; the guess was
    # drawn from exactly this distribution. None for greedy guesses.
    probs: list[tuple[list[int], list[float]]] | None = None


@dataclass(slots=True, frozen=True)
class DraftBatch:
    calls: list[DraftCall]
    release_ids: list[str] = field(default_factory=list)   # sequences the caller is done with
