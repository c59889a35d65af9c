"""Compile worker processes: a compile that runs past its deadline is killed, not waited for.

xgrammar compiles in C++ and cannot be interrupted from Python, so a thread with a deadline would
leave a runaway compile burning a core; a process can be killed. Workers are forked from a
forkserver that has xgrammar preloaded (`import xgrammar` costs seconds; a fork costs
milliseconds) and build the tokenizer info and one long-lived xgrammar compiler once (its cache
of per-state token masks is what makes a warm compile cheap, compiler.py). While no request is
waiting, a new worker compiles the warm-up set (warmup.py) one small spec at a time; a request
waits for at most the spec in progress, and its deadline starts when its own compile starts.
A killed worker is replaced in the background (and warms up again).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing.connection import Connection

from services.grammar.errors import GrammarBusyError, GrammarError, GrammarTimeoutError
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


def _worker_main(conn: Connection, tokenizer_json: str, limits: GrammarLimits, warm_up: bool,
                 num_threads: int) -> None:
    import xgrammar as xgr  # noqa: PLC0415

    from services.grammar.compiler import compile_spec, xgr_compiler  # noqa: PLC0415
    from services.grammar.warmup import warmup_specs  # noqa: PLC0415
    info = xgr.TokenizerInfo.deserialize_json(tokenizer_json)
    # xgrammar splits a compile's token-mask work over `num_threads` (cold compiles scale with
    # cores; warm ones are copies): 1 where the workers share cores with an engine.
    compiler = xgr_compiler(info, max_threads=num_threads)
    conn.send(("ready", None))
    pending = warmup_specs() if warm_up else iter(())
    while True:
        while not conn.poll(0):
            spec = next(pending, None)
            if spec is None:
                break
            try:
                compile_spec(compiler, spec, limits)
            except Exception as e:   # a warm-up spec over this service's limits: skipped
                log.debug("grammar warm-up: %s skipped: %s", spec.describe(), e)
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        conn.send(("started", None))
        try:
            t0 = time.perf_counter()
            compiled = compile_spec(compiler, GrammarSpec.from_dict(msg), limits)
            conn.send(("ok", (compiled.serialize_json(), time.perf_counter() - t0)))
        except GrammarError as e:
            conn.send(("error", e.to_dict()))
        except Exception as e:   # an xgrammar failure we do not map: still a clear 400, never a crash
            conn.send(("error", GrammarError(f"cannot compile this grammar: {e}").to_dict()))


class _Worker:
    def __init__(self, tokenizer_json: str, limits: GrammarLimits, warm_up: bool, num_threads: int) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, tokenizer_json, limits, warm_up, num_threads),
                                daemon=True, name="grammar-compile")
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
    when all are busy or still starting) and gives it `timeout` seconds from the start of the
    compile. `warm_up`: workers compile the warm-up set while idle (off: every compile is cold);
    `num_threads`: xgrammar threads per worker."""

    def __init__(self, tokenizer_json: str, limits: GrammarLimits, *, num_workers: int = 1,
                 startup_timeout_s: float = 60.0, warm_up: bool = True, num_threads: int = 1) -> None:
        self._tokenizer_json = tokenizer_json
        self._limits = limits
        self._warm_up = warm_up
        self._num_threads = num_threads
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
                w = _Worker(self._tokenizer_json, self._limits, self._warm_up, self._num_threads)
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
        for _ in range(2):   # a worker lost before it took the spec (in warm-up): once more, on another
            try:
                w = self._idle.get(timeout=self._startup_timeout_s)
            except queue.Empty:
                raise GrammarBusyError("the grammar compiler is overloaded; retry") from None
            tag, value = self._run(w, spec, timeout)
            if tag in ("ok", "error"):
                self._idle.put(w)
                if tag == "error":
                    raise GrammarError.from_dict(value)
                return value
            self._retire(w)
            if tag != "not_started":
                break
        p = spec.param or spec.kind
        if tag == "timeout":
            raise GrammarTimeoutError(f"{p}: compiling this {spec.kind} took longer than {timeout:g} s and "
                                      "was stopped; simplify it: bounded repetitions ({m,n}) and string "
                                      "maxLength/minLength cost the most with large vocabularies", param=p)
        if tag == "not_started":
            raise GrammarBusyError("the grammar compiler is overloaded; retry")
        raise GrammarError(f"{p}: the grammar compiler crashed on this {spec.kind}; simplify it", param=p)

    def _run(self, w: _Worker, spec: GrammarSpec, timeout: float) -> tuple[str, object]:
        """("ok" | "error", value) or ("timeout" | "crashed" | "not_started", None)."""
        try:
            w.conn.send(spec.to_dict())
            # A warm-up spec in progress finishes first (each is small); the deadline starts after.
            if not w.conn.poll(self._startup_timeout_s) or w.conn.recv()[0] != "started":
                return "not_started", None
        except (EOFError, OSError):
            return "not_started", None
        try:
            if not w.conn.poll(timeout):
                return "timeout", None
            return w.conn.recv()
        except (EOFError, OSError):
            return "crashed", None

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
