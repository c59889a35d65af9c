"""Timing of one streamed reply: time to first token, inter-token latencies, decode tokens/s.

Definitions (the same for REST and gRPC, all client-side):
- TTFT: from sending the request to the first message that carries generated tokens (OpenAI's
  opening chat chunk with only the role does not count).
- ITL: seconds per token after the first. A message that brings k tokens after a gap g counts as
  k samples of g/k, so the samples of a reply sum to its decode time and there are (tokens - 1) of
  them; the rate of TTFT + ITL samples is then the output tokens/s. gRPC messages carry their
  token ids (exact k). SSE chunks do not: there the reply's total from `usage` is spread evenly
  over the gaps, earliest gaps first (a trailing finish-only chunk then gets none).
- tokens/s: a reply's decode speed, (tokens - 1) / (last token time - first token time).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StreamTimer:
    started: float                              # when the request was sent (time.perf_counter())
    first_at: float | None = None
    last_at: float | None = None
    first_tokens: int | None = None             # tokens in the first message (None: unknown)
    gaps: list[tuple[float, int | None]] = field(default_factory=list)   # (seconds, tokens or None)

    def on_tokens(self, now: float, num_tokens: int | None) -> None:
        """One message with generated tokens arrived (`num_tokens` None when the protocol hides it)."""
        if num_tokens == 0:
            return
        if self.first_at is None:
            self.first_at = now
            self.first_tokens = num_tokens
        else:
            self.gaps.append((now - self.last_at, num_tokens))
        self.last_at = now

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started

    def num_tokens(self, total_tokens: int | None = None) -> int:
        """Output tokens: the reply's usage when given, else what the messages said (or one each)."""
        if total_tokens is not None:
            return total_tokens
        if self.first_at is None:
            return 0
        return (self.first_tokens or 1) + sum(k or 1 for _, k in self.gaps)

    def itl_samples(self, total_tokens: int | None = None) -> list[float]:
        if not self.gaps:
            return []
        if all(k is not None for _, k in self.gaps):
            return [g / k for g, k in self.gaps for _ in range(k)]
        # Counts unknown: spread the tokens after the first message over the gaps.
        remaining = max(0, self.num_tokens(total_tokens) - (self.first_tokens or 1))
        base, extra = divmod(remaining, len(self.gaps))
        out: list[float] = []
        for i, (g, _) in enumerate(self.gaps):
            k = base + (1 if i < extra else 0)
            if k:
                out.extend([g / k] * k)
        return out

    def tokens_per_s(self, total_tokens: int | None = None) -> float | None:
        n = self.num_tokens(total_tokens)
        if self.first_at is None or self.last_at is None or n < 2 or self.last_at <= self.first_at:
            return None
        return (n - (self.first_tokens or 1)) / (self.last_at - self.first_at)
