"""Microbenchmark of the paged attention backends (TorchAttention, Triton, Flex) on the GPU.

    python -m loadtest.bench_attention [--out loadtest/results] [--sweep]

Shapes: decode at batch 256 (Qwen2.5-0.5B and Llama-8B heads), batch-1 decode over a long context,
prefill, and prefill over a cached prefix. Median times by triton.testing.do_bench (CUDA events),
each backend checked against TorchAttention first; the effective bandwidth counts the K/V bytes
that must be read once. "triton_fp8" reads a float8 copy of the cache (EngineConfig.kv_cache_dtype="fp8";
its error is float8's rounding of K and V). `--sweep` also times the decode shapes over Triton tile
configurations, bf16 and float8. Writes attention_backends.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))
from paged_inputs import random_paged_inputs, rel_err  # noqa: E402

from services.engine.layers.attention import TorchAttention  # noqa: E402
from services.engine.layers.gpu_attention import TritonAttention, make_backend  # noqa: E402

rng = random.Random(0)
SHAPES = {  # name: (query lens, context lens, heads, kv heads, head dim)
    "decode_b256_qwen0.5b": ([1] * 256, [rng.randint(100, 2000) for _ in range(256)], 14, 2, 64),
    "decode_b256_llama8b": ([1] * 256, [rng.randint(100, 2000) for _ in range(256)], 32, 8, 128),
    "decode_b1_ctx1024_llama8b": ([1], [1024], 32, 8, 128),
    "decode_b1_ctx1024_qwen0.5b": ([1], [1024], 14, 2, 64),
    "prefill_8x1024_llama8b": ([1024] * 8, [0] * 8, 32, 8, 128),
    "prefix_4x256_on_768_llama8b": ([256] * 4, [768] * 4, 32, 8, 128),
}


def timed(impl, q, k, v, cache, meta, d, ref, kv_values) -> dict:
    """Median time, error against ref, and the K/V bytes read a second (kv_values of the cache's dtype)."""
    err = rel_err(impl.forward(q, k, v, cache, meta, d ** -0.5), ref)
    ms = triton.testing.do_bench(lambda: impl.forward(q, k, v, cache, meta, d ** -0.5), warmup=25, rep=100,
                                 return_mode="median")
    kv_bytes = kv_values * cache[0].element_size()
    return {"ms": round(ms, 4), "rel_err": float(f"{err:.2e}"), "kv_GBps": round(kv_bytes / ms / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="loadtest/results")
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "shapes": {}}
    for name, (ql, cl, h, kvh, d) in SHAPES.items():
        q, k, v, cache, meta = random_paged_inputs(ql, cl, h, kvh, d, dtype=torch.bfloat16, device="cuda")
        kv_values = 2 * sum(c + n for c, n in zip(cl, ql)) * kvh * d
        ref = TorchAttention().forward(q, k, v, cache, meta, d ** -0.5)
        fp8 = tuple(t.to(torch.float8_e4m3fn) for t in cache)
        row = {}
        for backend in ("torch", "triton", "triton_fp8", "flex"):
            try:
                impl = TorchAttention() if backend == "torch" else make_backend(backend.removesuffix("_fp8"))
                c = fp8 if backend.endswith("_fp8") else cache
                row[backend] = timed(impl, q, k, v, c, meta, d, ref, kv_values)
            except Exception as e:  # a backend that fails on a shape is reported, not fatal
                row[backend] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if a.sweep and name.startswith("decode"):
            impl = TritonAttention()
            for c, label in ((cache, "bf16"), (fp8, "fp8")):
                for tile in [(n, w, st) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]:
                    impl.decode_tile = tile
                    row[f"sweep_{label}_{'_'.join(map(str, tile))}"] = timed(impl, q, k, v, c, meta, d, ref, kv_values)
        results["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_backends.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
