"""Speculative decoding benchmark: decode tokens/s with and without speculation, side by side.

For each batch size (default 1, 8, 64) and each proposer (ngram, draft, optionally remote), the
same prompts run greedily on a plain engine and on a speculative one; it prints one table and
writes JSON with tokens/s, speedup, acceptance rate and mean accepted length.

    .venv/bin/python loadtest/bench_spec.py --device cpu --out loadtest/results/bench_spec_cpu.json
    .venv/bin/python loadtest/bench_spec.py --device cuda --proposers ngram,draft,remote

Decode tokens/s = tokens generated after every request has its first token, divided by the time
since then (prefill excluded). Prompts are chunks of Python standard-library source (what the
tiny models were trained on): code continuation, partly copy-heavy (n-gram lookup finds repeats);
`--workload copy` makes each prompt repeat a chunk it contains, the copy-heavy case (an edit of shown code).
Outputs are checked equal to the plain engine's (greedy), so a speedup never hides a wrong answer.
The engines run interleaved (plain, then each proposer, per repeat); the speedup is the median over
repeats of each speculative run's tokens/s over the plain run beside it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.draft import build_proposer  # noqa: E402
from services.engine.config import TINY_DRAFT, TINY_MODEL, EngineConfig  # noqa: E402
from services.engine.llm_engine import LLMEngine  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


def make_prompts(tokenizer, n: int, num_tokens: int, workload: str = "code") -> list[list[int]]:
    """`code`: chunks of source to continue. `copy`: a chunk of three quarters of the tokens, then its
    first quarter again, so that continuing means repeating it (an edit of code or text shown in the prompt)."""
    import argparse as a, collections, json as j, textwrap, string, dataclasses  # noqa: E401, PLC0415
    ids: list[int] = []
    for mod in (textwrap, string, collections, j.encoder, a, dataclasses):
        ids += tokenizer.encode(inspect.getsource(mod))
    body = num_tokens * 3 // 4 if workload == "copy" else num_tokens
    step = max((len(ids) - body) // max(n, 1), 1)
    chunks = [ids[i * step % (len(ids) - body):][:body] for i in range(n)]
    return [c + c[:num_tokens - body] for c in chunks]


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    outs: dict[str, list[int]] = {}
    t0 = n0 = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
        if t0 is None and all(g.children[0].num_output_tokens > 0 for g in engine.groups.values()):
            t0, n0 = time.perf_counter(), engine.generation_tokens_total
    t0 = t0 or time.perf_counter()
    dt = time.perf_counter() - t0
    tokens = engine.generation_tokens_total - (n0 or engine.generation_tokens_total)
    return (tokens / dt if dt > 0 else 0.0), [outs[f"{tag}-{i}"] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--target", default=TINY_MODEL)
    ap.add_argument("--draft", default=TINY_DRAFT)
    ap.add_argument("--proposers", default="ngram,draft", help="comma list of ngram, draft, remote")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--workload", default="code", choices=["code", "copy"],
                    help="code: continue source chunks; copy: continue a chunk repeated in the prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--no-adaptive", action="store_true", help="fixed k, no batch-size cap")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU), float32, ...")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=7, help="runs per configuration (median reported)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--trace-gate", action="store_true", help="log each SpecGate stretch (speculate or not)")
    ap.add_argument("--no-gate", action="store_true",
                    help="adaptive k only: speculate in every step below the batch cap (no SpecGate)")
    args = ap.parse_args()
    if args.trace_gate:
        import logging  # noqa: PLC0415
        logging.basicConfig(format="%(message)s")
        logging.getLogger("services.engine.speculator").setLevel(logging.DEBUG)
    import torch  # noqa: PLC0415
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    methods = [m for m in args.proposers.split(",") if m]
    # A fixed KV size: on a GPU the default sizes the cache from free memory, which would leave the
    # engines built after the first (plain, draft, speculative) without room.
    blocks = 2 * max(batches) * -(-(args.prompt_tokens + args.max_tokens + args.k + 16) // 16)
    common = dict(model=args.target, device=args.device, num_kv_blocks=blocks, max_num_seqs=max(batches),
                  kv_cache_memory_gb=1.0, dtype=args.dtype)
    engines = {"plain": LLMEngine(EngineConfig(**common))}
    for method in methods:
        handle = start_draft_server(args) if method == "remote" else None
        extra = {"timeout_s": 5.0} if method == "remote" else \
            {"num_kv_blocks": blocks, "dtype": args.dtype} if method == "draft" else {}
        proposer = build_proposer(method, draft_model=args.draft, device=args.device, draft_handle=handle, **extra)
        engines[method] = LLMEngine(EngineConfig(**common, speculative_method=method, num_speculative_tokens=args.k,
                                                 speculative_adaptive=not args.no_adaptive,
                                                 speculative_disable_batch_size=None if args.no_adaptive else 32),
                                    {method: proposer})
        if args.no_gate:
            engines[method].speculator.gate = AlwaysSpeculate()
    prompts = {b: make_prompts(engines["plain"].tokenizer, b, args.prompt_tokens, args.workload) for b in batches}
    for name, engine in engines.items():   # kernels compile on first use; adaptive engines explore plain steps first
        for b in batches:
            run(engine, prompts[b], 8 if name == "plain" else 24, f"warm{b}")
    results = []
    for b in batches:
        before = {m: _snapshot(engines[m].speculator.stats) for m in methods}
        # Runs interleaved, engine after engine, the median of `repeats` each: the lent machines' speed
        # drifts, and drift then hits every engine alike. Batches of 32 and more finish in ~0.1 s on a GPU:
        # three times the repeats there.
        runs: dict[str, list] = {name: [] for name in engines}
        for i in range(args.repeats * (3 if b >= 32 else 1)):
            for name, engine in engines.items():
                runs[name].append(run(engine, prompts[b], args.max_tokens, f"{name}{b}r{i}"))
        tps = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
        print(f"plain      batch {b:3d}: {tps['plain']:9.1f} tok/s", flush=True)
        for method in methods:
            d = {k: v - before[method][k] for k, v in _snapshot(engines[method].speculator.stats).items()}
            # Each repeat's speculative run sits beside its plain run: the median of those ratios is the speedup.
            ratios = [r[0] / p[0] for r, p in zip(runs[method], runs["plain"])]
            row = {"proposer": method, "batch": b, "tokens_per_s": round(tps[method], 1),
                   "baseline_tokens_per_s": round(tps["plain"], 1), "speedup": round(statistics.median(ratios), 3),
                   "speedup_per_repeat": [round(x, 3) for x in ratios],
                   "acceptance_rate": round(d["acc"] / d["prop"], 3) if d["prop"] else 0.0,
                   "mean_accepted_length": round(d["acc"] / d["steps"], 3) if d["steps"] else 0.0,
                   "proposed_tokens": d["prop"], "fallbacks": d["fb"], "skipped_steps": d["skip"],
                   "outputs_identical": runs[method][0][1] == runs["plain"][0][1]}
            results.append(row)
            print(f"{method:10s} batch {b:3d}: {tps[method]:9.1f} tok/s  x{row['speedup']:.2f}  "
                  f"accept {row['acceptance_rate']:.2f}  mean len {row['mean_accepted_length']:.2f}  "
                  f"identical {row['outputs_identical']}", flush=True)
    gates = {m: engines[m].speculator.gate.summary() for m in methods}
    for m in methods:
        engines[m].speculator.close()
    report = {"device": str(torch.device(args.device if args.device != "auto" else
                                         ("cuda" if torch.cuda.is_available() else "cpu"))),
              "torch_threads": torch.get_num_threads(), "target": args.target, "draft": args.draft,
              "dtype": args.dtype, "workload": args.workload, "prompt_tokens": args.prompt_tokens,
              "max_tokens": args.max_tokens, "k": args.k, "adaptive": not args.no_adaptive, "gate": not args.no_gate,
              "repeats": args.repeats, "results": results,
              "gate_rates": gates}   # per proposer and batch bucket: tokens/s measured with and without speculation
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


class AlwaysSpeculate:
    """In place of SpecGate (--no-gate): every step below the batch cap speculates."""

    def __call__(self, *args, **kwargs) -> bool:
        return True

    def reset(self) -> None:
        pass

    def summary(self) -> dict:
        return {}


def _snapshot(s) -> dict[str, int]:
    return {"prop": s.num_proposed_tokens, "acc": s.num_accepted_tokens, "steps": s.num_verify_steps,
            "fb": s.num_fallbacks, "skip": s.num_skipped_steps}


def start_draft_server(args):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415

    from services.draft.server import build_draft_app  # noqa: PLC0415
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    gpus = 0.5 if args.device == "cuda" else 0
    serve.run(build_draft_app(args.draft, num_replicas=1, device=args.device, num_gpus=gpus), name="bench-draft",
              route_prefix=None)
    return serve.get_deployment_handle("DraftServer", app_name="bench-draft")


if __name__ == "__main__":
    main()
