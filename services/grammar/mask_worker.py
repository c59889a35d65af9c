"""Grammar masks filled in a process of their own, beside the engine thread.

With a small model at batch 32 a decode step takes as long on the host as on the GPU, so filling 32
rows' masks on the engine thread (0.5-1 ms) lengthens every step, and a thread cannot help: the fill
and the engine's Python work both want the GIL. The mask worker is a few processes that own mirrors of
the constrained sequences' matchers (each its share of the sequences). Each step the engine sends the
tokens the mirrors have not taken yet (`submit`: written to the shared file once, and every worker woken
with a single futex call; a step with the same rows as the last writes just the batch's newest tokens),
goes on with its own work (appending step n's tokens, stop checks, outputs) while the workers take them
and fill their rows of a bitmask in shared memory, then picks the rows up (`collect`) and launches
sampling. Each worker sets a flag in shared memory once its rows are filled (no reply message). On a
GPU the engine thread does not wait for the flags there: the stream waits for them on the GPU
(cuStreamWaitValue32) before it copies the bitmask, so sampling is launched at once, and the engine
looks at the flags only when it waits for the step's tokens anyway (`settle`).

The engine keeps its own matchers (stop checks, speculative decoding's rollbacks, and the fill when the
worker is not used), so a mirror only ever follows its request's output tokens: it can lag any number
of steps and catches up by taking them all at once. Every EXPIRE_STEPS submissions, the mirrors unused
for that long are dropped on both sides (the same rule, so no message is needed); a request that comes
back gets a new one. If a worker fails or exits, `collect` returns None, the engine fills in process
from then on, and nothing is lost: its own matchers never depended on the workers. A step whose
sampling already waits on the GPU for the flags gets its rows filled by the engine and the flags set
by it, so the GPU never waits for a worker that is gone.

The worker processes are mask_process.py; the shared file they map and its signals, mask_shm.py.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from services.grammar.mask_shm import (
    BY_SOCKET,
    EXPIRE_STEPS,
    MAX_PROCESSES,
    SYS_FUTEX,
    TOKENS_ONLY,
    done_bytes,
    expire,
    fence,
    file_words,
    futex_wake,
    next_step,
    open_shared,
)
from services.grammar.matcher import FilledMasks, fill_rows

log = logging.getLogger(__name__)

MAX_GRAMMARS = 256        # distinct compiled grammars known to the worker before it starts over
STALL_S = 30.0            # a worker this long without filling its rows is given up on
REPO_ROOT = Path(__file__).resolve().parents[2]


def _pin(bitmask: torch.Tensor, flags: torch.Tensor) -> bool:
    """Page-lock (and map) the shared file so the bitmask's copies to the GPU are asynchronous (no wait
    for the forward pass) and the GPU can read the flags."""
    if not torch.cuda.is_available():
        return False
    size = flags.data_ptr() + flags.numel() * flags.element_size() - bitmask.data_ptr()
    mapped = 2   # cudaHostRegisterMapped
    return torch.cuda.cudart().cudaHostRegister(bitmask.data_ptr(), size, mapped) == 0


class StreamGate:
    """Makes the current CUDA stream wait, on the GPU, until every worker's flag holds a submission:
    cuStreamWaitValue32 (equal) on each word of four flags in the page-locked file, so the work
    launched after it (the bitmask's copy, sampling) runs once the rows are filled, and the host does
    not wait. A flag can only hold the submission or the one before (each is settled before the next
    is sent), so its low byte tells them apart. (A stream of its own that waits and copies the rows
    while the forward pass runs, with the sampling's stream waiting for its event, took the GPU's
    copy off the step but cost the engine thread 150 us a step in torch's stream and event calls.)"""

    def __init__(self, flags: torch.Tensor, procs: int) -> None:
        cuda = ctypes.CDLL("libcuda.so.1")
        ptr = ctypes.c_uint64()
        if cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(ptr), ctypes.c_void_p(flags.data_ptr()), 0) != 0:
            raise RuntimeError("the flags are not mapped for the GPU")
        self._words = [(ptr.value + 4 * i, min(4, procs - 4 * i)) for i in range((procs + 3) // 4)]
        self._wait = cuda.cuStreamWaitValue32_v2
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self(0)                                      # met already (all zero): fails here if the GPU cannot
        torch.cuda.current_stream().synchronize()

    def __call__(self, step: int) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        for addr, n in self._words:
            rc = self._wait(stream, addr, (step & 0xFF) * (0x01010101 >> 8 * (4 - n)), 1)   # CU_STREAM_WAIT_VALUE_EQ
            if rc != 0:
                raise RuntimeError(f"cuStreamWaitValue32 returned CUDA error {rc}")


def _gate(flags: torch.Tensor, procs: int) -> StreamGate | None:
    try:
        return StreamGate(flags, procs)
    except (OSError, AttributeError, RuntimeError) as e:
        log.info("grammar mask worker: no GPU-side wait for masks (%s); the engine waits for them", e)
        return None


class MaskWorker:
    """The engine's side. `submit(requests, newest)` then `collect()` once per step that uses it.
    `processes` worker processes (default: one per four CPUs, at most four) split the rows by request."""

    def __init__(self, max_rows: int, vocab_size: int, min_rows: int = 1, processes: int | None = None) -> None:
        self.rows, self.words, self.min_rows = max_rows, (vocab_size + 31) // 32, min_rows
        procs = min(processes or default_processes(), MAX_PROCESSES)
        if SYS_FUTEX is None:
            raise RuntimeError(f"the grammar mask worker needs Linux futexes (x86_64, aarch64, ppc64le), not "
                               f"{platform.machine()}: set grammar_mask_worker to off")
        fd, self._path = tempfile.mkstemp(prefix="infer-masks-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.ftruncate(fd, file_words(self.rows, self.words) * 4)
        os.close(fd)
        shared = open_shared(self._path, self.rows, self.words)
        self.bitmask, flags = shared.bitmask, shared.flags
        self._sub, self._payload, self._tokens = shared.head, shared.payload, shared.tokens
        self._sub_addr = self._sub.ctypes.data
        self._done, self._fill_us = done_bytes(flags)[:procs], flags[16:16 + procs].numpy()
        self._pinned = _pin(self.bitmask, flags)
        self._gate = _gate(flags, procs) if self._pinned else None
        self._gathered = torch.empty(self.bitmask.shape, dtype=torch.int32, pin_memory=self._pinned)   # see collect
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        self._procs, self._conns = [], []
        for w in range(procs):
            ours, theirs = socket.socketpair()
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "services.grammar.mask_process", str(theirs.fileno()), self._path,
                 str(self.rows), str(self.words), str(w)],
                pass_fds=(theirs.fileno(),), env=env, cwd=str(REPO_ROOT)))
            theirs.close()
            self._conns.append(Connection(ours.detach()))
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns, self._path, self.bitmask, self._pinned,
                                           self._sub_addr)
        self.failed = False
        self._fill_s = 0.0                            # the slowest worker's fill time, last submission
        self._unsettled: tuple[int, list, list[int]] | None = None   # (submission, requests, rows) not seen filled
        self._ready = 0
        self._step = 0
        self._mirrors: dict[int, list[int]] = {}      # Request.arrival_seq -> [token_ids taken, last submission]
        self._grammars: dict[int, Any] = {}           # id(GrammarHandle) -> handle (alive, so ids stay unique)
        self._tokenizers: dict[int, Any] = {}         # id(TokenizerInfo) -> info
        self._pending: tuple[list, list[int], int] | None = None   # (requests, constrained rows, vocab size)
        self._layout: _Layout | None = None           # the last submission's rows (see submit)
        self._views: dict[int, torch.Tensor] = {}

    def submit(self, requests: list, newest=None) -> bool:
        """Send the tokens of the constrained rows (row i = requests[i]) that their mirrors lack, plus
        `newest[i]`, row i's token not appended yet (a sequence or array, for every row; or None); the
        worker then fills those rows. False (nothing sent) when the worker is not worth it or cannot take
        this step: fill in process then."""
        keys = [r.arrival_seq if r.matcher is not None else -1 for r in requests]
        layout = self._layout
        same = layout is not None and keys == layout.keys
        rows = layout.rows if same else [i for i, k in enumerate(keys) if k >= 0]
        if self.failed or len(rows) < self.min_rows or len(requests) > self.rows or not self.settle():
            return False
        # The common step: the same sequences in the same rows as the last submission, each lacking only
        # its newest token: only the batch's newest tokens go, each worker takes its rows' (TOKENS_ONLY).
        lens = [len(requests[i].token_ids) for i in rows] if same and newest is not None else None
        tokens_only = lens is not None and lens == layout.taken
        if not tokens_only:
            handles = [requests[i].sampling_params.grammar for i in rows]
            if any(h.vocab_size != handles[0].vocab_size for h in handles) or handles[0].vocab_size > self.words * 32:
                return False
        try:
            if tokens_only:
                self._step = next_step(self._step)
                layout.taken = [n + 1 for n in lens]
                self._tokens[:len(requests)] = newest[:len(requests)]
                self._sub[1] = TOKENS_ONLY
            else:
                parts = self._layout_for(requests, rows, keys, handles, newest)
                layout = self._layout
                # every process takes it, so all count the same submissions
                payload = pickle.dumps((self._step, parts), protocol=pickle.HIGHEST_PROTOCOL)
                if len(payload) <= len(self._payload):
                    self._payload[:len(payload)] = memoryview(payload)
                    self._sub[1] = len(payload)
                else:
                    self._sub[1] = BY_SOCKET
                    for conn, part in zip(self._conns, parts):
                        conn.send(("step", self._step, part))
            fence()
            self._sub[0] = self._step   # after the payload
            futex_wake(self._sub_addr)
        except OSError as e:
            self._fail(f"cannot reach the worker: {e}")
            return False
        if self._step % EXPIRE_STEPS == 0:
            self._flush_layout()
            expire(self._mirrors, self._step)
        self._pending = (requests, rows, layout.vocab_size)
        return True

    def _layout_for(self, requests: list, rows: list[int], keys: list[int], handles: list, newest):
        """A submission's parts, one per worker: (row, mirror key, the tokens it lacks, what a new mirror
        is made of), and the layout that the next submission may reuse."""
        self._flush_layout()
        self._step = next_step(self._step)
        if len(self._grammars) + len(handles) > MAX_GRAMMARS and any(id(h) not in self._grammars for h in handles):
            self._broadcast(("reset",))
            self._grammars.clear()
            self._mirrors.clear()   # the layout was flushed into them already
        parts: list[list] = [[] for _ in self._conns]
        taken = []
        for i, h in zip(rows, handles):
            key = keys[i]
            req = requests[i]
            if id(h) not in self._grammars:
                self._register(h)
            mirror = self._mirrors.get(key)
            new = mirror is None
            if new:
                mirror = self._mirrors[key] = [len(req.prompt_token_ids), 0]
            ids = req.token_ids
            tokens = ids[mirror[0]:] if mirror[0] < len(ids) else []   # usually none but the newest
            mirror[0] = len(ids)
            if newest is not None:
                tokens.append(int(newest[i]))
                mirror[0] += 1
            mirror[1] = self._step
            taken.append(mirror[0])
            parts[key % len(parts)].append((i, key, tokens, (id(h), req.matcher.stop_token_ids) if new else None))
        self._layout = _Layout(keys, rows, taken, handles[0].vocab_size)
        return parts

    def _flush_layout(self) -> None:
        """The mirrors of the last layout took a token at every submission since: write that down (the
        workers do the same) before the mirrors are looked at."""
        if self._layout is not None:
            for i, taken in zip(self._layout.rows, self._layout.taken):
                key = self._layout.keys[i]
                self._mirrors[key] = [taken, self._step]

    def collect(self, order: list[int] | None = None, gate: bool = False):
        """The rows filled for the last `submit` (a matcher.FilledMasks over the shared bitmask), or
        None if the worker failed: the caller fills in process. `order`: row j of the batch to sample
        is submitted row order[j] (rows of a step that goes on without some of its sequences); None: the
        submitted rows as they are.
        `gate`: the caller launches this step's sampling at once on the current CUDA stream; where the
        GPU can wait for the workers' flags, it does so instead of this thread, and `settle` looks at
        them later (call it before anything waits for that sampling)."""
        (requests, rows, vocab_size), self._pending = self._pending, None
        n = len(requests)
        self._unsettled = (self._step, requests, rows)   # until the flags are seen: see settle
        bitmask, gathered = self._first(n), False
        if order is not None:
            gathered, taken = order != list(range(len(order))), set(rows)
            rows = [j for j, r in enumerate(order) if r in taken] if gathered else [r for r in rows if r < len(order)]
            bitmask = self._first(len(order))
        if gate and self._gate is not None and rows and not gathered:
            try:
                self._gate(self._step)
            except RuntimeError as e:
                self._fail(str(e))
                return None
            return FilledMasks(bitmask, rows, vocab_size, self._fill_s)
        if not self.settle():
            return None
        if gathered:   # read on the host: after the rows are filled
            bitmask = torch.index_select(self._first(n), 0, torch.tensor(order), out=self._gathered[:len(order)])
        if order is not None and not rows:
            return None
        return FilledMasks(bitmask, rows, vocab_size, self._fill_s)

    def _first(self, n: int) -> torch.Tensor:
        """bitmask[:n], made once (a view costs microseconds that a step counts)."""
        if n not in self._views:
            self._views[n] = self.bitmask[:n]
        return self._views[n]

    def settle(self) -> bool:
        """Waits until the workers have filled the last submission's rows (False: a worker failed or
        stalled; the rows the GPU may be waiting for are then filled here and the flags set)."""
        if self._ready < len(self._conns) and not self._read_messages():
            return False
        if self._unsettled is None:
            return not self.failed
        want, deadline = bytes([self._unsettled[0] & 0xFF]) * len(self._done), None
        while self._done.tobytes() != want:   # mostly set already: the forward pass took longer
            if deadline is None:
                deadline = time.monotonic() + STALL_S
            elif time.monotonic() > deadline:
                self._fail(f"no masks from the workers in {STALL_S:.0f} s")
                return False
            if not self._read_messages():
                return False
            time.sleep(0)
        fence()
        self._unsettled, self._fill_s = None, max(self._fill_us.tolist()) / 1e6
        return True

    def _read_messages(self) -> bool:
        """What the workers sent, without waiting: "ready" (they have mapped the file) or an error
        (False, as when one is gone)."""
        for conn in self._conns:
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg[0] != "ready":
                        self._fail(msg[1])
                        return False
                    self._ready += 1
                    if self._ready == len(self._conns):   # all have mapped the file: it can go, and
                        Path(self._path).unlink(missing_ok=True)   # a killed engine leaves nothing in /dev/shm
            except (EOFError, OSError) as e:
                self._fail(f"a worker exited ({e!r}, exit codes {[p.poll() for p in self._procs]})")
                return False
        return True

    def close(self) -> None:
        if self._unsettled is not None:   # a GPU that waits for these rows goes on (this engine is stopping)
            self._done[:] = self._unsettled[0] & 0xFF
            self._unsettled = None
        self._finalizer()

    def _register(self, handle: Any) -> None:
        info = handle.tokenizer_info
        if id(info) not in self._tokenizers:
            self._tokenizers[id(info)] = info
            self._broadcast(("tokenizer", id(info), info.serialize_json()))
        self._grammars[id(handle)] = handle
        self._broadcast(("grammar", id(handle), id(info), handle.compiled.serialize_json()))

    def _broadcast(self, msg: tuple) -> None:
        for conn in self._conns:
            conn.send(msg)

    def _fail(self, why: str) -> None:
        log.warning("grammar mask worker: %s; masks are filled in the engine's process from now on", why)
        self.failed = True
        if self._unsettled is not None:   # the GPU may wait for these rows: fill them here, then set the flags
            step, requests, rows = self._unsettled
            live = [(requests[row].matcher.synced(), row) for row in rows if requests[row].matcher is not None]
            fill_rows([m for m, _ in live], self.bitmask, [row for _, row in live])
            self._done[:] = step & 0xFF
            self._unsettled = None
        self.close()


@dataclass
class _Layout:
    keys: list[int]            # each row's mirror key (Request.arrival_seq; -1: not constrained)
    rows: list[int]            # the constrained rows
    taken: list[int]           # how many of each constrained row's token_ids its mirror has taken
    vocab_size: int


def default_processes() -> int:
    """One per four CPUs this process may run on, at most four: each fills a quarter of 32 rows in
    ~0.35 ms (Llama-3's vocabulary), inside the engine thread's own work of a step."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus // 4))


def _stop(procs: list, conns: list, path: str, bitmask: torch.Tensor, pinned: bool, sub_addr: int) -> None:
    for conn in conns:
        conn.close()   # the workers find their socket closed once woken: they exit
    futex_wake(sub_addr)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    if pinned:
        torch.cuda.cudart().cudaHostUnregister(bitmask.data_ptr())
    Path(path).unlink(missing_ok=True)


