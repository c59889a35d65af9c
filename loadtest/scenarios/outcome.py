"""One request's outcome and the Locust entries it becomes (shared by the REST and gRPC users).

Entries, as (request_type, name, value, length, error):
  ("REST" | "gRPC", scenario, e2e ms, output tokens, error or None)  one per request; failures here
  ("TTFT", "<rest|grpc> <scenario>", ms, 0, None)                    one per successful request
  ("ITL",  "<rest|grpc> <scenario>", ms, 0, None)                    one per output token after the first
  ("TOKENS/S", "<rest|grpc> <scenario>", tokens/s, tokens, None)     the reply's decode speed; Locust
                                                                     shows it in its "ms" columns
  ("CACHED%", "<rest|grpc> <scenario>", %, cached tokens, None)      share of the prompt served from
                                                                     the prefix cache (usage.cached_tokens)
Latency entries are recorded for successful requests only, so a failing server cannot improve them.
"""
from __future__ import annotations

from dataclasses import dataclass

from loadtest.scenarios.catalog import check_json_reply
from loadtest.scenarios.request import Budget, ScenarioRequest
from loadtest.scenarios.stream import StreamTimer

Entry = tuple[str, str, float, int, "ReplyError | None"]


class ReplyError(Exception):
    """A failed request, as Locust shows it in its failures table (grouped by message)."""


@dataclass(slots=True)
class Outcome:
    protocol: str                       # "REST" | "gRPC"
    request: ScenarioRequest
    timer: StreamTimer
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finished_at: float | None = None
    error: str | None = None

    def fail(self, message: str, now: float) -> None:
        if self.error is None:
            self.error = message
        self.finished_at = now

    def finish(self, now: float, budget: Budget) -> None:
        """Ends the request: checks what a complete reply must have, updates the scenario's state."""
        self.finished_at = now
        if self.error is None and self.timer.first_at is None:
            self.error = "the stream ended without any generated token"
        if self.error is None and self.finish_reason is None:
            self.error = "the stream ended without a finish_reason"
        if self.error is None and self.request.expect_json and self.finish_reason == "stop":
            self.error = check_json_reply(self.text)
        if self.prompt_tokens:
            budget.observe(self.request.prompt_chars, self.prompt_tokens)
        self.request.record_reply(None if self.error else self.text)

    def entries(self) -> list[Entry]:
        assert self.finished_at is not None, "call finish() or fail() first"
        e2e_ms = (self.finished_at - self.timer.started) * 1000
        tokens = self.timer.num_tokens(self.completion_tokens)
        scenario = self.request.scenario
        main: Entry = (self.protocol, scenario, e2e_ms, tokens, ReplyError(self.error) if self.error else None)
        if self.error:
            return [main]
        name = f"{self.protocol.lower()} {scenario}"
        out: list[Entry] = [main, ("TTFT", name, self.timer.ttft_s * 1000, 0, None)]
        out.extend(("ITL", name, s * 1000, 0, None) for s in self.timer.itl_samples(self.completion_tokens))
        rate = self.timer.tokens_per_s(self.completion_tokens)
        if rate is not None:
            out.append(("TOKENS/S", name, rate, tokens, None))
        if self.cached_tokens is not None and self.prompt_tokens:
            out.append(("CACHED%", name, 100.0 * self.cached_tokens / self.prompt_tokens, self.cached_tokens, None))
        return out
