"""Batch-1 linear layers on the GPU: cuBLAS (F.linear) against the Triton GEMV (layers/fused.py `gemv`).

    python -m loadtest.bench_gemv [--out loadtest/results/gemv_h100.json] [--sweep]

Shapes: every linear layer of the Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B configurations at one
token (qkv with Qwen's bias, o, gate_up, down, lm_head), bf16. Times are medians of CUDA-graph
replays (triton.testing.do_bench_cudagraph), so launch cost is left out as it is inside the decode
graph, over enough copies of each weight to overflow the L2 cache; bandwidth counts the weight bytes.
--sweep also times 40 other block shapes (how gemv_blocks' choice was made).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from services.engine.layers import fused

CONFIGS = Path(__file__).resolve().parent / "configs"


def shapes() -> list[tuple[str, int, int, bool]]:
    out = []
    for name in ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"):
        c = json.loads((CONFIGS / name / "config.json").read_text())
        h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        d = c.get("head_dim") or h // heads
        bias = c["model_type"] == "qwen2"
        out += [(f"{name} qkv", (heads + 2 * kv) * d, h, bias), (f"{name} o", h, heads * d, False),
                (f"{name} gate_up", 2 * c["intermediate_size"], h, False),
                (f"{name} down", h, c["intermediate_size"], False), (f"{name} lm_head", c["vocab_size"], h, False)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="loadtest/results/gemv_h100.json")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, n, k, has_bias in shapes():
        # Enough copies of the weight to overflow the 50 MB L2, run back to back as in a decode step:
        # every call reads its weight from HBM, not from the cache the previous call left.
        copies = max(1, min(64, -(-128 * 2 ** 20 // (n * k * 2))))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if has_bias else None
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0], b)
        err = ((fused.gemv(x, ws[0], b).float() - ref.float()).abs().max() / ref.float().abs().max()).item()

        def per_call(fn) -> float:
            return do_bench_cudagraph(lambda: [fn(w) for w in ws]) / copies

        gb = n * k * 2 / 1e9
        cublas = per_call(lambda w: F.linear(x, w, b))
        triton_ms = per_call(lambda w: fused.gemv(x, w, b))
        row = {"layer": name, "n": n, "k": k, "weight_mb": round(gb * 1e3, 2), "cublas_us": round(cublas * 1e3, 2),
               "gemv_us": round(triton_ms * 1e3, 2), "cublas_tb_s": round(gb / cublas, 2),
               "gemv_tb_s": round(gb / triton_ms, 2), "speedup": round(cublas / triton_ms, 3),
               "blocks": fused.gemv_blocks(n, k), "max_rel_err": round(err, 5)}
        if args.sweep:
            sweep = {}
            for bn in (1, 2, 4, 8):
                for bk in (512, 1024, 2048, 4096):
                    for warps in (4, 8):
                        if bk > 2 * triton.next_power_of_2(k) or bn * bk > 8192:
                            continue
                        t = per_call(lambda w: fused.gemv(x, w, b, (bn, bk, warps)))
                        sweep[f"{bn}x{bk}w{warps}"] = round(t * 1e3, 2)
            row["sweep"] = sweep
            best = min(sweep, key=sweep.get)
            row["sweep_best"], row["sweep_best_us"] = best, sweep[best]
        print(json.dumps(row), flush=True)
        rows.append(row)
    total = {m: round(sum(r[f"{m}_us"] for r in rows), 2) for m in ("cublas", "gemv")}
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "command": "python -m loadtest.bench_gemv", "layers": rows,
              "sum_us": total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
