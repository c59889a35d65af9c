"""Fused GPU kernels (layers/fused.py: `sample_rows`, `gemv`) in Triton's interpreter, on the CPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the GPU tests run the compiled kernel")

from services.engine.layers import fused  # noqa: E402


@pytest.mark.parametrize("splits", [None, 2, 3])
def test_split_rows_draw_what_one_program_a_row_draws(splits):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5000, generator=g) * 4
    logits[2, 100:] = float("-inf")                       # everything past the first chunk masked
    temp = torch.tensor([0.0, 0.8, 1.3])
    one, one_lp = fused.sample_rows(logits, temp, seed=7, splits=1)
    tokens, lps = fused.sample_rows(logits, temp, seed=7, splits=splits)
    assert torch.equal(tokens, one)
    assert tokens[0] == logits[0].argmax() and tokens[2] < 100
    torch.testing.assert_close(lps, one_lp)
    torch.testing.assert_close(lps, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))


@pytest.mark.parametrize("n,k,bias", [(1152, 896, True), (896, 4864, False), (37, 100, False)])
def test_gemv_is_a_one_row_linear(n, k, bias):
    g = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    torch.testing.assert_close(fused.gemv(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
