"""Per-request sampling parameters (vLLM's shape), validated before a request is admitted.

Ranges that do not depend on the model are checked in `validate()`; model-dependent ones
(vocabulary ids, context length) in `check_against(vocab_size, max_model_len, num_prompt_tokens)`.
Every error is a ValueError that names the field and its allowed range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None          # None = off
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16       # None = up to the context length
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top logprobs per generated token (0 = only the chosen)
    skip_special_tokens: bool = True
    mirostat_mode: int = 0            # 0 off, 1 Mirostat v1, 2 Mirostat v2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    # What each streamed output carries: "cumulative" (text/token_ids so far, plus deltas), "delta"
    # (deltas only until the last output), "final_only" (one output at the end).
    output_kind: str = "cumulative"
    # Structured output: an object with `new_matcher()` (services.grammar) or None. Opaque to the sampler.
    grammar: Any = None
    # Speculative decoding override: {"enabled": bool, "method": "ngram"|"draft", "num_speculative_tokens":
    # 1..16}, any subset; None = the deployment's default (EngineConfig.speculative_*).
    speculative: dict[str, Any] | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 and self.mirostat_mode == 0

    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        need(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "an integer in [1, 128]")
        need(0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]")
        need(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        need(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
             "top_k", "None or an integer >= 1")
        need(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]")
        need(0.0 < self.typical_p <= 1.0, "typical_p", "in (0, 1]")
        need(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "in (0, 10]")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]")
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens", "None or an integer >= 1")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "<= max_tokens")
        need(self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
             "logprobs", f"None or an integer in [0, {self.MAX_LOGPROBS}]")
        need(self.mirostat_mode in (0, 1, 2), "mirostat_mode", "0, 1 or 2")
        need(self.output_kind in ("cumulative", "delta", "final_only"), "output_kind",
             '"cumulative", "delta" or "final_only"')
        need(self.mirostat_tau > 0.0, "mirostat_tau", "> 0")
        need(0.0 < self.mirostat_eta <= 1.0, "mirostat_eta", "in (0, 1]")
        need(self.seed is None or isinstance(self.seed, int), "seed", "None or an integer")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        need(len(self.stop) <= 16, "stop", "at most 16 strings")
        if self.speculative is not None:
            spec = self.speculative
            ok = isinstance(spec, dict) and not set(spec) - {"enabled", "method", "num_speculative_tokens"}
            ok = ok and spec.get("enabled") in (None, True, False) and spec.get("method") in (
                None, "", "ngram", "draft", "remote")
            k = spec.get("num_speculative_tokens") if ok else None
            ok = ok and (k is None or (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 16))
            need(ok, "speculative", 'None or {"enabled": bool, "method": "ngram"|"draft"|"remote", '
                 '"num_speculative_tokens": 1..16}')
        if self.logit_bias is not None:
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or not -100.0 <= float(v) <= 100.0:
                    raise ValueError(f"logit_bias must map token ids to values in [-100, 100], got {k!r}: {v!r}")

    def check_against(self, vocab_size: int, max_model_len: int, num_prompt_tokens: int) -> None:
        """Model-dependent checks; raised before admission so nothing else is disturbed."""
        for t in self.stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {t!r}")
        for t in (self.logit_bias or {}):
            if not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {t}")
        if num_prompt_tokens == 0:
            raise ValueError("prompt must not be empty")
        if num_prompt_tokens >= max_model_len:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; it must be shorter than "
                             f"max_model_len={max_model_len}")
        room = max_model_len - num_prompt_tokens
        if self.max_tokens is not None and self.max_tokens > room:
            raise ValueError(f"max_tokens must be in [1, {room}] for this prompt of {num_prompt_tokens} "
                             f"tokens (max_model_len={max_model_len}), got {self.max_tokens}")
