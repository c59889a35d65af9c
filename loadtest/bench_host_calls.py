"""Host time of the calls an overlapped decode step makes while its forward graph runs.

    python -m loadtest.bench_host_calls [--kernels 300 2000] [--out loadtest/results/host_calls_h100.json]

Each call is timed on the host (median of 200), once with the GPU idle and once right after replaying a
CUDA graph of N small kernels (a decode step's graph is ~300), the GPU synchronised between samples.
The calls: the current stream's handle, cuStreamWaitValue32 on a page-locked mapped word (the mask
worker's GPU-side wait) with a cached stream, a small torch op, an event record, a pinned buffer and
its copy (what sampling's launch makes), and the graph replay itself.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time

import torch


def timed(op, busy=None, n: int = 200) -> float:
    """Median host microseconds of op(), after busy() (or with the GPU idle)."""
    ts = []
    for _ in range(n):
        if busy is not None:
            busy()
        t = time.perf_counter()
        op()
        ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, nargs="+", default=[300, 2000], help="kernels in the replayed graph")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    x, y = torch.zeros(1 << 20, device="cuda"), torch.zeros(4, device="cuda")
    word = torch.zeros(1, dtype=torch.int32).pin_memory()
    cuda = ctypes.CDLL("libcuda.so.1")
    ptr = ctypes.c_uint64()
    assert cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(ptr), ctypes.c_void_p(word.data_ptr()), 0) == 0
    wait = cuda.cuStreamWaitValue32_v2
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    stream = torch.cuda.current_stream().cuda_stream
    calls = {
        "current_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "cuStreamWaitValue32": lambda: wait(stream, ptr.value, 0, 1),
        "small torch op": lambda: y.add_(1),
        "event record": lambda: torch.cuda.Event().record(),
        "pinned buffer and copy": lambda: torch.empty(64, dtype=torch.float64, pin_memory=True).copy_(
            y.double().repeat(16), non_blocking=True),
    }
    result = {"command": "python -m loadtest.bench_host_calls " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "idle_gpu_us": {}, "after_replay_us": {}}
    side = torch.cuda.Stream()   # warm-up off the capture stream
    with torch.cuda.stream(side):
        x.mul_(1.0)
    torch.cuda.synchronize()
    for name, op in calls.items():
        result["idle_gpu_us"][name] = timed(op)
    for k in a.kernels:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(k):
                x.mul_(1.0001)
        torch.cuda.synchronize()
        row = {name: timed(op, graph.replay) for name, op in calls.items()}
        row["the graph's replay itself, GPU idle"] = timed(graph.replay)
        result["after_replay_us"][f"{k} kernels"] = row
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
