"""Compiling in the process that runs the engine (no GrammarService): one compiler per tokenizer,
with its compile workers, the shared cache and a small LRU of ready GrammarHandles.

`configure(redis_url=..., limits=...)` once at startup shares compilations through Redis too.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from services.grammar.api import spec_from_structured
from services.grammar.cache import GrammarCache
from services.grammar.compiler import GrammarCompiler
from services.grammar.matcher import GrammarHandle
from services.grammar.spec import GrammarLimits
from services.grammar.tokenizer import tokenizer_info_from_hf

_LOCK = threading.Lock()
_COMPILERS: dict[tuple[int, int | None], "LocalCompiler"] = {}
_SETTINGS: dict[str, Any] = {"redis_url": None, "limits": None, "num_workers": 1, "warm_up": True,
                             "compile_threads": 1}


def configure(*, redis_url: str | None = None, limits: GrammarLimits | None = None, num_workers: int = 1,
              warm_up: bool = True, compile_threads: int = 1) -> None:
    """Settings for compilers created after this call (call before the first request). `warm_up`:
    workers compile the warm-up set while idle after start (about 25 s of one core at 128k tokens,
    beside the engine; off: first compiles of every feature are cold, seconds with bounded strings)."""
    _SETTINGS.update(redis_url=redis_url or None, limits=limits, num_workers=num_workers, warm_up=warm_up,
                     compile_threads=compile_threads)


class LocalCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int | None, stop_token_ids: list[int] | None) -> None:
        self.tokenizer_info = tokenizer_info_from_hf(tokenizer, vocab_size, stop_token_ids)
        self.compiler = GrammarCompiler(self.tokenizer_info, limits=_SETTINGS["limits"],
                                        cache=GrammarCache(_SETTINGS["redis_url"]),
                                        num_workers=_SETTINGS["num_workers"], warm_up=_SETTINGS["warm_up"],
                                        compile_threads=_SETTINGS["compile_threads"])
        self._handles: OrderedDict[str, GrammarHandle] = OrderedDict()
        self._lock = threading.Lock()

    def build(self, structured: Any) -> GrammarHandle:
        spec = spec_from_structured(structured)
        key = spec.spec_hash
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._handles.move_to_end(key)
                return handle
        result = self.compiler.compile(spec)
        handle = GrammarHandle.from_serialized(result.serialized, self.tokenizer_info, spec_hash=key)
        with self._lock:
            self._handles[key] = handle
            while len(self._handles) > 128:
                self._handles.popitem(last=False)
        return handle

    def close(self) -> None:
        self.compiler.close()


def local_compiler(tokenizer: Any, *, vocab_size: int | None = None,
                   stop_token_ids: list[int] | None = None) -> LocalCompiler:
    key = (id(tokenizer), vocab_size)
    with _LOCK:
        lc = _COMPILERS.get(key)
        if lc is None:
            lc = _COMPILERS[key] = LocalCompiler(tokenizer, vocab_size, stop_token_ids)
        return lc
