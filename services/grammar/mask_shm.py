"""The grammar mask worker's shared file and the signals across it: the layout both sides map, the
futex that wakes the worker processes, and the rules both sides keep alike (submission numbers, when
mirrors expire). The engine's side is mask_worker.py, the worker processes' side mask_process.py."""
from __future__ import annotations

import ctypes
import platform
from typing import NamedTuple

import numpy as np
import torch

EXPIRE_STEPS = 64
MAX_PROCESSES = 8
PAYLOAD_BYTES = 1 << 18   # a submission larger than this (mirrors catching up many tokens) goes by socket
BY_SOCKET, TOKENS_ONLY = -1, -2   # the submission's size word when not a payload in the file


class Shared(NamedTuple):
    bitmask: torch.Tensor   # int32 [rows, words]
    flags: torch.Tensor     # int32 [32]: worker w's flag is byte w, its fill time in us word 16 + w
    head: np.ndarray        # int32 [2]: the submission's number (the futex word) and its size
    payload: np.ndarray     # uint8: the pickled submission
    tokens: np.ndarray      # int32 over the same bytes: a TOKENS_ONLY submission's newest tokens, by row


def file_words(rows: int, words: int) -> int:
    """The shared file's size in int32 words (layout: `open_shared`)."""
    return rows * words + 32 + 2 + PAYLOAD_BYTES // 4


def open_shared(path: str, rows: int, words: int) -> Shared:
    """The shared file: the bitmask [rows, words]; 32 int32 words of flags: worker w's flag is byte w
    (the low byte of the last submission it filled; four workers' flags make one word that the GPU can
    wait for), its fill time in microseconds word 16 + w; then the submission: [number (the futex word),
    size (payload bytes; BY_SOCKET; TOKENS_ONLY)] and the pickled payload or the newest tokens."""
    t = torch.from_file(path, shared=True, size=file_words(rows, words), dtype=torch.int32)
    n = rows * words
    sub = t[n + 32:]
    return Shared(t[:n].view(rows, words), t[n:n + 32], sub[:2].numpy(), sub[2:].view(torch.uint8).numpy(),
                  sub[2:].numpy())


def done_bytes(flags: torch.Tensor):
    return flags[:MAX_PROCESSES // 4].view(torch.uint8).numpy()


SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "ppc64le": 221}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wake(addr: int) -> None:
    """Wakes every worker waiting on the submission number (FUTEX_WAKE, shared: across processes)."""
    _libc.syscall(ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(1), ctypes.c_int(0x7FFFFFFF),
                  None, None, ctypes.c_int(0))


_FENCE_WORD = ctypes.c_int(0)
_WEAK_ORDER = platform.machine() != "x86_64"


def fence() -> None:
    """A full memory barrier where the CPU may reorder stores and loads (arm64, POWER; x86 keeps stores
    in order and loads in order): the kernel's futex wake runs one even with no one to wake."""
    if _WEAK_ORDER:
        futex_wake(ctypes.addressof(_FENCE_WORD))


def futex_wait(addr: int, seen: int, timeout_s: float) -> None:
    """Sleeps while the submission number is `seen`, at most timeout_s (FUTEX_WAIT)."""
    ts = _Timespec(0, int(timeout_s * 1e9))
    _libc.syscall(ctypes.c_long(SYS_FUTEX), ctypes.c_void_p(addr), ctypes.c_int(0), ctypes.c_int(seen),
                  ctypes.byref(ts), None, ctypes.c_int(0))


def next_step(step: int) -> int:
    """Submissions are numbered in 31 bits, the futex word's, so both sides see the same numbers."""
    return (step + 1) & 0x7FFFFFFF


def expire(mirrors: dict, step: int) -> None:
    """Both sides run this after every EXPIRE_STEPS-th submission, once their mirrors hold the last layout's
    progress, so they drop the same mirrors."""
    for key in [k for k, m in mirrors.items() if m[-1] <= step - EXPIRE_STEPS]:
        del mirrors[key]
