"""Phase profiler for engine steps, and the benchmark's JSON + PNG report (used by bench_engine.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

# Published reference points for the H100 (issue 9): vLLM 0.26 and the goals, output tokens/s and ms.
VLLM_H100 = {"qwen2.5-0.5b": (27043, 1.50), "llama-3.2-1b": (19971, 2.26), "llama-3.1-8b": (8563, 6.33)}
GOALS_H100 = {"qwen2.5-0.5b": (32000, 1.0), "llama-3.2-1b": (24000, 1.5), "llama-3.1-8b": (10300, 5.5)}
GOAL_HF_RATIO = {"b1": 20.0, "b128": 10.0}


class StepProfiler:
    """Times the phases of each `engine.step()`: schedule, forward (synchronised), sample, the rest
    (output building, detokenisation, stop checks). Wraps the engine's instance attributes; `detach`
    restores them."""

    def __init__(self, engine, sync):
        self.engine, self.sync = engine, sync
        self.rows: list[dict] = []
        self._orig = (engine.scheduler.schedule, engine.runner.execute, engine.sampler, engine.step)
        engine._can_overlap = lambda *a: False   # time whole synchronous steps (see LLMEngine._step_ahead)
        schedule, execute, sampler, step = self._orig
        cur: dict = {}
        perf = time.perf_counter

        def timed_schedule():
            t = perf()
            out = schedule()
            cur.update(schedule=perf() - t, batch=len(out.scheduled), tokens=out.num_batched_tokens,
                       kind="decode" if out.scheduled and all(s.num_new_tokens == 1 for s in out.scheduled)
                       else "prefill")
            return out

        def timed_execute(scheduled, **kwargs):
            t = perf()
            out = execute(scheduled, **kwargs)
            sync()
            cur["forward"] = perf() - t
            return out

        class TimedSampler:
            def __call__(self_, *args, **kwargs):
                t = perf()
                out = sampler(*args, **kwargs)
                cur["sample"] = perf() - t
                return out

            def __getattr__(self_, name):
                return getattr(sampler, name)

        def timed_step():
            cur.clear()
            t = perf()
            out = step()
            if "forward" in cur and "batch" in cur:
                total = perf() - t
                row = {k: cur.get(k, 0.0) for k in ("schedule", "forward", "sample")}
                row.update(total=total, other=total - sum(row.values()), batch=cur["batch"], kind=cur["kind"],
                           tokens=cur["tokens"])
                self.rows.append(row)
            return out

        engine.scheduler.schedule, engine.runner.execute = timed_schedule, timed_execute
        engine.sampler, engine.step = TimedSampler(), timed_step

    def detach(self) -> None:
        e = self.engine
        e.scheduler.schedule, e.runner.execute, e.sampler, e.step = self._orig
        del e._can_overlap

    def summary(self) -> dict:
        out = {}
        for kind in ("decode", "prefill"):
            rows = [r for r in self.rows if r["kind"] == kind]
            if not rows:
                continue
            n = len(rows)
            mean = {k: round(1000 * sum(r[k] for r in rows) / n, 3) for k in ("schedule", "forward", "sample",
                                                                             "other", "total")}
            slowest = max(rows, key=lambda r: r["total"])
            out[kind] = {"steps": n, "mean_batch": round(sum(r["batch"] for r in rows) / n, 1),
                         "mean_tokens": round(sum(r["tokens"] for r in rows) / n, 1), "mean_ms": mean,
                         "share_of_time": {k: round(mean[k] / mean["total"], 3) for k in mean if k != "total"},
                         "slowest_step_ms": {k: (round(1000 * v, 3) if isinstance(v, float) else v)
                                             for k, v in slowest.items()}}
        return out


# ---- report ----------------------------------------------------------------------------------------
def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


VARIANTS = {"_fp8": "fp8 KV cache", "_w8": "fp8 weights", "_w8_fp8": "fp8 weights and KV cache"}   # engine* keys


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = results["meta"]["device"]
    rows = []
    for name, entry in results["models"].items():
        eng, hf = entry.get("engine", {}), entry.get("hf", {})
        row = {"model": name, "offline_tok_s": _get(eng, "offline", "output_tok_per_s"),
               "itl_ms": _get(eng, "itl_b1", "itl_ms")}
        for suffix in VARIANTS:                        # float8 KV cache / weights, measured in the same run
            if f"engine{suffix}" in entry:
                row[f"offline_tok_s{suffix}"] = _get(entry[f"engine{suffix}"], "offline", "output_tok_per_s")
                row[f"itl_ms{suffix}"] = _get(entry[f"engine{suffix}"], "itl_b1", "itl_ms")
        for b in ("b1", "b128", "b8"):
            ours, theirs = _get(eng, f"hf_shape_{b}", "output_tok_per_s"), _get(hf, b, "output_tok_per_s")
            if ours is not None:
                row[f"ours_{b}"], row[f"hf_{b}"] = ours, theirs
                row[f"x_hf_{b}"] = round(ours / theirs, 1) if theirs else None
        if device == "cuda" and name in GOALS_H100:
            row["goal_tok_s"], row["goal_itl_ms"] = GOALS_H100[name]
            row["vllm_tok_s"], row["vllm_itl_ms"] = VLLM_H100[name]
        rows.append(row)
    results["summary"] = rows
    (out_dir / f"engine_bench_{device}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plots(rows, device, out_dir, results["meta"])
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))


def _plots(rows: list[dict], device: str, out_dir: Path, meta: dict) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [r["model"] for r in rows]
    title = meta.get("gpu") or meta.get("cpu", "")
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3 if device == "cuda" else 1, figsize=(15 if device == "cuda" else 6, 4.5),
                             squeeze=False)
    axes = axes[0]
    ax = axes[0]
    bs = ("b1", "b128") if device == "cuda" else ("b1", "b8")
    width = 0.2
    for j, (key, label) in enumerate([(f"ours_{bs[0]}", f"ours {bs[0]}"), (f"hf_{bs[0]}", f"HF {bs[0]}"),
                                      (f"ours_{bs[1]}", f"ours {bs[1]}"), (f"hf_{bs[1]}", f"HF {bs[1]}")]):
        ax.bar([i + (j - 1.5) * width for i in x], [r.get(key) or 0 for r in rows], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("output tokens/s")
    ax.set_title("vs HF generate(), same shapes")
    ax.legend(fontsize=8)
    if device == "cuda":
        for ax, (key, goal, ref, label) in zip(axes[1:], [
                ("offline_tok_s", "goal_tok_s", "vllm_tok_s", "offline output tokens/s (256 seqs)"),
                ("itl_ms", "goal_itl_ms", "vllm_itl_ms", "batch-1 inter-token latency, ms")]):
            bars = [(key, "ours"), (ref, "vLLM 0.26 (reference)"), (goal, "goal")]
            for j, (suffix, what) in enumerate((s, w) for s, w in VARIANTS.items() if any(key + s in r for r in rows)):
                bars.insert(1 + j, (key + suffix, f"ours, {what}"))
            w = 0.8 / len(bars)
            for j, (k, lab) in enumerate(bars):
                ax.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], [r.get(k) or 0 for r in rows], w, label=lab)
            ax.set_xticks(list(x), names)
            ax.set_title(label)
            ax.legend(fontsize=8)
    fig.suptitle(f"engine benchmark on {title} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / f"engine_bench_{device}.png", dpi=110)
    plt.close(fig)
