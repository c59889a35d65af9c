"""Engine benchmarks next to HF transformers `generate()`, in one run.

GPU (dummy weights from the configs in loadtest/configs/, bf16), per model:
  - offline throughput: 256 sequences, random input 100-1024 and output 100-1024 tokens, ignore EOS
    (nano-vllm's workload), temperature 0.6; output tokens / wall time of `LLM.generate`;
  - batch-1 decode inter-token latency (512-token prompt, 256 output tokens, greedy);
  - the HF shapes: batch 1 and 128, 128 in / 128 out, greedy, with HF `generate()` (sdpa, bf16) on
    the same config in the same run, and the ratio;
  - a phase profile of the engine's steps (schedule / forward on the GPU / sample / the rest).
CPU (`--device cpu`, for `make bench`): the tiny bundled model, our engine vs HF `generate()`.

    python -m loadtest.bench_engine --device cuda                 # all three models, ~5 min on an H100
    python -m loadtest.bench_engine --device cuda --models qwen2.5-0.5b --num-seqs 64
    python -m loadtest.bench_engine --device cuda --kv-cache-dtypes auto,fp8 --quantization none,fp8   # 4 variants
    python -m loadtest.bench_engine --device cpu

Each (model, part) runs in its own process so that the engine's KV cache is gone before HF loads.
Results: loadtest/results/engine_bench_<device>.json and PNG plots (see bench_report.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "loadtest" / "configs"
TINY = REPO / "models" / "tiny-target"
GPU_MODELS = ["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"]


# ---- workloads -----------------------------------------------------------------------------------
def offline_workload(num_seqs: int, vocab: int, seed: int = 0, lo: int = 100, hi: int = 1024):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num_seqs)]
    outputs = [rng.randint(lo, hi) for _ in range(num_seqs)]
    return prompts, outputs


def fixed_prompts(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


# ---- our engine ----------------------------------------------------------------------------------
def engine_part(model_dir: str, tokenizer: str, device: str, num_seqs: int, hf_batches: list[int],
                shape: tuple[int, int], dummy: bool, save=lambda res: None, kv_cache_dtype: str = "auto",
                quantization: str | None = None) -> dict:
    """`save(res)` is called after each measurement, so a later failure keeps the earlier numbers."""
    import torch  # noqa: PLC0415
    from services.engine.llm import LLM  # noqa: PLC0415
    from services.engine.sampling_params import SamplingParams  # noqa: PLC0415
    from loadtest.bench_report import StepProfiler  # noqa: PLC0415

    t0 = time.perf_counter()
    llm = LLM(model_dir, tokenizer=tokenizer, load_format="dummy" if dummy else "auto", device=device,
              max_num_seqs=max(num_seqs, max(hf_batches)), max_num_batched_tokens=16384 if device == "cuda" else 2048,
              max_model_len=2048 + 64, kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    engine = llm.engine
    res: dict = {"startup_s": round(time.perf_counter() - t0, 2), "num_kv_blocks": engine.runner.num_blocks,
                 "cuda_graph_buckets": engine.runner.graphs.buckets if getattr(engine.runner, "graphs", None) else [],
                 "attention_backend": type(engine.runner.backend).__name__,
                 "kv_cache_dtype": str(engine.runner.kv_dtype).removeprefix("torch."), "quantization": quantization}
    vocab = engine.vocab_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm.generate(fixed_prompts(4, 64, vocab), greedy(8))                            # warm-up
    in_len, out_len = shape
    if num_seqs:
        prompts, outs = offline_workload(num_seqs, vocab)
        params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True) for o in outs]
        sync(); t = time.perf_counter()
        done = llm.generate(prompts, params)
        sync(); wall = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in done)
        res["offline"] = {"num_seqs": num_seqs, "input_tokens": sum(map(len, prompts)), "output_tokens": n_out,
                          "wall_s": round(wall, 3), "output_tok_per_s": round(n_out / wall, 1),
                          "total_tok_per_s": round((n_out + sum(map(len, prompts))) / wall, 1)}
        save(res)
    # Batch-1 inter-token latency from the engine's own token timestamps: the median of three runs, since one
    # run moves by up to 1.7x with the host (0.74-1.26 ms for the 0.5B on one H100 machine, in one process).
    itl_in, itl_out = (512, 256) if device == "cuda" else (32, 32)
    runs = [llm.generate(fixed_prompts(1, itl_in, vocab, seed=2), greedy(itl_out))[0].metrics for _ in range(3)]
    itls = [round(1000 * (m.last_token_time - m.first_token_time) / (itl_out - 1), 3) for m in runs]
    res["itl_b1"] = {"input": itl_in, "output": itl_out, "itl_ms": sorted(itls)[1], "itl_ms_runs": itls,
                     "ttft_ms": round(1000 * (runs[0].first_token_time - runs[0].arrival_time), 2)}   # uncached
    save(res)
    for b in hf_batches:
        prompts = fixed_prompts(b, in_len, vocab, seed=3)
        sync(); t = time.perf_counter()
        done = llm.generate(prompts, greedy(out_len))
        sync(); wall = time.perf_counter() - t
        n_out = sum(len(x.outputs[0].token_ids) for x in done)
        res[f"hf_shape_b{b}"] = {"batch": b, "input": in_len, "output": out_len, "wall_s": round(wall, 3),
                                 "output_tok_per_s": round(n_out / wall, 1)}
        save(res)
    if num_seqs:   # phase profile on a smaller slice of the same workload (synchronising costs a little)
        prof = StepProfiler(engine, sync)
        prompts, outs = offline_workload(min(num_seqs, 128), vocab, seed=5)
        llm.generate(prompts, [SamplingParams(temperature=0.6, max_tokens=min(o, 100), ignore_eos=True)
                               for o in outs])
        res["profile"] = prof.summary()
        prof.detach()
    return res


# ---- HF transformers --------------------------------------------------------------------------------
def hf_part(model_dir: str, device: str, batches: list[int], shape: tuple[int, int], dummy: bool) -> dict:
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    if dummy:
        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
        cfg = model.config
    model.eval()
    res: dict = {"startup_s": round(time.perf_counter() - t0, 2)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    in_len, out_len = shape

    def gen(ids, n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    for b in batches:
        ids = torch.tensor(fixed_prompts(b, in_len, cfg.vocab_size, seed=3), device=device)
        gen(ids[:, :16], 2)                                                         # warm-up
        sync(); t = time.perf_counter()
        out = gen(ids, out_len)
        sync(); wall = time.perf_counter() - t
        n_out = (out.shape[1] - in_len) * b
        res[f"b{b}"] = {"batch": b, "input": in_len, "output": out_len, "wall_s": round(wall, 3),
                        "output_tok_per_s": round(n_out / wall, 1)}
    return res


# ---- driver -------------------------------------------------------------------------------------------
def meta(device: str) -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    info = {"command": " ".join([Path(sys.executable).name, "-m", "loadtest.bench_engine", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device == "cuda":
        import triton  # noqa: PLC0415
        info.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__, cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def ensure_tokenizer(path: str | None) -> str:
    """The tiny model's tokenizer; with dummy weights only the config's vocab matters, so without the
    tiny model a minimal word-level tokenizer is written instead."""
    if path or (TINY / "tokenizer.json").exists():
        return path or str(TINY)
    from tokenizers import Tokenizer, models  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415
    out = tempfile.mkdtemp(prefix="bench-tok-")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, "<unk>")),
                                  unk_token="<unk>", eos_token="</s>")
    tok.save_pretrained(out)
    return out


def run_child(args: list[str], timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "loadtest.bench_engine", "--child-out", out, *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        text = Path(out).read_text()
        return {**(json.loads(text) if text else {}), "error": f"timed out after {timeout_s} s: {' '.join(args)}"}
    text = Path(out).read_text()
    res = json.loads(text) if text else {}
    if proc.returncode != 0:   # keep what was measured before the failure
        res["error"] = f"exit code {proc.returncode}: {' '.join(args)}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--models", default=None, help="comma-separated config names (GPU) or model dirs")
    ap.add_argument("--num-seqs", type=int, default=None, help="offline workload size (GPU default 256)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--kv-cache-dtypes", default="auto",
                    help="comma-separated EngineConfig.kv_cache_dtype values, each run side by side ('auto,fp8')")
    ap.add_argument("--quantization", default="none",
                    help="comma-separated EngineConfig.quantization values, each run with each KV dtype ('none,fp8')")
    ap.add_argument("--child-timeout", type=float, default=600.0, help="seconds for one model's part")
    ap.add_argument("--out", default=str(REPO / "loadtest" / "results"))
    ap.add_argument("--part", choices=["engine", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--quant", default="none", help=argparse.SUPPRESS)
    a = ap.parse_args()
    gpu = a.device == "cuda"
    shape, batches = ((128, 128), [1, 128]) if gpu else ((32, 32), [1, 8])
    num_seqs = a.num_seqs if a.num_seqs is not None else (256 if gpu else 0)
    if a.part:                                     # a child: one model, one part
        model_dir = a.models
        dummy = not any(Path(model_dir).glob("*.safetensors"))   # configs alone: random weights
        def save(res: dict) -> None:
            Path(a.child_out).write_text(json.dumps(res))
            print(json.dumps(res), flush=True)

        if a.part == "engine":
            res = engine_part(model_dir, a.tokenizer, a.device, num_seqs, batches, shape, dummy, save,
                              a.kv_cache_dtype, None if a.quant == "none" else a.quant)
        else:
            res = hf_part(model_dir, a.device, batches, shape, dummy)
        save(res)
        return
    names = a.models.split(",") if a.models else (GPU_MODELS if gpu else [str(TINY)])
    tokenizer = ensure_tokenizer(a.tokenizer)
    results = {"meta": meta(a.device), "models": {}}
    for name in names:
        model_dir = str(CONFIGS / name) if gpu and (CONFIGS / name).is_dir() else name
        common = ["--device", a.device, "--models", model_dir, "--num-seqs", str(num_seqs), "--tokenizer", tokenizer]
        entry = {}
        # "engine": the model's dtype throughout; "_w8": float8 weights; "_fp8": a float8 KV cache
        for quant, kv in itertools.product(a.quantization.split(","), a.kv_cache_dtypes.split(",")):
            key = "engine" + ("" if quant == "none" else "_w8") + ("" if kv == "auto" else f"_{kv}")
            entry[key] = run_child(["--part", "engine", *common, "--kv-cache-dtype", kv, "--quant", quant],
                                   a.child_timeout)
        if not a.skip_hf:
            entry["hf"] = run_child(["--part", "hf", *common], a.child_timeout)
        results["models"][Path(name).name] = entry
        print(json.dumps({Path(name).name: entry}), flush=True)
    from loadtest.bench_report import write_report  # noqa: PLC0415
    write_report(results, Path(a.out))


if __name__ == "__main__":
    main()
