"""Build a model from a Hugging Face directory: real weights from *.safetensors, or random ("dummy")
weights from config.json alone (benchmarks of real architectures without downloads).

HF checkpoints keep q/k/v and gate/up as separate tensors; they are copied into the fused
`qkv_proj` / `gate_up_proj` of our layers here.
"""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig

from services.engine.models.llama import ARCHITECTURES

# HF name fragment -> (our fused parameter, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def load_config(model_dir: str):
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def build_model(hf_config, load_format: str, model_dir: str, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> torch.nn.Module:
    arch = (getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"model architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    with torch.device(device):
        model = ARCHITECTURES[arch](hf_config)
    model = model.to(dtype)
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        _load_safetensors(model, model_dir)
    return model.eval()


def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.data.normal_(0.0, 0.02, generator=gen)  # on the device: 8B parameters in seconds


def _shard_offsets(module: torch.nn.Module, fused: str, shard: int) -> tuple[int, int]:
    if fused == "qkv_proj":
        sizes = [module.q_size, module.kv_size, module.kv_size]
    else:
        sizes = [module.intermediate] * 2
    return sum(sizes[:shard]), sizes[shard]


def _load_safetensors(model: torch.nn.Module, model_dir: str) -> None:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors in {model_dir}; pass load_format='dummy' for random weights")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                tensor = f.get_tensor(name)
                if name == "lm_head.weight" and tied:
                    continue
                parts = name.split(".")
                if len(parts) >= 2 and parts[-2] in _FUSED:
                    fused, shard = _FUSED[parts[-2]]
                    parent = ".".join(parts[:-2])
                    target = f"{parent}.{fused}.{parts[-1]}"
                    start, size = _shard_offsets(modules[parent], fused, shard)
                    params[target].data[start:start + size].copy_(tensor)
                    loaded.add(f"{target}#{shard}")
                    continue
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in {path}")
                params[name].data.copy_(tensor)
                loaded.add(name)
    missing = [n for n in params if n not in loaded and not any(k.startswith(n + "#") for k in loaded)]
    if tied:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {missing[:5]}{'...' if len(missing) > 5 else ''}")
