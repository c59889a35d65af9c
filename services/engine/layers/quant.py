"""Float8 weights (`EngineConfig.quantization="fp8"`): vLLM's dynamic "fp8" on a bf16 checkpoint.

At load, the weights of every decoder layer's linear layers (qkv, o, gate_up, down) become float8 e4m3
with one scale per output channel (its largest magnitude / 448); the embeddings and the lm_head stay in the
model's dtype. Activations are quantized per token as each layer runs: by the kernel that makes them where
it can (add+RMSNorm before qkv and gate_up, SiLU-and-mul before down; fused.py), by one of their own before
o_proj. The product is `torch._scaled_mm` (cuBLASLt's float8 GEMM, row-wise scales, out in the model's dtype).
A single row goes through the Triton GEMV instead, which reads the float8 weights and applies the scale at
the end.

Half the weight bytes: the decode steps of a large model read their weights in about half the time, and
prefill runs at float8 rates. The price is float8 rounding of both operands (~4 % relative error per
product on random data). Needs a GPU with float8 tensor cores (compute capability 8.9+: Ada, Hopper).
"""
from __future__ import annotations

import torch
from torch import nn

import triton
import triton.language as tl

from services.engine.layers.fused import PDL_LAUNCH, fp8_row_warps, fp8_rows, gemv, pdl_enter, store_fp8_row

_QUANTIZED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@triton.jit
def _quantize_rows_kernel(X, Q, S, K, stride_x, BLOCK: tl.constexpr):
    """One program a row: its largest magnitude sets its scale (amax / 448), so no value saturates."""
    pdl_enter()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
    store_fp8_row(Q + row * K, S + row, offs, offs < K, x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3 [M, K], float32 scales [M, 1]) with x ~= q * scale, row by row."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    block = triton.next_power_of_2(k)
    if block > 65536:
        raise ValueError(f"quantize_rows takes rows of at most 65536 values, got {k}")
    q, scale = fp8_rows(m, k, x.device)
    if m:
        _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), BLOCK=block,
                                     num_warps=fp8_row_warps(block), **PDL_LAUNCH)
    return q, scale


class Fp8Linear(nn.Module):
    """A linear layer with float8 e4m3 weights [N, K] and a float32 scale per output channel. Its input is
    activations (quantized here) or, from a kernel that quantized them as it wrote them (add+RMSNorm,
    SiLU-and-mul: models/llama.py), (q [M, K] float8, scale [M, 1])."""

    takes_fp8 = True

    def __init__(self, layer: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(layer.weight.detach())   # a row of W is an output channel
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)   # [1, N]
        self.bias = layer.bias
        self.out_dtype = layer.weight.dtype

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, tuple):
            q, scale = x
        elif x.shape[0] == 1:
            return gemv(x.contiguous(), self.weight, self.bias, scale=self.weight_scale)
        else:
            q, scale = quantize_rows(x)
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        return y + self.bias if self.bias is not None else y


def quantize_fp8_(model: nn.Module) -> int:
    """Replaces the decoder layers' linear layers by Fp8Linear in place; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name in _QUANTIZED:
            layer = getattr(module, name, None)
            # cuBLASLt's float8 GEMM takes dimensions that are multiples of 16; others stay as they are
            if isinstance(layer, nn.Linear) and not (layer.in_features % 16 or layer.out_features % 16):
                setattr(module, name, Fp8Linear(layer))
                count += 1
    return count
