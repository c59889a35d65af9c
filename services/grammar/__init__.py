"""Structured output: grammar specs, compilation (xgrammar), caching, and in-engine matching.

Modules: spec (GrammarSpec, limits), api (request fields → spec), tools (OpenAI tool calling),
compiler / worker / cache (compile with a deadline, memory + Redis cache), service (the Ray Serve
GrammarService), client (a replica's way to it), matcher (the engine's side), validate, library.
This package imports nothing heavy at import time: the engine imports only `matcher`.
"""
from __future__ import annotations

from typing import Any


def build_grammar(structured: Any, tokenizer: Any, *, vocab_size: int | None = None,
                  stop_token_ids: list[int] | None = None) -> Any:
    """Compile a request's structured-output spec in this process (worker with a deadline, cached)
    and return a GrammarHandle for SamplingParams.grammar. Raises GrammarError (ValueError → 400)."""
    from services.grammar.local import local_compiler  # noqa: PLC0415
    return local_compiler(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids).build(structured)
