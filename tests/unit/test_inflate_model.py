"""loadtest/inflate_model.py: the inflated target computes what the tiny one does (float32, CPU)."""
from __future__ import annotations

import json

import pytest

from loadtest.inflate_model import inflate
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams

PROMPTS = ["def add(a, b):\n", "import os\nimport sys\n", "class Foo:\n    def __init__(self"]


def test_inflated_target_decodes_exactly_like_the_original(tiny_model_dir, tmp_path):
    info = inflate(tiny_model_dir, str(tmp_path), hidden_scale=4, head_scale=2, intermediate=1024, num_layers=6)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]) == (768, 8, 6)
    assert info["params"] > 4 * 2_000_000   # several times the tiny model
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    small = LLM(tiny_model_dir, device="cpu", dtype="float32", seed=0).generate(PROMPTS, params)
    big = LLM(str(tmp_path), device="cpu", dtype="float32", seed=0).generate(PROMPTS, params)
    for a, b in zip(small, big):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert b.outputs[0].cumulative_logprob == pytest.approx(a.outputs[0].cumulative_logprob, abs=1e-4)


def test_hidden_scale_must_keep_the_norms_exact(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="power of 4"):
        inflate(tiny_model_dir, str(tmp_path), hidden_scale=2)
