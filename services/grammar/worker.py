"""Compile worker processes: a compile that runs past its deadline is killed, not waited for.

xgrammar compiles in C++ and cannot be interrupted from Python, so a thread with a deadline would
leave a runaway compile burning a core; a process can be killed. Workers are forked from a
forkserver that has xgrammar preloaded (`import xgrammar` costs seconds; a fork costs
milliseconds) and build the tokenizer info once. A killed worker is replaced in the background.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing.connection import Connection

from services.grammar.errors import GrammarError, GrammarTimeoutError
from services.grammar.spec import GrammarLimits, GrammarSpec

log = logging.getLogger(__name__)
_CTX = None
_CTX_LOCK = threading.Lock()


def _context():
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["xgrammar", "services.grammar.compiler"])
            _CTX = ctx
        return _CTX


def _worker_main(conn: Connection, tokenizer_json: str, limits: GrammarLimits) -> None:
    import xgrammar as xgr  # noqa: PLC0415

    from services.grammar.compiler import compile_spec  # noqa: PLC0415
    info = xgr.TokenizerInfo.deserialize_json(tokenizer_json)
    # One thread: the worker count is the parallelism knob; our cache sits in front of it.
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            t0 = time.perf_counter()
            compiled = compile_spec(compiler, GrammarSpec.from_dict(msg), limits)
            conn.send(("ok", (compiled.serialize_json(), time.perf_counter() - t0)))
        except GrammarError as e:
            conn.send(("error", e.to_dict()))
        except Exception as e:   # an xgrammar failure we do not map: still a clear 400, never a crash
            conn.send(("error", GrammarError(f"cannot compile this grammar: {e}").to_dict()))


class _Worker:
    def __init__(self, tokenizer_json: str, limits: GrammarLimits) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, tokenizer_json, limits), daemon=True,
                                name="grammar-compile")
        self.proc.start()
        child.close()

    def wait_ready(self, timeout: float) -> bool:
        if not self.conn.poll(timeout):
            return False
        tag, _ = self.conn.recv()
        return tag == "ready"

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """`num_workers` processes; compile() borrows an idle one (waiting up to `startup_timeout_s`
    when all are busy or still starting) and gives it `timeout` seconds."""

    def __init__(self, tokenizer_json: str, limits: GrammarLimits, *, num_workers: int = 1,
                 startup_timeout_s: float = 60.0) -> None:
        self._tokenizer_json = tokenizer_json
        self._limits = limits
        self._startup_timeout_s = startup_timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        for _ in range(num_workers):
            self._spawn()

    def _spawn(self) -> None:
        def start() -> None:
            try:
                w = _Worker(self._tokenizer_json, self._limits)
            except Exception:
                log.exception("grammar compile worker failed to start")
                return
            if not w.wait_ready(self._startup_timeout_s):
                log.error("grammar compile worker did not become ready")
                w.kill()
                return
            with self._lock:
                if self._closed:
                    w.kill()
                    return
                self._all.add(w)
            self._idle.put(w)
        threading.Thread(target=start, daemon=True, name="grammar-worker-start").start()

    def compile(self, spec: GrammarSpec, timeout: float) -> tuple[str, float]:
        """(serialized compiled grammar, seconds the worker spent compiling)."""
        try:
            w = self._idle.get(timeout=self._startup_timeout_s)
        except queue.Empty:
            raise GrammarError("the grammar compiler is overloaded; retry") from None
        try:
            w.conn.send(spec.to_dict())
            ready = w.conn.poll(timeout)
            tag, value = w.conn.recv() if ready else (None, None)
        except (EOFError, OSError, BrokenPipeError):
            tag, value = "crashed", None
        if tag in ("ok", "error"):
            self._idle.put(w)
            if tag == "error":
                raise GrammarError.from_dict(value)
            return value
        self._retire(w)
        p = spec.param or spec.kind
        if tag is None:
            raise GrammarTimeoutError(f"{p}: compiling this {spec.kind} took longer than {timeout:g} s and "
                                      "was stopped; simplify it: bounded repetitions ({m,n}) and string "
                                      "maxLength/minLength cost the most with large vocabularies", param=p)
        raise GrammarError(f"{p}: the grammar compiler crashed on this {spec.kind}; simplify it", param=p)

    def _retire(self, w: _Worker) -> None:
        t0 = time.perf_counter()
        w.kill()
        with self._lock:
            self._all.discard(w)
            closed = self._closed
        log.warning("grammar compile worker killed after a timeout/crash (%.3f s); starting another",
                    time.perf_counter() - t0)
        if not closed:
            self._spawn()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.kill()
