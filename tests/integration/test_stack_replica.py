"""The LLMServer replica in process with the real engine: speculative decoding wired from the
config (INFER_ENGINE_SPECULATIVE_METHOD=ngram) keeps greedy outputs identical to the offline API
without speculation, and the proposer really ran."""
import os
import uuid

import pytest

from services.config import StackConfig
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.serving.llm_server import LLMServer
from services.serving.wire import ReplicaRequest

pytestmark = pytest.mark.integration
PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"


async def test_ngram_speculation_from_config_is_exact(tiny_model_dir):
    if not os.path.isfile(os.path.join(tiny_model_dir, "config.json")):
        pytest.skip(f"no model at {tiny_model_dir}")
    cfg = StackConfig.from_args({"model": tiny_model_dir, "auth_disabled": True, "engine_max_model_len": 256,
                                 "engine_num_kv_blocks": 64, "engine_speculative_method": "ngram"})
    server = LLMServer(cfg)
    try:
        ids = server._tokenizer.encode(PROMPT)
        req = ReplicaRequest(uuid.uuid4().hex, ids, {"temperature": 0.0, "max_tokens": 24})
        text, tokens = "", []
        async for chunk in server.generate(req):
            assert chunk.error is None
            text += chunk.choices[0].text
            tokens += chunk.choices[0].token_ids
        stats = server._engine.engine.speculator.stats
    finally:
        server.shutdown()
    ref = LLM(tiny_model_dir, max_model_len=256, num_kv_blocks=64).generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert tokens == ref.token_ids and text == ref.text
    assert stats.num_proposed_tokens > 0
