"""Where a decode step's time goes: host (cProfile) and device (torch.profiler kernels), per batch size.

    python -m loadtest.profile_engine --model llama-3.2-1b --batches 1,128 --out /tmp/prof

For each batch size: that many 512-token prompts are prefilled, then decode steps are timed
(wall per step), profiled with cProfile (host functions by total time) and with torch.profiler
(GPU kernels by device time, and the step's device-busy share). Writes <out>/profile_<model>.txt.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

from loadtest.bench_engine import CONFIGS, ensure_tokenizer, fixed_prompts


def profile(model: str, batches: list[int], steps: int, device: str) -> str:
    import torch  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile as tprofile  # noqa: PLC0415
    from services.engine.llm import LLM  # noqa: PLC0415
    from services.engine.sampling_params import SamplingParams  # noqa: PLC0415

    model_dir = str(CONFIGS / model) if (CONFIGS / model).is_dir() else model
    llm = LLM(model_dir, tokenizer=ensure_tokenizer(None), load_format="dummy", device=device,
              max_num_seqs=max(batches), max_num_batched_tokens=16384, max_model_len=2048 + 64)
    engine = llm.engine
    vocab = engine.vocab_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = io.StringIO()
    for b in batches:
        params = SamplingParams(temperature=0.6, max_tokens=400, ignore_eos=True)
        for i, p in enumerate(fixed_prompts(b, 512, vocab, seed=b)):
            engine.add_request(f"b{b}-{i}", p, params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
                or engine.scheduler.num_waiting:
            engine.step()
        for _ in range(5):
            engine.step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        wall_ms = 1000 * (time.perf_counter() - t) / steps
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            engine.step()
        pr.disable()
        host = io.StringIO()
        pstats.Stats(pr, stream=host).sort_stats("tottime").print_stats(25)
        with tprofile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])) as tp:
            for _ in range(steps):
                engine.step()
            sync()
        kernels = tp.key_averages().table(sort_by="self_cuda_time_total" if device == "cuda" else "self_cpu_time_total", row_limit=25)
        device_us = sum(e.self_device_time_total for e in tp.key_averages()) / steps
        print(f"=== {model} batch {b}: {wall_ms:.3f} ms per decode step (no profiler), "
              f"device busy {device_us / 1000:.3f} ms per step ===", file=out)
        print(host.getvalue().split("\n", 6)[-1][:6000], file=out)
        print(kernels, file=out)
        for rid in list(engine.groups):
            engine.abort_request(rid)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="/tmp")
    a = ap.parse_args()
    text = profile(a.model, [int(b) for b in a.batches.split(",")], a.steps, a.device)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"profile_{Path(a.model).name}.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
