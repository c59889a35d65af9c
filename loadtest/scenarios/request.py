"""What a scenario hands a Locust user: one `ScenarioRequest`, in OpenAI's body shape, plus the
small state scenarios keep between requests (`Budget`, `Conversation`).

The REST user posts `body(model)` as is; the gRPC user turns the same dict into a protobuf message
(the proto mirrors OpenAI's field names), so both protocols send identical work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Budget:
    """The model's context length and a running estimate of characters per token.

    Prompts are sized in characters, the context in tokens. The estimate starts low (2 chars per
    token over-counts tokens, so prompts come out short rather than over the limit) and follows the
    fewest characters per token any reply's usage has shown.
    """
    max_model_len: int
    chars_per_token: float = 2.0
    num_observed: int = 0

    def observe(self, prompt_chars: int, prompt_tokens: int) -> None:
        if prompt_tokens <= 0 or prompt_chars <= 0:
            return
        ratio = prompt_chars / prompt_tokens
        self.chars_per_token = ratio if self.num_observed == 0 else min(self.chars_per_token, ratio)
        self.num_observed += 1

    def chars_for(self, num_tokens: int) -> int:
        return max(0, int(num_tokens * self.chars_per_token))

    def tokens_in(self, num_chars: int) -> int:
        return int(num_chars / self.chars_per_token) + 1


@dataclass(slots=True)
class Conversation:
    """A multi-turn chat that grows by one exchange per request until it is reset."""
    messages: list[dict[str, str]] = field(default_factory=list)
    num_turns: int = 0

    @property
    def num_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self.num_turns += 1

    def add_reply(self, text: str) -> None:
        # An empty reply still keeps roles alternating, which chat templates require.
        self.messages.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        self.messages.clear()
        self.num_turns = 0


@dataclass(slots=True)
class ScenarioRequest:
    scenario: str                       # the Locust entry name: which scenario sent it
    kind: str                           # "chat" | "completion"
    max_tokens: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    temperature: float | None = None
    response_format: dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None
    priority: int | None = None
    ignore_eos: bool = False
    expect_json: bool = False           # a finished reply must parse as JSON, else it is a failure
    conversation: Conversation | None = None   # multi-turn: receives the reply text

    def __post_init__(self) -> None:
        if self.kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {self.kind!r}")
        if (self.kind == "chat") != (self.messages is not None) or (self.kind == "completion") != (
                self.prompt is not None):
            raise ValueError("a chat request needs messages (and no prompt); a completion needs a prompt")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def prompt_chars(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt or "")

    def record_reply(self, text: str | None) -> None:
        """The reply's text, or None when the request failed (a conversation then starts over,
        so that roles keep alternating)."""
        if self.conversation is None:
            return
        if text is None:
            self.conversation.reset()
        else:
            self.conversation.add_reply(text)

    def body(self, model: str) -> dict[str, Any]:
        """The OpenAI request body (streaming, with usage in the last chunk)."""
        out: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "stream": True,
                               "stream_options": {"include_usage": True}}
        if self.kind == "chat":
            out["messages"] = [dict(m) for m in self.messages or []]
        else:
            out["prompt"] = self.prompt
        for name in ("temperature", "response_format", "speculative", "priority"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.ignore_eos:
            out["ignore_eos"] = True
        return out
