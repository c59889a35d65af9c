"""gRPC surface (inference.v1.Inference): protobuf ↔ the OpenAI-shaped dicts the gateway validates.

Requests become the same JSON dicts the REST routes see (field names match), so both surfaces share
one validation path. Errors set a status code; RESOURCE_EXHAUSTED also sets trailing metadata
`retry-after` (whole seconds).
"""
from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal.type_checkers import ToShortestFloat

from services.gateway.errors import APIError
from services.gateway.results import Accumulator
from services.gen.inference.v1 import inference_pb2 as pb
from services.serving.wire import ChoiceDelta, TokenLogprob


class StreamError(Exception):
    """Raised after `set_error` on a streaming call, so Serve's proxy sends the status we set."""


def _to_dict(msg: Any) -> dict:
    """The set fields of a request, as MessageToDict gives them with proto field names (map keys as
    strings, a float32 at its shortest decimal: 0.7 stays 0.7), except that 64-bit integers stay
    integers. The request messages have no enums or bytes. Every call pays this: it costs a fraction
    of MessageToDict's generic walk."""
    return {f.name: _field(f, v) for f, v in msg.ListFields()}


def _field(f: FieldDescriptor, v: Any) -> Any:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value = f.message_type.fields_by_name["value"]
        return {str(k): _scalar(value, x) for k, x in v.items()}
    return [_scalar(f, x) for x in v] if f.is_repeated else _scalar(f, v)


def _scalar(f: FieldDescriptor, v: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return _to_dict(v)
    return ToShortestFloat(v) if f.type == FieldDescriptor.TYPE_FLOAT else v


def request_dict(msg: Any) -> dict:
    d = _to_dict(msg)
    if "prompt_token_ids" in d:
        d["prompt_token_ids"] = d["prompt_token_ids"].get("ids", [])
    rf = d.get("response_format")
    if rf is not None and "json_schema" in rf:
        rf["json_schema"] = {"name": rf["json_schema"].get("name", ""),
                             "schema": rf["json_schema"].get("schema", "")}
    if "n" in d and d["n"] == 0:
        del d["n"]
    if "stream_options" in d:
        del d["stream_options"]   # gRPC streams always end with usage
    return d


def metadata_value(grpc_context: Any, key: str) -> str | None:
    for k, v in grpc_context.invocation_metadata():
        if k.lower() == key:
            return v if isinstance(v, str) else v.decode()
    return None


def set_error(grpc_context: Any, e: APIError) -> None:
    grpc_context.set_code(e.grpc_code)
    grpc_context.set_details(e.message if e.param is None else f"{e.message} (field: {e.param})")
    if e.retry_after_header:
        grpc_context.set_trailing_metadata([("retry-after", e.retry_after_header)])


def _logprobs(lps: list[TokenLogprob] | None) -> list:
    return [pb.TokenLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=a.token_id, token=a.token, logprob=a.logprob)
                                          for a in t.top]) for t in (lps or [])]


def _usage_timing(acc: Accumulator) -> dict:
    u = acc.usage
    return {"usage": pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                              total_tokens=u.total_tokens, cached_tokens=u.cached_tokens),
            "timing": pb.Timing(**acc.timing_dict())}


def _stop_reason(r: Any) -> str:
    return "" if r is None else str(r)


def completion_reply(request_id: str, model: str, created: int, acc: Accumulator, echo: str = "") -> Any:
    return pb.GenerateResponse(id=request_id, model=model, created=created, **_usage_timing(acc), choices=[
        pb.Choice(index=c.index, text=echo + c.text, token_ids=c.token_ids, finish_reason=c.finish_reason or "",
                  stop_reason=_stop_reason(c.stop_reason), logprobs=_logprobs(c.logprobs)) for c in acc.choices])


def chat_reply(request_id: str, model: str, created: int, acc: Accumulator) -> Any:
    return pb.ChatResponse(id=request_id, model=model, created=created, **_usage_timing(acc), choices=[
        pb.ChatChoice(index=c.index, message=pb.ChatMessage(role="assistant", content=c.text),
                      token_ids=c.token_ids, finish_reason=c.finish_reason or "",
                      stop_reason=_stop_reason(c.stop_reason), logprobs=_logprobs(c.logprobs))
        for c in acc.choices])


def completion_delta(request_id: str, model: str, created: int, deltas: list[ChoiceDelta],
                     acc: Accumulator | None = None) -> Any:
    extra = _usage_timing(acc) if acc is not None else {}
    return pb.GenerateResponse(id=request_id, model=model, created=created, **extra, choices=[
        pb.Choice(index=d.index, text=d.text, token_ids=d.token_ids, finish_reason=d.finish_reason or "",
                  stop_reason=_stop_reason(d.stop_reason), logprobs=_logprobs(d.logprobs)) for d in deltas])


def chat_delta(request_id: str, model: str, created: int, deltas: list[ChoiceDelta], first: bool,
               acc: Accumulator | None = None) -> Any:
    extra = _usage_timing(acc) if acc is not None else {}
    return pb.ChatResponse(id=request_id, model=model, created=created, **extra, choices=[
        pb.ChatChoice(index=d.index, message=pb.ChatMessage(role="assistant" if first else "", content=d.text),
                      token_ids=d.token_ids, finish_reason=d.finish_reason or "",
                      stop_reason=_stop_reason(d.stop_reason), logprobs=_logprobs(d.logprobs)) for d in deltas])


def status_name(grpc_context: Any) -> str:
    code = grpc_context.code()
    return (code or grpc.StatusCode.OK).name
