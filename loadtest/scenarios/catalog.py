"""The load-test scenarios, one builder each, and `ScenarioSource`: a user's seeded stream of them.

| scenario        | API        | what it exercises                                               |
| --------------- | ---------- | --------------------------------------------------------------- |
| short_chat      | chat       | short interactive turns: scheduling and TTFT under concurrency   |
| shared_prefix   | chat       | one long system prompt shared by every user: the prefix cache    |
| multi_turn      | chat       | conversations that grow turn by turn (earlier turns are cached)  |
| json_extraction | chat       | `response_format` json_schema: grammar-constrained decoding      |
| copy_heavy      | completion | copy the given code (greedy, n-gram speculation switched on)     |
| long_context    | completion | a prompt filling ~3/4 of the context, a short answer: prefill    |
| mixed           | both       | a weighted mix of all the above with priorities per class         |

Prompt sizes follow the served model's context length (`Budget`), so the same scenarios fit a
tiny CPU model and an 8B model on a GPU.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable

from loadtest.scenarios import corpus
from loadtest.scenarios.request import Budget, Conversation, ScenarioRequest

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                   "city": {"type": "string", "maxLength": 30},
                   "occupation": {"type": "string", "maxLength": 30}},
    "required": ["name", "age", "city", "occupation"],
    "additionalProperties": False,
}
MAX_TURNS = 8
# Share of the context a scenario's prompt may take (the rest is for the reply and the template).
SHARED_PREFIX_SHARE = 0.35
CONVERSATION_SHARE = 0.6
LONG_CONTEXT_SHARE = 0.75
# Mixed traffic: (weight, priority). Interactive classes outrank extraction, which outranks batch.
MIX: dict[str, tuple[int, int]] = {
    "short_chat": (4, 10), "shared_prefix": (2, 10), "multi_turn": (2, 10),
    "json_extraction": (1, 5), "copy_heavy": (1, 0), "long_context": (1, 0),
}


class ScenarioSource:
    """Builds one user's requests. `max_tokens_cap` bounds every reply (short CI runs);
    `ignore_eos` makes reply lengths fixed (a tiny model may stop after one token)."""

    def __init__(self, budget: Budget, seed: int, max_tokens_cap: int | None = None,
                 ignore_eos: bool = False) -> None:
        self.budget = budget
        self.rng = random.Random(seed)
        self.max_tokens_cap = max_tokens_cap
        self.ignore_eos = ignore_eos
        self.conversation = Conversation()
        self._system_prompt: str | None = None

    def build(self, scenario: str) -> ScenarioRequest:
        if scenario == "mixed":
            names = list(MIX)
            name = self.rng.choices(names, weights=[MIX[n][0] for n in names])[0]
            req = BUILDERS[name](self)
            req.priority = MIX[name][1]
            return req
        builder = BUILDERS.get(scenario)
        if builder is None:
            raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
        return builder(self)

    # ---- helpers ------------------------------------------------------------------------------
    def _cap(self, n: int) -> int:
        return max(1, min(n, self.max_tokens_cap)) if self.max_tokens_cap else max(1, n)

    def _request(self, scenario: str, kind: str, max_tokens: int, **kw) -> ScenarioRequest:
        eos = self.ignore_eos and not kw.get("expect_json", False)   # a JSON reply must end itself
        return ScenarioRequest(scenario, kind, self._cap(max_tokens), ignore_eos=eos, **kw)

    def shared_system_prompt(self) -> str:
        # Sized once from the context length with the initial (fixed) chars/token, so every user
        # sends the very same bytes however its own estimate moves.
        if self._system_prompt is None:
            tokens = int(self.budget.max_model_len * SHARED_PREFIX_SHARE)
            self._system_prompt = corpus.system_prompt(min(int(tokens * Budget(1).chars_per_token), 8000))
        return self._system_prompt


def short_chat(src: ScenarioSource) -> ScenarioRequest:
    return src._request("short_chat", "chat", 32, temperature=0.8,
                        messages=[{"role": "user", "content": corpus.question(src.rng)}])


def shared_prefix(src: ScenarioSource) -> ScenarioRequest:
    return src._request("shared_prefix", "chat", 32, temperature=0.8,
                        messages=[{"role": "system", "content": src.shared_system_prompt()},
                                  {"role": "user", "content": corpus.question(src.rng)}])


def multi_turn(src: ScenarioSource) -> ScenarioRequest:
    conv, budget = src.conversation, src.budget
    max_tokens = src._cap(48)
    limit = int(budget.max_model_len * CONVERSATION_SHARE) - max_tokens
    if conv.num_turns >= MAX_TURNS or budget.tokens_in(conv.num_chars + 200) > limit:
        conv.reset()
    conv.add_user(corpus.question(src.rng) if conv.num_turns == 0 else corpus.follow_up(src.rng))
    # The request carries a copy: the reply is appended to the conversation, not to what was sent.
    return src._request("multi_turn", "chat", max_tokens, temperature=0.8,
                        messages=[dict(m) for m in conv.messages], conversation=conv)


def json_extraction(src: ScenarioSource) -> ScenarioRequest:
    text = corpus.person_prose(corpus.person(src.rng), src.rng)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    return src._request("json_extraction", "chat", 96, temperature=0.0, response_format=fmt, expect_json=True,
                        messages=[{"role": "system", "content": "Extract the person's details as JSON "
                                   "with the keys name, age, city and occupation."},
                                  {"role": "user", "content": text}])


def copy_heavy(src: ScenarioSource) -> ScenarioRequest:
    budget = src.budget
    max_tokens = src._cap(128)
    source_tokens = min(int(budget.max_model_len * 0.4), max_tokens)
    code = corpus.code_block(src.rng, budget.chars_for(source_tokens))
    prompt = f"Copy the code below exactly.\n\n{code}\n\nCopy:\n"
    return src._request("copy_heavy", "completion", max_tokens, prompt=prompt, temperature=0.0,
                        speculative={"enabled": True, "method": "ngram"})


def long_context(src: ScenarioSource) -> ScenarioRequest:
    budget = src.budget
    max_tokens = src._cap(16)
    question = "\n\nQuestion: Which city is named first in the text above?\nAnswer:"
    tokens = int(budget.max_model_len * LONG_CONTEXT_SHARE) - max_tokens - budget.tokens_in(len(question))
    text = corpus.passage(src.rng, budget.chars_for(max(16, tokens)))
    return src._request("long_context", "completion", max_tokens, prompt=text + question, temperature=0.8)


BUILDERS: dict[str, Callable[[ScenarioSource], ScenarioRequest]] = {
    "short_chat": short_chat, "shared_prefix": shared_prefix, "multi_turn": multi_turn,
    "json_extraction": json_extraction, "copy_heavy": copy_heavy, "long_context": long_context,
}
SCENARIOS: tuple[str, ...] = (*BUILDERS, "mixed")


def check_json_reply(text: str) -> str | None:
    """None when `text` is a JSON object with the schema's required keys, else what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return f"the reply is not valid JSON ({e.msg} at char {e.pos}): {text[:80]!r}"
    if not isinstance(value, dict):
        return f"the reply is JSON but not an object: {text[:80]!r}"
    missing = [k for k in PERSON_SCHEMA["required"] if k not in value]
    return f"the reply lacks the required keys {missing}" if missing else None
