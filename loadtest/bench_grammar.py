"""Structured-output benchmark: compile time per spec kind, and the per-step cost of grammar masks
in the engine beside unconstrained decoding, at batch 1 and 32.

    python -m loadtest.bench_grammar                   # CPU: compile at a 128k vocab, masks on the tiny model
    python -m loadtest.bench_grammar --parts compile   # compile only (no model is loaded)
    python -m loadtest.bench_grammar --device cuda --config llama-3.2-1b --vocab 128256
    python -m loadtest.bench_grammar --device cuda --config llama-3.2-1b --tokenizer DIR  # a real vocabulary

Compile (against a synthetic byte-level vocabulary of --compile-vocab tokens, default 128256, the
Llama-3 size, since compile cost is token-mask work over the vocabulary; 0 = the model's own):
N distinct specs per kind (so no whole-grammar cache helps), compiled in-process as a compile
worker does: one long-lived compiler with xgrammar's rule-level cache, one thread
(--compile-threads), after the worker's warm-up set (services/grammar/warmup.py, its time
reported). Median / p99 ms, beside "cold": a fresh compiler per spec with no cache (how every
compile ran before). Plus the cost of shipping a compiled grammar (serialize_json +
deserialize_json), of a cache hit, and a per-feature table (one property of each feature): cold,
first time in a warm worker, and again (a new schema with the same feature).
Masks: steady-state decoding with `batch` sequences always in flight (each runs 48 tokens, then
is replaced by a new one with a 4-token prompt); per-step time and output tokens/s with every row
constrained by a JSON Schema (one that cannot complete within 48 tokens, so both modes decode the
same lengths) vs no constraint, and the mask time per step (fill on the CPU + apply on the device)
from the engine's own metric. On a GPU the engine fills masks in its mask worker process; each
round then also runs the constrained rows with the masks filled in the engine's own process, side by
side (`--rounds N` alternating rounds, medians).
`--vocab N` with `--config NAME` (loadtest/configs/NAME, dummy weights) uses a synthetic
byte-level vocabulary of N tokens (the tiny tokenizer's plus concatenations of its tokens), since
mask work grows with the vocabulary; `--tokenizer DIR` uses a real tokenizer instead (a model's own
tokenizer.json, or one made from llama.cpp's vocabulary files by `python -m loadtest.gguf_vocab`), for
both parts: how much of a vocabulary needs checking at each step depends on what its tokens look like.
Output: JSON (stdout and --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "tiny-target"
CONFIGS = REPO / "loadtest" / "configs"

# Every sequence runs exactly MAX_TOKENS tokens in both modes (the schema cannot complete sooner:
# minItems), so both see the same context lengths and replacement prefills; only masks differ.
MAX_TOKENS = 48
DECODE_SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "score": {"type": "number"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "score", "tags"]}}


# ---- spec generators: distinct texts per index, everyday sizes ------------------------------------
def spec_for(kind: str, i: int, rng: random.Random):
    from services.grammar.spec import GrammarSpec  # noqa: PLC0415
    word = lambda: "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 9)))  # noqa: E731
    if kind == "json_schema":
        props = {}
        for _ in range(rng.randint(3, 8)):
            props[word()] = rng.choice([{"type": "string", "maxLength": rng.randint(8, 64)}, {"type": "integer"},
                                        {"type": "number"}, {"type": "boolean"}, {"enum": [word() for _ in range(3)]},
                                        {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                                        {"type": "object", "properties": {word(): {"type": "string"}}}])
        return GrammarSpec.json_schema({"type": "object", "properties": props,
                                        "required": rng.sample(sorted(props), k=len(props) // 2), "title": f"s{i}"})
    if kind == "regex":
        return GrammarSpec.regex(rng.choice([r"[0-9]{3}-[0-9]{4}", r"[A-Z][a-z]+ [0-9]{1,4}", r"(yes|no|maybe)",
                                             r"[a-z]+@[a-z]+\.(com|org|net)"]) + f"(#{i})?")
    if kind == "gbnf":
        return GrammarSpec.gbnf(f'root ::= "{word()}" ws list\nlist ::= "[" ws item ("," ws item)* "]"\n'
                                f'item ::= [a-z]+ | [0-9]+\nws ::= | " "\n# {i}')
    if kind == "choice":
        return GrammarSpec.choice([word() + str(i) for _ in range(rng.randint(5, 50))])
    if kind == "json_object":
        return GrammarSpec.json_object(any_whitespace=bool(i % 2))
    raise ValueError(kind)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


THREADS = 1   # xgrammar threads per compile (--compile-threads): a worker's `compile_threads`


def _cold_compiler(info):
    import xgrammar as xgr  # noqa: PLC0415
    return xgr.GrammarCompiler(info, max_threads=THREADS, cache_enabled=False)


def _timed_ms(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - t0) * 1e3, out


def warm_compiler(info) -> tuple[object, dict]:
    """The compiler a compile worker holds once its warm-up set is done, and what that took."""
    from services.grammar.compiler import compile_spec, xgr_compiler  # noqa: PLC0415
    from services.grammar.spec import GrammarLimits  # noqa: PLC0415
    from services.grammar.warmup import warmup_specs  # noqa: PLC0415
    compiler, limits, steps = xgr_compiler(info, max_threads=THREADS), GrammarLimits(), []
    t0 = time.perf_counter()
    for spec in warmup_specs():
        steps.append(_timed_ms(compile_spec, compiler, spec, limits)[0])
    return compiler, {"seconds": time.perf_counter() - t0, "num_specs": len(steps),
                      "step_ms_median": statistics.median(steps), "step_ms_max": max(steps),
                      "cache_mb": compiler.get_cache_size_bytes() / 2 ** 20}


def bench_compile(info, n: int, num_cold: int) -> dict:
    import xgrammar as xgr  # noqa: PLC0415

    from services.grammar.cache import GrammarCache  # noqa: PLC0415
    from services.grammar.compiler import compile_spec  # noqa: PLC0415
    from services.grammar.spec import GrammarLimits  # noqa: PLC0415
    compiler, warm_up = warm_compiler(info)
    limits, rng, out = GrammarLimits(), random.Random(0), {"warm_up": warm_up}
    for kind in ("json_schema", "regex", "gbnf", "choice", "json_object"):
        times, cold, ser, deser, size = [], [], [], [], []
        specs = [spec_for(kind, i, rng) for i in range(n if kind != "json_object" else 2)]
        for spec in specs:
            dt, compiled = _timed_ms(compile_spec, compiler, spec, limits)
            t1 = time.perf_counter()
            text = compiled.serialize_json()
            t2 = time.perf_counter()
            xgr.CompiledGrammar.deserialize_json(text, info)
            t3 = time.perf_counter()
            times.append(dt)
            ser.append((t2 - t1) * 1e3)
            deser.append((t3 - t2) * 1e3)
            size.append(len(text))
        for spec in specs[:num_cold]:
            cold.append(_timed_ms(compile_spec, _cold_compiler(info), spec, limits)[0])
        out[kind] = {"n": len(times), "compile_ms_median": statistics.median(times),
                     "compile_ms_p99": percentile(times, 0.99), "cold_n": len(cold),
                     "cold_compile_ms_median": statistics.median(cold), "cold_compile_ms_p99": percentile(cold, 0.99),
                     "serialize_ms_median": statistics.median(ser),
                     "deserialize_ms_median": statistics.median(deser), "serialized_kb_median": statistics.median(size) / 1024}
    out["json_object"]["note"] = "2 fixed specs, both in the warm-up set: the warm figure is xgrammar's cache hit"
    out["features"] = bench_features(info, compiler, limits)
    cache = GrammarCache()
    cache.put("fp", "k", text)
    t0 = time.perf_counter()
    for _ in range(1000):
        cache.get("fp", "k")
    out["cache_hit_ms"] = (time.perf_counter() - t0)  # 1000 lookups → ms each
    return out


# One property of each feature, in an object with one required property.
FEATURES: dict[str, dict] = {
    "string": {"type": "string"},
    "string maxLength 8": {"type": "string", "maxLength": 8},
    "string maxLength 32": {"type": "string", "maxLength": 32},
    "string maxLength 64": {"type": "string", "maxLength": 64},
    "string maxLength 128": {"type": "string", "maxLength": 128},
    "string maxLength 129": {"type": "string", "maxLength": 129},
    "string maxLength 255": {"type": "string", "maxLength": 255},
    "string maxLength 1000": {"type": "string", "maxLength": 1000},
    "string minLength 1": {"type": "string", "minLength": 1},
    "string minLength 1 maxLength 64": {"type": "string", "minLength": 1, "maxLength": 64},
    "string minLength 3 maxLength 40": {"type": "string", "minLength": 3, "maxLength": 40},
    "integer": {"type": "integer"},
    "integer 0..100": {"type": "integer", "minimum": 0, "maximum": 100},
    "integer -1e6..1e6": {"type": "integer", "minimum": -1000000, "maximum": 1000000},
    "number": {"type": "number"},
    "number 0..1": {"type": "number", "minimum": 0, "maximum": 1},
    "boolean": {"type": "boolean"},
    "enum of 5": {"enum": ["alpha", "beta", "gamma", "delta", "epsilon"]},
    "anyOf string|null": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "array of strings": {"type": "array", "items": {"type": "string"}},
    "array maxItems 5": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "array of objects": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "label": {"type": "string"}}, "required": ["id"]}},
    "nested object": {"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "number"}}},
    "pattern ^[A-Z]{2}-[0-9]{4}$": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
    "pattern ^[a-z0-9_]+$": {"type": "string", "pattern": "^[a-z0-9_]+$"},
    "format date": {"type": "string", "format": "date"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format uuid": {"type": "string", "format": "uuid"},
    "format email": {"type": "string", "format": "email"},
    "format uri": {"type": "string", "format": "uri"},
}


def bench_features(info, compiler, limits) -> dict:
    """ms per feature: cold (fresh compiler, median of up to 3), first time in the warm compiler,
    and again in it (a different property name: a new grammar, the same feature)."""
    from services.grammar.compiler import compile_spec  # noqa: PLC0415
    from services.grammar.spec import GrammarSpec  # noqa: PLC0415
    names = iter(f"p{i}" for i in range(10 ** 6))

    def spec(feature: dict):
        name = next(names)
        return GrammarSpec.json_schema({"type": "object", "properties": {name: feature}, "required": [name]})

    out = {}
    for label, feature in FEATURES.items():
        cold = [_timed_ms(compile_spec, _cold_compiler(info), spec(feature), limits)[0]]
        if cold[0] < 1000:
            cold += [_timed_ms(compile_spec, _cold_compiler(info), spec(feature), limits)[0] for _ in range(2)]
        first = _timed_ms(compile_spec, compiler, spec(feature), limits)[0]
        again = [_timed_ms(compile_spec, compiler, spec(feature), limits)[0] for _ in range(3)]
        out[label] = {"cold_ms": statistics.median(cold), "warm_first_ms": first,
                      "warm_again_ms": statistics.median(again)}
        print(f"  {label:36s} cold {out[label]['cold_ms']:9.1f}  warm first {first:9.1f}  "
              f"again {out[label]['warm_again_ms']:7.1f} ms", file=sys.stderr, flush=True)
    return out


def compile_tokenizer_info(vocab: int, tokenizer: str | None = None):
    """TokenizerInfo of the synthetic byte-level vocabulary, or of `tokenizer` (tokenizer and config only, no model)."""
    from services.grammar.tokenizer import tokenizer_info_from_model_dir  # noqa: PLC0415
    return tokenizer_info_from_model_dir(synthetic_model_dir("llama-3.2-1b", vocab, tokenizer))


# ---- decoding with and without masks ------------------------------------------------------------
def steady_state(llm, batch: int, make_params, steps: int, warmup: int) -> dict:
    from services.telemetry import metrics  # noqa: PLC0415
    eng = llm.engine
    prompt = eng.tokenizer.encode("Result:")[:4] or [1]
    ids = iter(range(10 ** 9))

    def add() -> None:
        eng.add_request(f"r{next(ids)}", list(prompt), make_params())

    for _ in range(batch):
        add()
    for _ in range(warmup):
        for o in eng.step():
            if o.finished:
                add()
    hist = metrics.GRAMMAR_MASK_SECONDS
    m_sum0, m_cnt0 = _hist(hist)
    tok0, t0, step_times = eng.generation_tokens_total, time.perf_counter(), []
    for _ in range(steps):
        s = time.perf_counter()
        for o in eng.step():
            if o.finished:
                add()
        step_times.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    m_sum1, m_cnt1 = _hist(hist)
    for rid in list(eng.groups):
        eng.abort_request(rid)
    return {"tokens_per_s": (eng.generation_tokens_total - tok0) / wall, "tokens": eng.generation_tokens_total - tok0,
            "wall_s": wall,
            "step_ms_median": statistics.median(step_times) * 1e3,
            "mask_ms_per_step": (m_sum1 - m_sum0) / max(m_cnt1 - m_cnt0, 1) * 1e3 if m_cnt1 > m_cnt0 else 0.0}


def _hist(h) -> tuple[float, float]:
    total = count = 0.0
    for metric in h.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
    return total, count


def profiled(fn, path: str | None):
    """fn() under cProfile when `path` is set; the top functions by own time go to that file."""
    if not path:
        return fn()
    import cProfile, io, pstats  # noqa: E401, PLC0415
    prof = cProfile.Profile()
    out = prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(buf.getvalue())
    return out


def bench_masks(llm, info, batches: list[int], steps: int, profile_dir: str | None = None, rounds: int = 1) -> dict:
    """Per batch, `rounds` alternating rounds of: unconstrained, constrained as the engine runs it
    (on a GPU the mask worker process fills steps with 4+ constrained rows), and, where the engine
    has a mask worker, constrained with the masks filled in the engine's process. Losses are each
    round's against its own unconstrained run; the figures are the medians over rounds."""
    from services.engine.sampling_params import SamplingParams  # noqa: PLC0415
    from services.grammar.matcher import GrammarHandle  # noqa: PLC0415
    from services.grammar.spec import GrammarSpec  # noqa: PLC0415
    handle = GrammarHandle.compile(GrammarSpec.json_schema(DECODE_SCHEMA), info)
    eng = llm.engine
    worker = eng.mask_worker
    variants = {"json_schema": worker, **({"json_schema_in_process": None} if worker is not None else {})}
    # Deltas, as the servers ask for them (services/serving/llm_server.py): cumulative outputs would copy every
    # sequence's tokens and text each step, host work the serving path does not do.
    free_params = lambda: SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True,  # noqa: E731
                                         output_kind="delta")
    cons_params = lambda: SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, grammar=handle,  # noqa: E731
                                         output_kind="delta")
    out = {}
    for b in batches:
        runs: dict[str, list[dict]] = {"unconstrained": [], **{k: [] for k in variants}}
        for r in range(rounds):
            prof = profile_dir and r == 0 and f"{profile_dir}/grammar_masks_b{b}_unconstrained.txt"
            runs["unconstrained"].append(profiled(lambda: steady_state(llm, b, free_params, steps, warmup=4), prof))
            for name, w in variants.items():
                eng.mask_worker = w
                prof = profile_dir and r == 0 and f"{profile_dir}/grammar_masks_b{b}{name.removeprefix('json_schema')}.txt"
                runs[name].append(profiled(lambda: steady_state(llm, b, cons_params, steps, warmup=4), prof))
        eng.mask_worker = worker
        res = {"rounds": rounds, "unconstrained": _median_run(runs["unconstrained"])}
        for name in variants:
            loss = [100.0 * (1 - c["tokens_per_s"] / f["tokens_per_s"])
                    for c, f in zip(runs[name], runs["unconstrained"])]
            # Each round's median decode step against its own unconstrained one: steadier than the
            # throughput on a shared host, where a few slow steps move a round's wall time by 10-20 %.
            over = [100.0 * (c["step_ms_median"] / f["step_ms_median"] - 1)
                    for c, f in zip(runs[name], runs["unconstrained"])]
            # All rounds' tokens over all rounds' time, beside the unconstrained runs interleaved with
            # them: a round's stall (an eager prefill step that took 10 ms) weighs by its length.
            pooled = 100.0 * (1 - _throughput(runs[name]) / _throughput(runs["unconstrained"]))
            res[name] = {**_median_run(runs[name]), "throughput_loss_pct": statistics.median(loss),
                         "throughput_loss_pct_pooled": pooled,
                         "throughput_loss_pct_rounds": loss, "step_overhead_pct": statistics.median(over),
                         "step_overhead_pct_rounds": over}
        free, cons = res["unconstrained"], res["json_schema"]
        res.update({"throughput_loss_pct": cons["throughput_loss_pct"],
                    "step_time_overhead_pct": 100.0 * (cons["step_ms_median"] / free["step_ms_median"] - 1),
                    # Host time spent on masks per step, relative to an unconstrained step: the
                    # part that cannot hide behind the forward pass on the CPU (noise-free).
                    "mask_share_of_step_pct": 100.0 * cons["mask_ms_per_step"] / free["step_ms_median"]})
        out[f"batch_{b}"] = res
    out[f"fill_only_batch_{max(batches)}"] = fill_scaling(handle, max(batches))
    return out


def _throughput(runs: list[dict]) -> float:
    return sum(r["tokens"] for r in runs) / sum(r["wall_s"] for r in runs)


def _median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def fill_scaling(handle, batch: int = 32, steps: int = 48) -> dict:
    """xgrammar's mask fill alone for `batch` rows of the decode schema: a row at a time, and batched
    on 1, 2, 4, 8, 16 threads and "auto" (median ms per step); rows walk the grammar on random allowed tokens."""
    import xgrammar as xgr  # noqa: PLC0415
    from services.grammar.matcher import _allowed, allocate_token_bitmask  # noqa: PLC0415
    v = handle.vocab_size
    out = {}
    for threads in (1, 2, 4, 8, 16, "auto"):
        rng, matchers = random.Random(0), [handle.new_matcher() for _ in range(batch)]
        bitmask, batched = allocate_token_bitmask(batch, handle.vocab_size), xgr.BatchGrammarMatcher(threads)
        serial, together = [], []
        for _ in range(steps):
            t = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)
            serial.append(time.perf_counter() - t)
            t = time.perf_counter()
            batched.batch_fill_next_token_bitmask([m._m for m in matchers], bitmask, list(range(batch)))
            together.append(time.perf_counter() - t)
            for i, m in enumerate(matchers):
                m.accept_token(rng.choice(_allowed(bitmask[i], v, v).nonzero().flatten().tolist()))
        out[f"threads_{threads}"] = {"row_at_a_time_ms": statistics.median(serial) * 1e3,
                                     "batched_ms": statistics.median(together) * 1e3}
    return out


# ---- a synthetic large vocabulary --------------------------------------------------------------
def synthetic_model_dir(config: str, vocab: int, tokenizer: str | None = None) -> str:
    """config.json from loadtest/configs/<config> (dummy weights) + the tiny tokenizer's vocabulary
    grown to `vocab` byte-level tokens made of concatenated tiny tokens (deterministic), or the real
    tokenizer in the directory `tokenizer` (its vocabulary size wins)."""
    d = Path(tempfile.mkdtemp(prefix="grammar-bench-"))
    cfg = json.loads((CONFIGS / config / "config.json").read_text())
    if tokenizer:
        from transformers import AutoTokenizer  # noqa: PLC0415
        tok = AutoTokenizer.from_pretrained(tokenizer)
        cfg.update(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        src = Path(tokenizer)
    else:
        cfg.update(vocab_size=vocab, eos_token_id=0, bos_token_id=0)
        (d / "tokenizer.json").write_text(json.dumps(_grown_tiny_tokenizer(vocab)))
        src = TINY
    (d / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists() and not (d / f).exists():
            shutil.copy(src / f, d / f)
    return str(d)


def _grown_tiny_tokenizer(vocab: int) -> dict:
    """The tiny tokenizer.json with its vocabulary grown to `vocab` tokens of concatenated tiny tokens."""
    tok = json.loads((TINY / "tokenizer.json").read_text())
    base = list(tok["model"]["vocab"])
    rng, seen = random.Random(0), set(tok["model"]["vocab"])
    num_added = len(tok.get("added_tokens", []))
    while len(seen) + num_added < vocab:
        t = "".join(rng.choice(base) for _ in range(rng.randint(2, 3)))
        if t not in seen and len(t) <= 24:
            tok["model"]["vocab"][t] = len(seen)
            seen.add(t)
    # Added (special) tokens go after the grown vocabulary, ids stay dense.
    for i, a in enumerate(tok.get("added_tokens", [])):
        a["id"] = len(seen) + i if a["id"] >= len(base) else a["id"]
    return tok


def plot_masks(paths: list[str], out: str) -> None:
    """Per-round throughput loss and median-step overhead of constrained decoding against unconstrained,
    per model and batch: masks filled by the engine's mask worker and in its own process (bench JSONs
    with --rounds)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    runs = [json.loads(Path(p).read_text()) for p in paths]
    metrics = [("throughput_loss_pct_rounds", "throughput loss, %"),
               ("step_overhead_pct_rounds", "median step time over unconstrained, %")]
    fig, axes = plt.subplots(len(metrics), len(runs), figsize=(5.5 * len(runs), 7.5), squeeze=False)
    for row, (metric, ylabel) in enumerate(metrics):
        for ax, run in zip(axes[row], runs):
            batches = [k for k in run["masks"] if k.startswith("batch_")]
            for j, (name, label, color) in enumerate([("json_schema", "as run (mask worker at 4+ rows)", "tab:blue"),
                                                      ("json_schema_in_process", "filled in process", "tab:orange")]):
                for i, b in enumerate(batches):
                    values = run["masks"][b].get(name, {}).get(metric, [])
                    x = i + (j - 0.5) * 0.3
                    ax.scatter([x] * len(values), values, s=14, color=color, alpha=0.6, label=label if not i else None)
                    if values:
                        ax.hlines(statistics.median(values), x - 0.12, x + 0.12, color=color, lw=2.5)
            ax.axhline(5, color="grey", ls="--", lw=1)
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xticks(range(len(batches)), [b.replace("_", " ") for b in batches])
            ax.set_title(f"{run['model']}, {run['vocab_size']:,} tokens ({run['tokenizer']})"
                         + (f"\n{run['note'][:60]}" if run.get("note") else ""), fontsize=9)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
    fig.suptitle(f"Grammar masks on {runs[0]['device']}: JSON Schema rows vs unconstrained, per round "
                 "(bar: median; dashed: the 5 % goal)", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=None, help="loadtest/configs/NAME with dummy weights (else the tiny model)")
    ap.add_argument("--vocab", type=int, default=None, help="synthetic vocabulary size (with --config)")
    ap.add_argument("--tokenizer", default=None,
                    help="a real tokenizer's directory (tokenizer.json) for masks and compile, instead of a "
                         "synthetic vocabulary; one from llama.cpp's vocabularies: python -m loadtest.gguf_vocab")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of the mask runs (medians reported)")
    ap.add_argument("--compile-specs", type=int, default=30)
    ap.add_argument("--cold-specs", type=int, default=8, help="of those, how many also compile cold")
    ap.add_argument("--compile-vocab", type=int, default=128256,
                    help="synthetic vocabulary for the compile part (0: the model's tokenizer)")
    ap.add_argument("--compile-threads", type=int, default=1, help="xgrammar threads per compile")
    ap.add_argument("--parts", nargs="+", default=["compile", "masks"], choices=["compile", "masks"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="directory for cProfile tables of the constrained runs")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="only plot these results' per-round mask losses to --out (a PNG)")
    a = ap.parse_args()
    if a.plot:
        return plot_masks(a.plot, a.out or "grammar_masks.png")
    global THREADS
    THREADS = a.compile_threads

    import torch  # noqa: PLC0415

    from services.grammar.tokenizer import (  # noqa: PLC0415
        tokenizer_info_from_hf,
        tokenizer_info_from_model_dir,
    )
    model = synthetic_model_dir(a.config, a.vocab or json.loads((CONFIGS / a.config / "config.json").read_text())[
        "vocab_size"], a.tokenizer) if a.config else str(TINY)
    llm = info = None
    if "masks" in a.parts:
        from services.engine.llm import LLM  # noqa: PLC0415
        llm = LLM(model, load_format="dummy" if a.config else "auto", device=a.device,
                  max_num_seqs=max(a.batches), max_model_len=1024)
        eng = llm.engine
        info = tokenizer_info_from_hf(eng.tokenizer, eng.vocab_size, sorted(eng.eos_token_ids))
    compile_info = compile_tokenizer_info(a.compile_vocab, a.tokenizer) if a.compile_vocab else \
        info or tokenizer_info_from_model_dir(model)
    result = {"command": "python -m loadtest.bench_grammar " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
              "model": a.config or "tiny-target", "vocab_size": info.vocab_size if info else None,
              "tokenizer": a.tokenizer or ("synthetic" if a.config else "tiny-target"),
              "compile_vocab_size": compile_info.vocab_size, "compile_threads": THREADS,
              "torch_threads": torch.get_num_threads(),
              # Timings on a shared machine are only as good as its idle CPU: keep the load.
              "load_avg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
              "compile": bench_compile(compile_info, a.compile_specs, a.cold_specs) if "compile" in a.parts else None,
              "masks": bench_masks(llm, info, a.batches, a.steps, a.profile, a.rounds) if "masks" in a.parts else None,
              "load_avg_1m_end": os.getloadavg()[0]}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
