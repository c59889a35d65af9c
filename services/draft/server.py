"""DraftServer: the draft model as its own Ray Serve deployment, shared by many LLM replicas.

Each replica runs a DraftModel (its own paged KV per sequence, on our engine's runner) and batches
the proposal calls that arrive within a couple of milliseconds into one set of forward passes
(`serve.batch`). Calls carry a shard key and StickyRouter keeps every shard on one replica, so a
sequence's KV stays where its next call lands. Callers: services/draft/remote.py.

    app = build_draft_app("models/tiny-draft", num_replicas=1)
    serve.run(app, name="draft")   # or bind DraftServer into the LLM application and pass the handle
"""
from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from services.draft.draft_model import DraftModel
from services.draft.protocol import DraftBatch, DraftReply

ROUTER = "services.draft.router.StickyRouter"


# A draft call lasts milliseconds and its caller gives up after its own deadline: no reason to
# hold a stopping replica for Serve's default 20 s of graceful shutdown.
@serve.deployment(name="DraftServer", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0},
                  request_router_config=RequestRouterConfig(request_router_class=ROUTER),
                  graceful_shutdown_timeout_s=2.0, graceful_shutdown_wait_loop_s=0.5)
class DraftServer:
    def __init__(self, model_dir: str, device: str = "auto", max_batch_size: int = 64,
                 batch_wait_timeout_s: float = 0.002, **draft_kwargs: Any):
        self.model = DraftModel(model_dir, device=device, **draft_kwargs)
        self.propose_batched.set_max_batch_size(max_batch_size)
        self.propose_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.num_calls = 0
        self.num_batches = 0

    async def propose(self, batch: DraftBatch, shard_key: int | None = None) -> list[DraftReply]:
        """shard_key is read by StickyRouter before the call arrives; the replica does not need it."""
        return await self.propose_batched(batch)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def propose_batched(self, batches: list[DraftBatch]) -> list[list[DraftReply]]:
        for b in batches:
            self.model.release(b.release_ids)
        flat = [c for b in batches for c in b.calls]
        # Forward passes off the event loop, so health checks and new calls are answered meanwhile;
        # serve.batch runs one batch at a time, so the model is never used by two threads.
        replies = await asyncio.to_thread(self.model.propose, flat)
        self.num_calls += len(batches)
        self.num_batches += 1
        out, i = [], 0
        for b in batches:
            out.append(replies[i:i + len(b.calls)])
            i += len(b.calls)
        return out

    def stats(self) -> dict[str, int]:
        return {"num_sequences": self.model.num_sequences, "num_evictions": self.model.num_evictions,
                "num_calls": self.num_calls, "num_batches": self.num_batches, "vocab_size": self.model.vocab_size}

    def check_health(self) -> None:
        pass   # a dead actor fails Ray's probe by itself; the model has no other failure state


def build_draft_app(model_dir: str, num_replicas: int = 1, device: str = "auto", num_cpus: float = 0,
                    num_gpus: float = 0, **kwargs: Any):
    if num_replicas < 1:
        raise ValueError(f"DraftServer num_replicas must be >= 1, got {num_replicas}")
    return DraftServer.options(num_replicas=num_replicas,
                               ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}).bind(
        model_dir, device=device, **kwargs)
