"""An LLM replica's way to the GrammarService: spec → compiled grammar → GrammarHandle.

    client = GrammarClient(handle, engine.tokenizer, vocab_size=engine.model_config.vocab_size)
    params.grammar = await client.build(structured)     # GrammarError → 400, GrammarServiceUnavailable → 503

Ready handles are kept in a small LRU, so a repeated schema costs no call. The first call for a
tokenizer the service does not know registers it (about 1 MB of vocabulary per 32k tokens).
The service down or slow: GrammarServiceUnavailable after `timeout_s`; unconstrained requests
never touch this.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from services.grammar.api import spec_from_structured
from services.grammar.errors import GrammarError
from services.grammar.matcher import GrammarHandle
from services.grammar.tokenizer import fingerprint, tokenizer_info_from_hf


class GrammarServiceUnavailable(RuntimeError):
    """The grammar service did not answer in time or failed; a retry may succeed (503)."""


class GrammarClient:
    def __init__(self, handle: Any, tokenizer: Any, *, vocab_size: int | None = None,
                 stop_token_ids: list[int] | None = None, timeout_s: float = 5.0, max_handles: int = 128) -> None:
        self._handle = handle
        self.tokenizer_info = tokenizer_info_from_hf(tokenizer, vocab_size, stop_token_ids)
        self.fingerprint = fingerprint(self.tokenizer_info)
        self.timeout_s = timeout_s
        self._handles: OrderedDict[str, GrammarHandle] = OrderedDict()
        self._max_handles = max_handles

    async def build(self, structured: Any) -> GrammarHandle:
        spec = spec_from_structured(structured)
        key = spec.spec_hash
        if key in self._handles:
            self._handles.move_to_end(key)
            return self._handles[key]
        result = await self._call("compile_result", spec.to_dict(), self.fingerprint)
        for _ in range(3):   # each replica of the service learns the tokenizer once
            if result["ok"] or result["error"].get("type") != "UnknownTokenizerError":
                break
            await self._call("register_tokenizer", self.tokenizer_info.serialize_json())
            result = await self._call("compile_result", spec.to_dict(), self.fingerprint)
        if not result["ok"]:
            if result["error"].get("type") in ("UnknownTokenizerError", "GrammarBusyError"):
                raise GrammarServiceUnavailable(result["error"]["message"])
            raise GrammarError.from_dict(result["error"])
        handle = await asyncio.to_thread(GrammarHandle.from_serialized, result["serialized"],
                                         self.tokenizer_info, spec_hash=key)
        self._handles[key] = handle
        while len(self._handles) > self._max_handles:
            self._handles.popitem(last=False)
        return handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._handle, method).remote(*args), self.timeout_s)
        except asyncio.TimeoutError:
            raise GrammarServiceUnavailable(f"the grammar service did not answer within {self.timeout_s:g} s; "
                                            "retry") from None
        except GrammarError:
            raise
        except Exception as e:   # Ray errors: replica dead, deployment missing, actor died
            raise GrammarServiceUnavailable(f"the grammar service is unavailable ({type(e).__name__}); "
                                            "retry") from e
