"""OpenAI REST surface: body reading (size, JSON), replies in OpenAI's JSON, SSE streaming.

SSE follows OpenAI: `data: {chunk}\n\n` per chunk, an optional usage-only chunk (choices: [])
when `stream_options.include_usage`, then `data: [DONE]`. An error after the stream has started
is sent as one `data: {"error": ...}` event (the status line is already 200), then the stream ends.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.errors import APIError, invalid
from services.gateway.results import Accumulator
from services.gateway.service import GatewayService, Prepared
from services.serving.wire import ReplicaChunk, TokenLogprob

TIMEOUT_HEADER = "x-request-timeout-seconds"   # also honoured by Serve's HTTP proxy


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def read_json(request: Request, max_body_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise APIError(413, f"The request body is {declared} bytes; the limit is {max_body_bytes}.",
                       code="request_too_large")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > max_body_bytes:
            raise APIError(413, f"The request body exceeds the limit of {max_body_bytes} bytes.",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"The request body is not valid JSON: {e}") from None


def deadline_from(headers: Any) -> float | None:
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        t = float(raw)
    except ValueError:
        raise invalid(f"Header {TIMEOUT_HEADER} must be a number of seconds, got {raw!r}") from None
    return time.time() + t if t > 0 else None


def _completion_logprobs(lps: list[TokenLogprob] | None, offset: int) -> dict | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for t in lps:
        tokens.append(t.token)
        token_lps.append(t.logprob)
        tops.append({a.token: a.logprob for a in t.top})
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None
    def entry(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode())}
    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a.token, a.logprob) for a in t.top]}
                        for t in lps]}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


async def unary(service: GatewayService, prep: Prepared, carrier: dict, deadline: float | None) -> dict:
    p = prep.parsed
    acc = Accumulator(p.n, started=prep.started)
    async for chunk in service.stream(prep, carrier, deadline):
        acc.add(chunk)
    head = {"id": prep.request_id, "created": prep.created, "model": p.model,
            "usage": acc.usage.to_openai(), "timing": acc.timing_dict()}
    if p.kind == "chat":
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs), "finish_reason": _finish(c.finish_reason),
                    "stop_reason": c.stop_reason} for c in acc.choices]
        return {**head, "object": "chat.completion", "choices": choices}
    echo = prep.prompt_text or "" if p.echo else ""
    choices = [{"index": c.index, "text": echo + c.text, "logprobs": _completion_logprobs(c.logprobs, len(echo)),
                "finish_reason": _finish(c.finish_reason), "stop_reason": c.stop_reason} for c in acc.choices]
    return {**head, "object": "text_completion", "choices": choices}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def sse_events(service: GatewayService, prep: Prepared, carrier: dict,
                     deadline: float | None, first: ReplicaChunk | None,
                     rest: AsyncIterator[ReplicaChunk]) -> AsyncIterator[bytes]:
    p = prep.parsed
    chat = p.kind == "chat"
    head = {"id": prep.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": prep.created, "model": p.model}
    acc = Accumulator(p.n, started=prep.started)
    offsets = [0] * p.n
    if chat:   # OpenAI opens every choice with the role
        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None} for i in range(p.n)]})
    elif p.echo and prep.prompt_text:
        yield _sse({**head, "choices": [{"index": i, "text": prep.prompt_text, "logprobs": None,
                                         "finish_reason": None} for i in range(p.n)]})

    async def chunks() -> AsyncIterator[ReplicaChunk]:
        if first is not None:
            yield first
        async for c in rest:
            yield c

    try:
        async for chunk in chunks():
            acc.add(chunk)
            choices = []
            for d in chunk.choices:
                if not d.text and not d.token_ids and d.finish_reason is None:
                    continue
                if chat:
                    choices.append({"index": d.index, "delta": {"content": d.text} if d.text else {},
                                    "logprobs": _chat_logprobs(d.logprobs), "finish_reason": _finish(d.finish_reason)})
                else:
                    choices.append({"index": d.index, "text": d.text,
                                    "logprobs": _completion_logprobs(d.logprobs, offsets[d.index]),
                                    "finish_reason": _finish(d.finish_reason)})
                    offsets[d.index] += len(d.text)
            if choices:
                yield _sse({**head, "choices": choices, **({"usage": None} if p.include_usage else {})})
    except APIError as e:
        yield _sse(e.body())
        return
    finally:
        await rest.aclose()   # a client that went away aborts the replica's request now
    if p.include_usage:
        yield _sse({**head, "choices": [], "usage": acc.usage.to_openai(), "timing": acc.timing_dict()})
    yield b"data: [DONE]\n\n"


async def respond(service: GatewayService, prep: Prepared, carrier: dict, deadline: float | None):
    if not prep.parsed.stream:
        return JSONResponse(await unary(service, prep, carrier, deadline))
    # Pull the first chunk before answering 200, so refusals (queue full, invalid) keep their status.
    stream = service.stream(prep, carrier, deadline)
    first = await anext(stream, None)
    return StreamingResponse(sse_events(service, prep, carrier, deadline, first, stream),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": prep.request_id})
