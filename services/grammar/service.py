"""GrammarService: the shared grammar compiler, a CPU-only Ray Serve deployment.

    compile(spec, tokenizer_fingerprint) -> str      xgrammar's serialize_json() of the compiled grammar
    compile_result(spec, fingerprint) -> dict        the same as plain data, errors included (for handles)
    register_tokenizer(tokenizer_info_json) -> str   a replica's tokenizer, once; returns its fingerprint
    validate(spec, text) -> dict                     where a finished text fails: {ok, offset, line, column, message}

Compilations are cached in memory and in Redis (`redis_url`), keyed by spec hash and tokenizer
fingerprint, so every replica of this service, and a restarted one, reuse them. Each tokenizer
gets its own compile worker processes (see worker.py: a compile past the deadline is killed).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import xgrammar as xgr

from services.grammar.cache import GrammarCache
from services.grammar.compiler import GrammarCompiler
from services.grammar.errors import GrammarBusyError, GrammarError
from services.grammar.spec import GrammarLimits, GrammarSpec
from services.grammar.tokenizer import fingerprint, tokenizer_info_from_model_dir
from services.grammar.validate import validate_text
from services.telemetry import metrics

log = logging.getLogger(__name__)


class UnknownTokenizerError(LookupError):
    """The fingerprint was never registered with this replica: register_tokenizer, then retry."""


class GrammarService:
    def __init__(self, model_dirs: list[str] | None = None, redis_url: str | None = None,
                 limits: dict | GrammarLimits | None = None, num_workers: int = 1,
                 cache_entries: int = 512, compile_threads: int = 1, warm_up: bool = True) -> None:
        self.limits = limits if isinstance(limits, GrammarLimits) else GrammarLimits(**(limits or {}))
        self.cache = GrammarCache(redis_url or None, max_entries=cache_entries)
        self.num_workers = num_workers
        self.compile_threads = compile_threads
        self.warm_up = warm_up
        self._compilers: dict[str, GrammarCompiler] = {}
        self._lock = threading.Lock()
        for d in model_dirs or []:
            self._add(tokenizer_info_from_model_dir(d))

    def _add(self, info: xgr.TokenizerInfo) -> str:
        fp = fingerprint(info)
        with self._lock:
            if fp not in self._compilers:
                self._compilers[fp] = GrammarCompiler(info, limits=self.limits, cache=self.cache,
                                                      num_workers=self.num_workers, warm_up=self.warm_up,
                                                      compile_threads=self.compile_threads)
                log.info("grammar service: tokenizer %s registered (vocab %d)", fp, info.vocab_size)
        return fp

    def register_tokenizer(self, tokenizer_info_json: str) -> str:
        return self._add(xgr.TokenizerInfo.deserialize_json(tokenizer_info_json))

    def tokenizer_fingerprints(self) -> list[str]:
        return sorted(self._compilers)

    def _compiler(self, tokenizer_fingerprint: str) -> GrammarCompiler:
        c = self._compilers.get(tokenizer_fingerprint)
        if c is None:
            raise UnknownTokenizerError(f"tokenizer {tokenizer_fingerprint} is not registered with the "
                                        "grammar service; call register_tokenizer first")
        return c

    async def compile(self, spec: dict | GrammarSpec, tokenizer_fingerprint: str) -> str:
        compiler = self._compiler(tokenizer_fingerprint)
        spec = GrammarSpec.from_dict(spec)
        result = await asyncio.to_thread(compiler.compile, spec)
        return result.serialized

    async def compile_result(self, spec: dict, tokenizer_fingerprint: str) -> dict[str, Any]:
        """compile() as plain data: {"ok": True, serialized, source, compile_s} or
        {"ok": False, "error": GrammarError.to_dict() | {"type": "UnknownTokenizerError" | "GrammarBusyError", ...}}."""
        try:
            compiler = self._compiler(tokenizer_fingerprint)
            result = await asyncio.to_thread(compiler.compile, GrammarSpec.from_dict(spec))
        except GrammarError as e:
            return {"ok": False, "error": e.to_dict()}
        except (UnknownTokenizerError, GrammarBusyError) as e:
            return {"ok": False, "error": {"type": type(e).__name__, "message": str(e)}}
        return {"ok": True, "serialized": result.serialized, "source": result.source,
                "compile_s": result.compile_s}

    async def validate(self, spec: dict | GrammarSpec, text: str) -> dict[str, Any]:
        try:
            spec = GrammarSpec.from_dict(spec)
            return (await asyncio.to_thread(validate_text, spec, text, self.limits)).to_dict()
        except GrammarError as e:
            return {"ok": False, "offset": None, "line": e.line, "column": e.column,
                    "message": f"the spec itself is invalid: {e}"}

    def stats(self) -> dict[str, Any]:
        return {"tokenizers": self.tokenizer_fingerprints(), **self.cache.stats()}

    def metrics_text(self) -> bytes:
        return metrics.grammar_text()

    def check_health(self) -> None:
        """Ray Serve's health check hook: the cache object and the compilers must be usable."""
        if any(c.pool.closed for c in self._compilers.values()):
            raise RuntimeError("a grammar compiler is closed")

    def shutdown(self) -> None:
        for c in self._compilers.values():
            c.close()
        self.cache.close()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:   # interpreter teardown: nothing left to release
            pass


def grammar_deployment(num_replicas: int = 1, **options: Any):
    """The Serve deployment of GrammarService (CPU only); `.bind(model_dirs=..., redis_url=...)`."""
    from ray import serve  # noqa: PLC0415
    opts = {"name": "GrammarService", "num_replicas": num_replicas,
            "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 64}
    opts.update(options)
    return serve.deployment(**opts)(GrammarService)
