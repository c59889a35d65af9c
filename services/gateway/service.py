"""The gateway's request logic, independent of REST or gRPC: model check, chat template,
tokenization, context-length checks, the tenant's quota, then a streaming call to an LLM replica.

`LLMClient` is the seam to the replicas: `RayLLMClient` wraps a Serve DeploymentHandle (streaming),
`LocalLLMClient` calls an in-process LLMServer (INFER_GATEWAY_MODE=colocated, unit tests,
benchmarks). Both carry the same
`ReplicaRequest`, so the trace context and deadline travel the same way.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.config import StackConfig
from services.gateway.auth import Authenticator, Tenant
from services.gateway.errors import APIError, invalid
from services.gateway.protocol import ParsedRequest
from services.prefix_cache.hashing import block_hashes
from services.serving.wire import ReplicaChunk, ReplicaRequest
from services.telemetry import metrics


class LLMClient(Protocol):
    def generate(self, req: ReplicaRequest) -> AsyncIterator[ReplicaChunk]: ...
    async def call(self, method: str) -> Any: ...


class RayLLMClient:
    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)

    async def generate(self, req: ReplicaRequest) -> AsyncIterator[ReplicaChunk]:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
        gen = self._stream.generate.remote(req)
        finished = False
        try:
            async for chunk in gen:
                yield chunk
            finished = True
        except BackPressureError as e:
            raise APIError(429, f"All LLM replicas are at their queue limit; retry later. ({e.message})",
                           code="queue_full", retry_after=1.0) from None
        except DeploymentUnavailableError as e:
            raise APIError(503, f"No LLM replica can serve right now: {e.message}") from None
        finally:
            if not finished:   # we were cancelled or closed early: abort the replica's request
                gen.cancel()   # (on a finished stream it would still cost a ray.cancel per request)

    async def call(self, method: str) -> Any:
        return await getattr(self._handle, method).remote()


class LocalLLMClient:
    def __init__(self, server: Any) -> None:
        self.server = server

    def generate(self, req: ReplicaRequest) -> AsyncIterator[ReplicaChunk]:
        return self.server.generate(req)   # the caller closes it

    async def call(self, method: str) -> Any:
        return getattr(self.server, method)()


@dataclass(slots=True)
class Prepared:
    parsed: ParsedRequest
    tenant: Tenant
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    created: int
    started: float = 0.0    # perf_counter() on arrival: latencies are measured from here


def model_limits(model_dir: str, max_model_len: int | None) -> tuple[int, int]:
    """(vocab_size, max_model_len) from the model's config.json, as the engine computes them."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    return vocab, int(max_model_len or cfg.get("max_position_embeddings") or 2048)


def fast_encoder(tokenizer: Any) -> Callable[..., list[int]]:
    """`encode(text, add_special_tokens=True) -> ids`. For a Hugging Face fast tokenizer, its Rust
    tokenizer called directly (a copy, with no truncation or padding, as the wrapper calls it): the
    same ids, and about a third of the time for a short prompt, whose cost is mostly the wrapper's
    Python. Other tokenizers through their own `encode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text, add_special_tokens=True: list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    from tokenizers import Tokenizer
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return lambda text, add_special_tokens=True: own.encode(text, add_special_tokens=add_special_tokens).ids


class GatewayService:
    def __init__(self, config: StackConfig, llm: LLMClient, tokenizer: Any, auth: Authenticator,
                 vocab_size: int, max_model_len: int) -> None:
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.encode = fast_encoder(tokenizer)
        self.auth = auth
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def list_models(self) -> list[dict[str, Any]]:
        return [{"id": self.config.model_name, "object": "model", "created": self.created,
                 "owned_by": "inference-stack", "max_model_len": self.max_model_len}]

    def prepare(self, parsed: ParsedRequest, tenant: Tenant) -> Prepared:
        """Everything that can refuse a request before it costs a replica anything."""
        started = time.perf_counter()
        if parsed.model != self.config.model_name:
            raise APIError(404, f"The model '{parsed.model}' does not exist; this server serves "
                                f"'{self.config.model_name}'.", param="model", code="model_not_found")
        text = parsed.prompt
        if parsed.kind == "chat":
            try:
                text = self.tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True,
                                                          tokenize=False)
            except Exception as e:   # template errors (e.g. roles out of order) are the caller's to fix
                raise invalid(f"The chat template rejected the messages: {e}", "messages") from None
            ids = self.encode(text, add_special_tokens=False)
        elif parsed.prompt_token_ids is not None:
            ids = parsed.prompt_token_ids
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise invalid(f"'prompt_token_ids' must be token ids in [0, {self.vocab_size}), got {bad}",
                              "prompt_token_ids")
        else:
            ids = self.encode(text)
        self._check_lengths(parsed, ids)
        max_new = parsed.sampling.get("max_tokens") or (self.max_model_len - len(ids))
        self.auth.charge(tenant, len(ids) + max_new * parsed.n)
        return Prepared(parsed, tenant, f"{'chatcmpl' if parsed.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                        ids, text, int(time.time()), started)

    def _check_lengths(self, parsed: ParsedRequest, ids: list[int]) -> None:
        from services.engine.sampling_params import SamplingParams
        try:
            SamplingParams(**parsed.sampling).check_against(self.vocab_size, self.max_model_len, len(ids))
        except ValueError as e:
            msg = str(e)
            param = "max_tokens" if "max_tokens" in msg else "prompt" if "prompt" in msg else msg.split(" ", 1)[0]
            raise invalid(msg, param) from None
        except TypeError as e:
            raise invalid(str(e)) from None

    def _hashes(self, prep: Prepared) -> list[bytes] | None:
        if not self.config.redis_url:   # no prefix index, so no prefix-aware routing
            return None
        return block_hashes(prep.prompt_token_ids, self.config.engine.block_size, salt=prep.tenant.name)

    async def stream(self, prep: Prepared, trace_carrier: dict[str, str],
                     deadline: float | None = None) -> AsyncIterator[ReplicaChunk]:
        """Replica chunks; raises APIError for a refusal. Records the client-side latency metrics."""
        p = prep.parsed
        req = ReplicaRequest(prep.request_id, prep.prompt_token_ids, p.sampling, prompt=prep.prompt_text,
                             priority=p.priority, cache_salt=prep.tenant.name, structured=p.structured,
                             speculative=p.speculative, deadline=deadline, trace_carrier=trace_carrier,
                             prefix_block_hashes=self._hashes(prep))
        model = self.config.model_name
        t0 = prep.started or time.perf_counter()
        last_t: float | None = None
        num_generated = 0
        async with aclosing(self.llm.generate(req)) as chunks:
            async for chunk in chunks:
                if chunk.error is not None:
                    raise APIError.from_wire(chunk.error)
                new = sum(len(c.token_ids) for c in chunk.choices)
                now = time.perf_counter()
                if new:
                    if last_t is None:
                        metrics.TTFT.labels(model).observe(now - t0)
                    else:
                        metrics.ITL.labels(model).observe((now - last_t) / new)
                    last_t = now
                    num_generated += new
                if chunk.finished:
                    metrics.E2E.labels(model).observe(now - t0)
                    metrics.TENANT_TOKENS.labels(prep.tenant.name, "prompt").inc(chunk.num_prompt_tokens)
                    metrics.TENANT_TOKENS.labels(prep.tenant.name, "generation").inc(num_generated)
                yield chunk
