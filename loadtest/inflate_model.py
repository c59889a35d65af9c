"""A large target that computes exactly what a small trained one does, for speculative-decoding
benchmarks on a GPU: the tiny bundled target is launch-bound there (a step costs what a draft pass
costs), and a real large target with a draft trained for it cannot be downloaded here. Dummy weights
give no acceptance at all. The inflated model has the small model's function and the large model's
cost, so the tiny draft proposes for it with the acceptance it really has.

    python -m loadtest.inflate_model models/tiny-target /tmp/tiny-target-1b   # ~1.1B params, bf16

How (Llama architecture, tied or untied embeddings):
- hidden size x s (s a power of 4): the original dimensions first, the rest zero in every weight that
  writes the residual stream, so the padded dimensions stay zero. RMSNorm averages over all of them:
  the mean square shrinks by s, so eps is divided by s and every norm weight by sqrt(s) (a power of 2:
  exact in bf16), and each norm's output is what it was;
- heads and KV heads x m (the GQA group stays the same, the original heads keep their KV heads): the
  new heads' q/k/v rows and o_proj columns are zero, so they add nothing;
- intermediate size to `intermediate`: padded rows and columns zero (SiLU(0) * 0 = 0);
- extra layers after the original ones: random q/k/v/gate/up (they cost what real ones do) and zero
  o_proj/down_proj, so each adds nothing to the residual stream.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def inflate(src: str, dst: str, hidden_scale: int = 16, head_scale: int = 8, intermediate: int = 8192,
            num_layers: int = 12, seed: int = 0) -> dict:
    if hidden_scale < 1 or hidden_scale & (hidden_scale - 1) or (hidden_scale.bit_length() - 1) % 2:
        raise ValueError(f"hidden_scale must be a power of 4 (exact norm scaling in bf16), got {hidden_scale}")
    src_p, dst_p = Path(src), Path(dst)
    cfg = json.loads((src_p / "config.json").read_text())
    w = load_file(str(src_p / "model.safetensors"))
    d, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
        cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    n_layers, inter = cfg["num_hidden_layers"], cfg["intermediate_size"]
    if num_layers < n_layers or intermediate < inter:
        raise ValueError("the inflated model must have at least the original's layers and intermediate size")
    D, H, KV = d * hidden_scale, heads * head_scale, kv_heads * head_scale
    norm_scale = hidden_scale ** -0.5
    gen = torch.Generator().manual_seed(seed)
    dtype = w["model.embed_tokens.weight"].dtype

    def pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype)
        out[tuple(slice(0, n) for n in t.shape)] = t
        return out

    def rand(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": pad(w["model.embed_tokens.weight"],
                                                                    (cfg["vocab_size"], D))}
    if "lm_head.weight" in w:
        out["lm_head.weight"] = pad(w["lm_head.weight"], (cfg["vocab_size"], D))
    out["model.norm.weight"] = (pad(w["model.norm.weight"].float(), (D,)) * norm_scale).to(dtype)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        if i < n_layers:
            for name in ("input_layernorm", "post_attention_layernorm"):
                out[p + name + ".weight"] = (pad(w[p + name + ".weight"].float(), (D,)) * norm_scale).to(dtype)
            for name, shape in (("self_attn.q_proj", (H * hd, D)), ("self_attn.k_proj", (KV * hd, D)),
                                ("self_attn.v_proj", (KV * hd, D)), ("self_attn.o_proj", (D, H * hd)),
                                ("mlp.gate_proj", (intermediate, D)), ("mlp.up_proj", (intermediate, D)),
                                ("mlp.down_proj", (D, intermediate))):
                out[p + name + ".weight"] = pad(w[p + name + ".weight"], shape)
        else:
            out[p + "input_layernorm.weight"] = torch.ones(D, dtype=dtype)
            out[p + "post_attention_layernorm.weight"] = torch.ones(D, dtype=dtype)
            out[p + "self_attn.q_proj.weight"] = rand((H * hd, D))
            out[p + "self_attn.k_proj.weight"] = rand((KV * hd, D))
            out[p + "self_attn.v_proj.weight"] = rand((KV * hd, D))
            out[p + "self_attn.o_proj.weight"] = torch.zeros((D, H * hd), dtype=dtype)
            out[p + "mlp.gate_proj.weight"] = rand((intermediate, D))
            out[p + "mlp.up_proj.weight"] = rand((intermediate, D))
            out[p + "mlp.down_proj.weight"] = torch.zeros((D, intermediate), dtype=dtype)
    dst_p.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst_p / "model.safetensors"))
    cfg.update(hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, head_dim=hd,
               intermediate_size=intermediate, num_hidden_layers=num_layers,
               rms_norm_eps=cfg["rms_norm_eps"] / hidden_scale)
    (dst_p / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src_p.iterdir():   # tokenizer, chat template, generation config
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, dst_p / f.name)
    return {"params": sum(t.numel() for t in out.values()), "hidden_size": D, "heads": H, "kv_heads": KV,
            "intermediate_size": intermediate, "layers": num_layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--hidden-scale", type=int, default=16, help="a power of 4")
    ap.add_argument("--head-scale", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=12)
    a = ap.parse_args()
    print(json.dumps(inflate(a.src, a.dst, a.hidden_scale, a.head_scale, a.intermediate, a.layers)))


if __name__ == "__main__":
    main()
