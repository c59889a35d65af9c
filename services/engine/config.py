"""Engine configuration: one frozen dataclass, validated on construction.

The serving layer maps its typed config (env prefix INFER_ENGINE_*) onto these fields 1:1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = str(REPO_ROOT / "models" / "tiny-target")
TINY_DRAFT = str(REPO_ROOT / "models" / "tiny-draft")


@dataclass(slots=True, frozen=True)
class EngineConfig:
    model: str = TINY_MODEL
    tokenizer: str | None = None          # defaults to `model`
    load_format: str = "auto"             # "auto" (safetensors) | "dummy" (random weights from config.json)
    dtype: str = "auto"                   # "auto" = float32 on CPU, bfloat16 on GPU
    device: str = "auto"                  # "auto" | "cpu" | "cuda"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None      # None = from kv_cache_memory_gb (CPU) / gpu_memory_utilization
    kv_cache_memory_gb: float = 0.25      # CPU KV budget when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9
    # "auto": the KV cache in the model's dtype; "fp8": float8 e4m3 with a scale of 1 (vLLM's "fp8" without
    # calibrated scales): half of bf16's bytes, so twice the cached tokens and half the bytes a decode step's
    # attention reads. Values past +-448 saturate. Not with the flex attention backend.
    kv_cache_dtype: str = "auto"
    # None: weights in `dtype`; "fp8": the decoder layers' linear weights in float8 e4m3 with a scale per output
    # channel and activations quantized per token as they run (vLLM's "fp8" on a bf16 checkpoint; GPU with
    # compute capability 8.9+ only; layers/quant.py). Half the weight bytes, at the price of float8 rounding.
    quantization: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None      # None = the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"       # "auto" | "torch" | "flex" | "triton"
    enforce_eager: bool = False           # GPU: no CUDA graphs
    # Speculative decoding (services/engine/speculator.py). The proposer object itself is handed to
    # LLMEngine(proposers=...); these are plain scalars so that INFER_ENGINE_* can set them.
    speculative_method: str | None = None        # None (off by default) | "ngram" | "draft" | "remote"
    num_speculative_tokens: int = 4              # k: most guesses per sequence per step
    speculative_adaptive: bool = True            # per-sequence k from recent acceptance and measured cost
    speculative_disable_batch_size: int | None = 32   # more running sequences than this: no speculation
    # Structured output: "auto" fills the masks of steps with 4+ constrained rows in worker processes on a
    # GPU (services/grammar/mask_worker.py) and in the engine's own process otherwise; "on": every step
    # with a constrained row in the workers (also on the CPU); "off": never.
    grammar_mask_worker: str = "auto"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"EngineConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        need(self.load_format in ("auto", "dummy"), "load_format", '"auto" or "dummy"')
        need(self.load_format == "dummy" or os.path.isdir(self.model), "model",
             "a local model directory (config.json, *.safetensors, tokenizer.json)")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
             '"auto", "float32", "bfloat16" or "float16"')
        need(self.device in ("auto", "cpu", "cuda"), "device", '"auto", "cpu" or "cuda"')
        need(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256), "block_size", "a power of two in [1, 256]")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 2, "num_kv_blocks", "None or >= 2")
        need(self.kv_cache_dtype in ("auto", "fp8"), "kv_cache_dtype", '"auto" or "fp8"')
        need(self.kv_cache_dtype == "auto" or self.attention_backend != "flex", "kv_cache_dtype",
             '"auto" with attention_backend "flex" (flex reads the cache in the model\'s dtype)')
        need(self.quantization in (None, "fp8"), "quantization", 'None or "fp8"')
        need(self.max_num_seqs >= 1, "max_num_seqs", ">= 1")
        need(self.max_num_batched_tokens >= self.block_size, "max_num_batched_tokens", ">= block_size")
        need(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "in (0, 1]")
        need(self.attention_backend in ("auto", "torch", "flex", "triton"), "attention_backend",
             '"auto", "torch", "flex" or "triton"')
        need(self.speculative_method in (None, "ngram", "draft", "remote"), "speculative_method",
             'None, "ngram", "draft" or "remote"')
        need(isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 16,
             "num_speculative_tokens", "an integer in [1, 16]")
        need(self.speculative_disable_batch_size is None or self.speculative_disable_batch_size >= 1,
             "speculative_disable_batch_size", "None or >= 1")
        need(self.grammar_mask_worker in ("auto", "on", "off"), "grammar_mask_worker", '"auto", "on" or "off"')

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model
