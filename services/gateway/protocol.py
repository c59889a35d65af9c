"""OpenAI request bodies (REST JSON, or gRPC messages turned into the same dicts) → `ParsedRequest`.

Every check names the offending field in `param`; unknown fields are refused (a typo must not be
silently ignored). Range checks that SamplingParams owns are left to it (one definition).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from services.gateway.errors import invalid

_SAMPLING_FIELDS = {  # body field -> (SamplingParams field, accepted JSON types)
    "temperature": ("temperature", (int, float)), "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)), "min_p": ("min_p", (int, float)),
    "frequency_penalty": ("frequency_penalty", (int, float)),
    "presence_penalty": ("presence_penalty", (int, float)),
    "repetition_penalty": ("repetition_penalty", (int, float)), "seed": ("seed", (int,)),
    "min_tokens": ("min_tokens", (int,)), "ignore_eos": ("ignore_eos", (bool,)),
    "include_stop_str_in_output": ("include_stop_str_in_output", (bool,)),
    "skip_special_tokens": ("skip_special_tokens", (bool,)), "n": ("n", (int,)),
}
_COMMON = set(_SAMPLING_FIELDS) | {"model", "max_tokens", "stop", "stop_token_ids", "logit_bias", "user",
                                   "stream", "stream_options", "response_format", "grammar", "regex",
                                   "choice", "priority", "speculative"}
COMPLETION_FIELDS = _COMMON | {"prompt", "prompt_token_ids", "logprobs", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_PRIORITY = 1000


@dataclass(slots=True)
class ParsedRequest:
    kind: str                                   # "completion" | "chat"
    model: str
    sampling: dict[str, Any]                    # SamplingParams keyword arguments
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    priority: int = 0
    structured: dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


def _typed(body: dict, name: str, types: tuple, what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    # bool is an int in Python; a JSON true is not a valid integer here.
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
        raise invalid(f"'{name}' must be {what}, got {json.dumps(v)[:80]}", name)
    return v


def _check_fields(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"Unknown field '{unknown[0]}'; supported fields: {', '.join(sorted(allowed))}.", unknown[0])


def _common(body: dict, kind: str) -> ParsedRequest:
    model = _typed(body, "model", (str,), "a string")
    if not model:
        raise invalid("'model' is required: the served model's name (see GET /v1/models).", "model")
    sampling: dict[str, Any] = {}
    for name in _SAMPLING_FIELDS.keys() & body.keys():
        target, types = _SAMPLING_FIELDS[name]
        what = "a boolean" if types == (bool,) else "an integer" if types == (int,) else "a number"
        v = _typed(body, name, types, what)
        if v is not None:
            sampling[target] = float(v) if float in types else v
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid("'stop' must be a string or a list of strings.", "stop")
        sampling["stop"] = stop
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise invalid("'stop_token_ids' must be a list of token ids.", "stop_token_ids")
        sampling["stop_token_ids"] = ids
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise invalid("'logit_bias' must map token ids to numbers in [-100, 100].", "logit_bias")
        try:
            sampling["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise invalid("'logit_bias' keys must be token ids and values numbers.", "logit_bias") from None
    stream = _typed(body, "stream", (bool,), "a boolean") or False
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise invalid("'stream_options' must be an object like {\"include_usage\": true}.", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
        if not stream and opts:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    priority = _typed(body, "priority", (int,), "an integer") or 0
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise invalid(f"'priority' must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority}", "priority")
    user = _typed(body, "user", (str,), "a string")
    return ParsedRequest(kind, model, sampling, stream=stream, include_usage=include_usage, priority=priority,
                         structured=_structured(body), speculative=_speculative(body), user=user)


def _structured(body: dict) -> dict[str, Any] | None:
    given = [k for k in ("response_format", "grammar", "regex", "choice") if body.get(k) not in (None, [], "")]
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\".",
                          "response_format")
        if rf["type"] == "text":
            given.remove("response_format")
    if len(given) > 1:
        raise invalid(f"Give at most one of response_format, grammar, regex, choice; got {', '.join(given)}.",
                      given[1])
    if not given:
        return None
    kind = given[0]
    if kind == "response_format":
        if rf["type"] == "json_object":
            return {"kind": "json_object", "spec": None}
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if isinstance(schema, str):   # the gRPC surface carries the schema as JSON text
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise invalid(f"'response_format.json_schema.schema' is not valid JSON: {e}",
                              "response_format") from None
        if not isinstance(schema, dict):
            raise invalid("'response_format.json_schema.schema' must be a JSON Schema object.", "response_format")
        return {"kind": "json_schema", "spec": schema}
    if kind == "choice":
        choice = body["choice"]
        if not isinstance(choice, list) or not all(isinstance(c, str) and c for c in choice):
            raise invalid("'choice' must be a list of non-empty strings.", "choice")
        return {"kind": "choice", "spec": choice}
    value = body[kind]
    if not isinstance(value, str):
        raise invalid(f"'{kind}' must be a string.", kind)
    return {"kind": kind, "spec": value}


def _speculative(body: dict) -> dict[str, Any] | None:
    spec = body.get("speculative")
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - {"enabled", "method", "num_speculative_tokens"}:
        raise invalid("'speculative' must be an object with enabled, method, num_speculative_tokens.",
                      "speculative")
    if spec.get("method") not in (None, "", "ngram", "draft"):
        raise invalid("'speculative.method' must be \"ngram\" or \"draft\".", "speculative")
    k = spec.get("num_speculative_tokens")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16):
        raise invalid("'speculative.num_speculative_tokens' must be an integer in [1, 16].", "speculative")
    return dict(spec)


def parse_completion(body: Any) -> ParsedRequest:
    _check_fields(body, COMPLETION_FIELDS)
    req = _common(body, "completion")
    prompt, ids = body.get("prompt"), body.get("prompt_token_ids")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]       # OpenAI clients may wrap a single prompt in a list
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt, ids = None, prompt
        else:
            raise invalid("'prompt' must be one string or one list of token ids (one prompt per request).",
                          "prompt")
    if (prompt is None) == (ids is None):
        raise invalid("Give exactly one of 'prompt' (a string) or 'prompt_token_ids'.", "prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("'prompt' must be a string.", "prompt")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in ids)):
        raise invalid("'prompt_token_ids' must be a list of integers.", "prompt_token_ids")
    req.prompt, req.prompt_token_ids = prompt, ids
    max_tokens = _typed(body, "max_tokens", (int,), "an integer")
    req.sampling["max_tokens"] = 16 if "max_tokens" not in body else max_tokens   # OpenAI's default
    lp = _typed(body, "logprobs", (int,), "an integer")
    if lp is not None:
        req.sampling["logprobs"] = lp
    req.echo = bool(_typed(body, "echo", (bool,), "a boolean"))
    return req


def parse_chat(body: Any) -> ParsedRequest:
    _check_fields(body, CHAT_FIELDS)
    req = _common(body, "chat")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("'messages' must be a non-empty list of {role, content} objects.", "messages")
    req.messages = [_message(m, i) for i, m in enumerate(msgs)]
    mt = _typed(body, "max_completion_tokens", (int,), "an integer")
    if mt is None:
        mt = _typed(body, "max_tokens", (int,), "an integer")
    req.sampling["max_tokens"] = mt       # None = up to the context length
    if _typed(body, "logprobs", (bool,), "a boolean"):
        req.sampling["logprobs"] = _typed(body, "top_logprobs", (int,), "an integer") or 0
    elif body.get("top_logprobs") is not None:
        raise invalid("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    return req


def _message(m: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
        raise invalid(f"{param} must be an object with a role in {', '.join(_ROLES)}.", param)
    content = m.get("content")
    if isinstance(content, list):   # content parts: only text parts are meaningful to a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{param}.content parts must be {{\"type\": \"text\", \"text\": ...}}; "
                              "this model reads text only.", f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise invalid(f"{param}.content must be a string or a list of text parts.", f"{param}.content")
    out = {"role": m["role"], "content": content}
    if isinstance(m.get("name"), str) and m["name"]:
        out["name"] = m["name"]
    return out
