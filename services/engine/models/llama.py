"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5) over a paged KV cache.

Weights keep Hugging Face's names except for two fusions done at load time (see loader.py):
q/k/v projections into `qkv_proj` and gate/up into `gate_up_proj`, so each layer runs 4 GEMMs.
The forward takes a flat batch of tokens from many sequences, [num_tokens], with their
positions; attention reads and writes the paged cache through an `AttentionBackend`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.layers.attention import AttentionBackend, AttentionMetadata
from services.engine.layers.rotary import RotaryEmbedding

try:   # fused Triton kernels for the GPU path (layers/fused.py); the CPU runs the eager reference
    from services.engine.layers import fused
except ImportError:   # pragma: no cover - no Triton
    fused = None


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(x)`; a single row on the GPU goes through the Triton GEMV (batch-1 decode, a sampled row).
    A float8 layer (layers/quant.py: Fp8Linear) picks its own kernels."""
    if not isinstance(layer, nn.Linear):
        return layer(x)
    if fused is not None and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and layer.weight.stride(1) == 1:
        return fused.gemv(x.contiguous(), layer.weight, layer.bias)
    return layer(x)


def fp8_input(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel that makes x should hand `layer` float8 rows instead (layers/quant.py): a float8
    layer, and more than one row (a single row goes through the GEMV, which reads x as it is)."""
    return getattr(layer, "takes_fp8", False) and x.shape[0] > 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, quant: bool = False):
        """The residual stream: returns (norm(x + residual), x + residual); residual None means x alone.
        `quant` (GPU): the norm comes as float8 rows and their scales, for a float8 layer (layers/quant.py)."""
        if x.is_cuda and fused is not None:
            if residual is None:
                return fused.add_rms_norm(x, None, self.weight, self.eps, quant), x
            return fused.add_rms_norm(x, residual, self.weight, self.eps, quant), residual   # residual in place
        x = x if residual is None else residual + x
        return self(x), x


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        # Qwen2 always has q/k/v biases; Llama/Mistral only with attention_bias.
        bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        qkv = linear(x, self.qkv_proj)                             # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda and fused is not None and getattr(backend, "fuses_rotary", False):
            out = backend.forward(q, k, v, kv_cache, meta, self.scale,   # RoPE inside the K/V write's launch
                                  rotary=(positions, self.rotary.cos, self.rotary.sin))
        else:
            if q.is_cuda and fused is not None:
                fused.rotary_(q, k, positions, self.rotary.cos, self.rotary.sin)
            else:
                q, k = self.rotary(positions, q, k)
            out = backend.forward(q, k, v, kv_cache, meta, self.scale)  # [T, H, D]
        return linear(out.reshape(-1, self.q_size), self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj)
        if gate_up.is_cuda and fused is not None:
            return linear(fused.silu_and_mul(gate_up, fp8_input(self.down_proj, gate_up)), self.down_proj)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, kv_cache, meta, backend):
        """The residual add is deferred into the next norm: returns (this layer's MLP output, residual)."""
        h, residual = self.input_layernorm.add_norm(x, residual, fp8_input(self.self_attn.qkv_proj, x))
        h = self.self_attn(h, positions, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm.add_norm(h, residual, fp8_input(self.mlp.gate_up_proj, h))
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary = RotaryEmbedding.from_config(cfg, head_dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary  # registered once; the layers share it


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [T]. Returns hidden states [T, hidden]; `compute_logits` on the rows needed."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, kv in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv, meta, backend)
        return self.model.norm.add_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits; `out`: written there (a CUDA graph's static buffer)."""
        logits = linear(hidden, self.lm_head)
        return logits.float() if out is None else out.copy_(logits)


ARCHITECTURES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
