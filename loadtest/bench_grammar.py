"""Structured-output benchmark: compile time per spec kind, and the per-step cost of grammar masks
in the engine beside unconstrained decoding, at batch 1 and 32.

    python -m loadtest.bench_grammar                                   # CPU, tiny model (2k vocab)
    python -m loadtest.bench_grammar --device cuda --config llama-3.2-1b --vocab 128256

Compile: N distinct specs per kind (so no cache helps), compiled in-process as a compile worker
does (xgrammar, one thread); median / p99 milliseconds, plus the cost of shipping a compiled
grammar (serialize_json + deserialize_json) and of a cache hit.
Masks: steady-state decoding with `batch` sequences always in flight (each runs 48 tokens, then
is replaced by a new one with a 4-token prompt); per-step time and output tokens/s with every row
constrained by a JSON Schema (one that cannot complete within 48 tokens, so both modes decode the
same lengths) vs no constraint, and the mask time per step (fill on the CPU + apply on the device)
from the engine's own metric.
`--vocab N` with `--config NAME` (loadtest/configs/NAME, dummy weights) uses a synthetic
byte-level vocabulary of N tokens (the tiny tokenizer's plus concatenations of its tokens), since
mask work grows with the vocabulary. Output: JSON (stdout and --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
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


def bench_compile(info, n: int) -> dict:
    import xgrammar as xgr  # noqa: PLC0415

    from services.grammar.cache import GrammarCache  # noqa: PLC0415
    from services.grammar.compiler import compile_spec  # noqa: PLC0415
    from services.grammar.spec import GrammarLimits  # noqa: PLC0415
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    limits, rng, out = GrammarLimits(), random.Random(0), {}
    for kind in ("json_schema", "regex", "gbnf", "choice", "json_object"):
        times, ser, deser, size = [], [], [], []
        for i in range(n if kind != "json_object" else 2):
            spec = spec_for(kind, i, rng)
            t0 = time.perf_counter()
            compiled = compile_spec(compiler, spec, limits)
            t1 = time.perf_counter()
            text = compiled.serialize_json()
            t2 = time.perf_counter()
            xgr.CompiledGrammar.deserialize_json(text, info)
            t3 = time.perf_counter()
            times.append((t1 - t0) * 1e3)
            ser.append((t2 - t1) * 1e3)
            deser.append((t3 - t2) * 1e3)
            size.append(len(text))
        out[kind] = {"n": len(times), "compile_ms_median": statistics.median(times),
                     "compile_ms_p99": percentile(times, 0.99), "serialize_ms_median": statistics.median(ser),
                     "deserialize_ms_median": statistics.median(deser), "serialized_kb_median": statistics.median(size) / 1024}
    cache = GrammarCache()
    cache.put("fp", "k", text)
    t0 = time.perf_counter()
    for _ in range(1000):
        cache.get("fp", "k")
    out["cache_hit_ms"] = (time.perf_counter() - t0)  # 1000 lookups → ms each
    return out


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
    return {"tokens_per_s": (eng.generation_tokens_total - tok0) / wall,
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


def bench_masks(llm, info, batches: list[int], steps: int) -> dict:
    from services.engine.sampling_params import SamplingParams  # noqa: PLC0415
    from services.grammar.matcher import GrammarHandle  # noqa: PLC0415
    from services.grammar.spec import GrammarSpec  # noqa: PLC0415
    handle = GrammarHandle.compile(GrammarSpec.json_schema(DECODE_SCHEMA), info)
    max_tokens = MAX_TOKENS
    out = {}
    for b in batches:
        free = steady_state(llm, b, lambda: SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True),
                            steps, warmup=4)
        cons = steady_state(llm, b, lambda: SamplingParams(temperature=1.0, max_tokens=max_tokens, grammar=handle),
                            steps, warmup=4)
        out[f"batch_{b}"] = {"unconstrained": free, "json_schema": cons,
                             "throughput_loss_pct": 100.0 * (1 - cons["tokens_per_s"] / free["tokens_per_s"]),
                             "step_time_overhead_pct": 100.0 * (cons["step_ms_median"] / free["step_ms_median"] - 1),
                             # Host time spent on masks per step, relative to an unconstrained step: the
                             # part that cannot hide behind the forward pass on the CPU (noise-free).
                             "mask_share_of_step_pct": 100.0 * cons["mask_ms_per_step"] / free["step_ms_median"]}
    return out


# ---- a synthetic large vocabulary --------------------------------------------------------------
def synthetic_model_dir(config: str, vocab: int) -> str:
    """config.json from loadtest/configs/<config> (dummy weights) + the tiny tokenizer's vocabulary
    grown to `vocab` byte-level tokens made of concatenated tiny tokens (deterministic)."""
    d = Path(tempfile.mkdtemp(prefix="grammar-bench-"))
    cfg = json.loads((CONFIGS / config / "config.json").read_text())
    cfg["vocab_size"] = vocab
    cfg["eos_token_id"] = cfg["bos_token_id"] = 0
    (d / "config.json").write_text(json.dumps(cfg))
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
    (d / "tokenizer.json").write_text(json.dumps(tok))
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (TINY / f).exists():
            shutil.copy(TINY / f, d / f)
    return str(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=None, help="loadtest/configs/NAME with dummy weights (else the tiny model)")
    ap.add_argument("--vocab", type=int, default=None, help="synthetic vocabulary size (with --config)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--compile-specs", type=int, default=30)
    ap.add_argument("--parts", nargs="+", default=["compile", "masks"], choices=["compile", "masks"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch  # noqa: PLC0415

    from services.engine.llm import LLM  # noqa: PLC0415
    from services.grammar.tokenizer import tokenizer_info_from_hf  # noqa: PLC0415
    model = synthetic_model_dir(a.config, a.vocab or json.loads((CONFIGS / a.config / "config.json").read_text())[
        "vocab_size"]) if a.config else str(TINY)
    llm = LLM(model, load_format="dummy" if a.config else "auto", device=a.device, max_num_seqs=max(a.batches),
              max_model_len=1024)
    eng = llm.engine
    info = tokenizer_info_from_hf(eng.tokenizer, eng.vocab_size, sorted(eng.eos_token_ids))
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
              "model": a.config or "tiny-target", "vocab_size": info.vocab_size,
              "torch_threads": torch.get_num_threads(),
              # Step timings on a shared machine are only as good as its idle CPU: keep the load.
              "load_avg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
              "compile": bench_compile(info, a.compile_specs) if "compile" in a.parts else None,
              "masks": bench_masks(llm, info, a.batches, a.steps) if "masks" in a.parts else None}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
