"""Benchmark of the Redis KV tier: TTFT for a long shared prefix, side by side in one run —
recompute (cold engine, no tier) vs local prefix hit vs fetch from Redis into a cold engine — with
the bytes moved and the cost model's choice; then the tier's overhead at 0% hits. Prints JSON.

    .venv/bin/python -m loadtest.bench_prefix                       # tiny model, own redis-server
    .venv/bin/python -m loadtest.bench_prefix --redis-url redis://127.0.0.1:6379/0 --encoding fp8
    .venv/bin/python -m loadtest.bench_prefix --model DIR --load-format dummy --device cuda

TTFT here is engine time from add_request (which includes the tier lookup and fetch) to the first
token, so the three paths differ only in how the prefix KV gets there. Each figure is the median
over --repeats fresh prefixes (random tokens, so nothing hits by accident).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from services.engine.config import TINY_MODEL, EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.prefix_cache.tier import KVTier
from services.prefix_cache.tier_config import KVTierConfig

FIRST = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def start_redis() -> tuple[subprocess.Popen, str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no redis-server on PATH: run `make redis` or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", d, "--save", "",
                             "--appendonly", "no", "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"redis://127.0.0.1:{port}/0", d
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


class Bench:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.config = EngineConfig(model=args.model, tokenizer=args.tokenizer or None,
                                   load_format=args.load_format, device=args.device,
                                   block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                                   max_num_batched_tokens=max(2048, args.prefix_tokens + 64))
        self._ids = 0

    def engine(self, redis_url: str | None, **tier) -> LLMEngine:
        kv_tier = KVTier(KVTierConfig(redis_url=redis_url, encoding=self.args.encoding,
                                      write_policy=self.args.write_policy, **tier)) \
            if redis_url else None
        e = LLMEngine(self.config, kv_tier=kv_tier)
        for _ in range(2):   # warm-up: first passes allocate (and compile); the second is a speed sample
            self.ttft(e, self.tokens(64))
        return e

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def ttft(self, e: LLMEngine, ids: list[int], params: SamplingParams = FIRST) -> tuple[float, list[int]]:
        self._ids += 1
        rid = f"b{self._ids}"
        t0 = time.perf_counter()
        e.add_request(rid, ids, params)
        while True:
            for out in e.step():
                if out.request_id == rid and out.outputs[0].token_ids:
                    first = time.perf_counter() - t0
                    while e.has_unfinished_requests():
                        e.step()
                    return first, out.outputs[0].token_ids
        # unreachable: every request yields a token

    def shared_prefix(self, redis_url: str) -> dict:
        a = self.args
        plain = self.engine(None)
        writer = self.engine(redis_url)
        reader = self.engine(redis_url)
        rows = {"recompute": [], "local_hit": [], "redis_fetch": []}
        decisions, bytes_read, mismatches = [], [], 0
        for _ in range(a.repeats):
            prefix = self.tokens(a.prefix_tokens)
            q1, q2 = prefix + self.tokens(a.suffix_tokens), prefix + self.tokens(a.suffix_tokens)
            t, tok_plain = self.ttft(plain, q1)                # cold: the whole prompt is prefilled
            rows["recompute"].append(t)
            rows["local_hit"].append(self.ttft(plain, q2)[0])  # same engine, same prefix
            self.ttft(writer, q1)                              # computes the prefix ...
            self.ttft(writer, q2)                              # ... and reuses it: published either way
            writer.kv_tier.writer.flush(timeout_s=60)
            before = reader.kv_tier.stats.bytes_read
            t, tok_fetch = self.ttft(reader, q1)               # cold for this prefix: Redis
            rows["redis_fetch"].append(t)
            bytes_read.append(reader.kv_tier.stats.bytes_read - before)
            d = reader.kv_tier.last_decision
            decisions.append(d)
            mismatches += tok_plain != tok_fetch
        last = decisions[-1]
        out = {name: {"ttft_ms_median": 1e3 * statistics.median(v), "ttft_ms_all": [round(1e3 * x, 2) for x in v]}
               for name, v in rows.items()}
        out["redis_fetch"].update(
            bytes_moved_median=statistics.median(bytes_read),
            decisions=["fetch" if d and d.fetch else "recompute" for d in decisions],
            first_token_mismatches=mismatches)
        if last is not None:
            out["cost_model_last"] = {k: v for k, v in last.as_attributes("").items()}
        out["speedup_redis_vs_recompute"] = (out["recompute"]["ttft_ms_median"]
                                             / out["redis_fetch"]["ttft_ms_median"])
        for e in (writer, reader):
            e.kv_tier.close()
        return out

    def zero_hit_overhead(self, redis_url: str) -> dict:
        """Unique prompts, so the tier only costs (lookups that miss, exports, writes)."""
        a = self.args
        plain, tiered = self.engine(None), self.engine(redis_url)
        params = SamplingParams(temperature=0, max_tokens=a.overhead_new_tokens, ignore_eos=True)
        times = {"off": [], "on": []}
        for i in range(a.overhead_rounds):
            batch = [self.tokens(a.overhead_prompt_tokens) for _ in range(a.overhead_batch)]
            order = [("off", plain), ("on", tiered)] if i % 2 == 0 else [("on", tiered), ("off", plain)]
            for name, e in order:      # alternate to spread drift of a shared machine over both
                t0 = time.perf_counter()
                for j, ids in enumerate(batch):
                    e.add_request(f"o{i}-{j}-{name}", ids, params)
                while e.has_unfinished_requests():
                    e.step()
                times[name].append(time.perf_counter() - t0)
        tiered.kv_tier.writer.flush(timeout_s=60)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        s = tiered.kv_tier.stats
        result = {"median_s_off": off, "median_s_on": on, "overhead_pct": 100 * (on - off) / off,
                  "rounds": a.overhead_rounds, "requests_per_round": a.overhead_batch,
                  "tier_blocks_missed": s.blocks_miss, "tier_blocks_exported": s.blocks_exported,
                  "tier_bytes_written": s.bytes_written,
                  "writes_dropped": tiered.kv_tier.writer.stats.num_dropped}
        tiered.kv_tier.close()
        return result

    def run(self, redis_url: str) -> dict:
        probe = LLMEngine(self.config)
        self.vocab = probe.vocab_size
        device = str(probe.runner.device)
        kv_bytes_per_token = probe.runner.kv_bytes_per_block // self.args.block_size
        del probe
        free_engines()
        result = {"model": self.args.model, "device": device, "encoding": self.args.encoding,
                  "write_policy": self.args.write_policy,
                  "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                  "kv_bytes_per_token": kv_bytes_per_token,
                  "prefix_tokens": self.args.prefix_tokens, "suffix_tokens": self.args.suffix_tokens,
                  "block_size": self.args.block_size, "repeats": self.args.repeats,
                  "shared_prefix": self.shared_prefix(redis_url)}
        free_engines()
        result["zero_hit_overhead"] = self.zero_hit_overhead(redis_url)
        return result


def free_engines() -> None:
    """Engines of a finished phase hold weights and KV; free them before the next phase builds more."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=TINY_MODEL)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--tokenizer", default="", help="default: the model dir's (dummy configs: models/tiny-target)")
    p.add_argument("--device", default="auto")
    p.add_argument("--redis-url", default="", help="default: start a redis-server on a free port")
    p.add_argument("--encoding", default="raw", choices=["raw", "fp8"])
    p.add_argument("--write-policy", default="computed", choices=["computed", "reused"])
    p.add_argument("--prefix-tokens", type=int, default=768)
    p.add_argument("--suffix-tokens", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--overhead-rounds", type=int, default=6)
    p.add_argument("--overhead-batch", type=int, default=8)
    p.add_argument("--overhead-prompt-tokens", type=int, default=256)
    p.add_argument("--overhead-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    proc, url, d = (None, args.redis_url, None) if args.redis_url else start_redis()
    try:
        result = Bench(args).run(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(d, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
