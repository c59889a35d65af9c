"""A grammar mask worker process: mirrors of a share of the engine's constrained sequences' matchers,
which take each submission's tokens and fill their rows of the shared bitmask (mask_worker.py is the
engine's side, mask_shm.py the shared file).

    python -m services.grammar.mask_process FD PATH ROWS WORDS INDEX   (started by MaskWorker)
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from services.grammar.mask_shm import (
    EXPIRE_STEPS,
    TOKENS_ONLY,
    done_bytes,
    expire,
    fence,
    futex_wait,
    open_shared,
)
from services.grammar.matcher import fill_rows


def serve(conn: Connection, bitmask: torch.Tensor, done, fill_us, sub, payload, newest, index: int) -> None:
    """Fills rows for the engine's submissions. `done` / `fill_us`: this worker's flag and fill time;
    `sub` / `payload` / `newest`: the submission's number and size, its bytes, and its newest tokens
    (arrays in the shared file: mask_shm.Shared)."""
    import xgrammar as xgr  # noqa: PLC0415

    batch = xgr.BatchGrammarMatcher(1)   # nothing else runs here: one thread fills 32 rows fastest
    infos: dict[int, Any] = {}
    grammars: dict[int, Any] = {}
    mirrors: dict[int, list] = {}          # Request.arrival_seq -> [GrammarMatcher, last submission]

    layout: list[list] = [[], [], []]      # the last submission's matchers, rows and mirror keys
    prev_step = 0

    def flush(step: int) -> None:          # the same rule as the engine's _flush_layout
        for key in layout[2]:
            mirrors[key][1] = step

    def fill(step: int, items: list | None) -> None:
        """items: (row, mirror key, tokens, new mirror's grammar) per row; None: the rows of the last
        submission, each taking its newest token (TOKENS_ONLY)."""
        nonlocal prev_step
        t0 = time.perf_counter()
        if items is None:
            for m, t in zip(layout[0], newest[layout[1]].tolist()):
                m.accept_token(t)
        else:
            flush(prev_step)
            layout[:] = [], [], []
            for row, key, tokens, new in items:
                if new is not None:
                    gid, stop_ids = new
                    mirrors[key] = [xgr.GrammarMatcher(grammars[gid], override_stop_tokens=stop_ids or None), 0]
                mirror = mirrors[key]
                for t in tokens:
                    mirror[0].accept_token(t)
                mirror[1] = step
                for part, x in zip(layout, (mirror[0], row, key)):
                    part.append(x)
        fill_rows(layout[0], bitmask, layout[1], batch)
        fill_us[0] = int((time.perf_counter() - t0) * 1e6)
        fence()
        done[0] = step & 0xFF     # after the rows: the engine, or the GPU, may read them now
        prev_step = step
        if step % EXPIRE_STEPS == 0:
            flush(step)
            expire(mirrors, step)

    try:
        conn.send(("ready",))
    except OSError:   # the engine is gone already
        return
    seen, last_time = 0, time.monotonic()
    while True:
        try:
            # Messages first (grammars, tokenizers, a submission too large for the file): they were sent
            # before the number that woke this worker moved on.
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "step":
                    fill(*msg[1:])
                elif msg[0] == "tokenizer":
                    infos[msg[1]] = xgr.TokenizerInfo.deserialize_json(msg[2])
                elif msg[0] == "grammar":
                    grammars[msg[1]] = xgr.CompiledGrammar.deserialize_json(msg[3], infos[msg[2]])
                elif msg[0] == "reset":
                    grammars.clear()
                    mirrors.clear()
                    layout[:] = [], [], []
            number = int(sub[0])
            if number == seen:   # sleep until the next submission; now and then look at the socket (a
                # grammar sent while no submission follows; the engine gone): often while decoding
                futex_wait(sub.ctypes.data, seen, 0.005 if time.monotonic() - last_time < 1 else 0.05)
                continue
            fence()
            seen, last_time = number, time.monotonic()
            if sub[1] >= 0:
                step, parts = pickle.loads(payload[:sub[1]].tobytes())
                fill(step, parts[index])
            elif sub[1] == TOKENS_ONLY:
                fill(number, None)
        except (EOFError, OSError):
            return
        except Exception as e:   # noqa: BLE001 - reported to the engine, which then fills in process
            with contextlib.suppress(OSError):
                conn.send(("error", f"{type(e).__name__}: {e}"))
            return


def main(argv: list[str]) -> None:
    fd, path, rows, words, index = int(argv[0]), argv[1], *map(int, argv[2:5])
    torch.set_num_threads(1)
    s = open_shared(path, rows, words)
    serve(Connection(fd), s.bitmask, done_bytes(s.flags)[index:index + 1], s.flags[16 + index:17 + index].numpy(),
          s.head, s.payload, s.tokens, index)


if __name__ == "__main__":
    main(sys.argv[1:])
