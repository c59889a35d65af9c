"""Proposers for speculative decoding, behind the engine's `Proposer` seam (services/engine/spec_decode.py):

  ngram   NgramProposer        prompt lookup, no model
  draft   DraftModelProposer   a draft model in the replica's process, on our engine's runner
  remote  RemoteDraftProposer  the DraftServer Ray Serve deployment (services/draft/server.py)

`build_proposer(method, ...)` makes one; hand it to the engine as LLMEngine(config, {method: proposer}).
"""
from __future__ import annotations

from typing import Any

from services.engine.spec_decode import Proposer


def build_proposer(method: str, draft_model: str | None = None, device: str = "auto",
                   draft_handle: Any = None, **kwargs: Any) -> Proposer:
    """kwargs go to the proposer: ngram (max_ngram, min_ngram), draft (DraftModel's: num_kv_blocks,
    kv_cache_memory_gb, top_probs, ...), remote (timeout_s, num_shards, cooldown_s)."""
    if method == "ngram":
        from services.draft.ngram import NgramProposer  # noqa: PLC0415
        return NgramProposer(**kwargs)
    if method == "draft":
        if not draft_model:
            raise ValueError("speculative method 'draft' needs a draft model directory (INFER_DRAFT_MODEL)")
        from services.draft.draft_model import DraftModel  # noqa: PLC0415
        from services.draft.local import DraftModelProposer  # noqa: PLC0415
        return DraftModelProposer(DraftModel(draft_model, device=device, **kwargs))
    if method == "remote":
        if draft_handle is None:
            raise ValueError("speculative method 'remote' needs a DraftServer handle (INFER_DRAFT_REPLICAS >= 1)")
        from services.draft.remote import RemoteDraftProposer  # noqa: PLC0415
        return RemoteDraftProposer(draft_handle, **kwargs)
    raise ValueError(f"speculative method must be 'ngram', 'draft' or 'remote', got {method!r}")
