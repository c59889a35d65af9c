"""AsyncEngine: streaming from the background loop, cancellation frees KV, errors reach the caller."""
from __future__ import annotations

import asyncio

import pytest

from services.engine.async_engine import AsyncEngine, EngineDeadError
from services.engine.config import EngineConfig
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = AsyncEngine(EngineConfig(model=tiny_model_dir, num_kv_blocks=128))
    yield eng
    eng.shutdown()


async def collect(engine, ids, params, rid):
    text, last = "", None
    async for out in engine.generate(ids, params, rid):
        text += out.outputs[0].delta_text
        last = out
    return text, last


async def test_concurrent_streams_equal_offline(engine, tiny_model_dir):
    tok = engine.tokenizer
    prompts = [tok.encode(p) for p in ("def a():", "import json\n", "class Parser:")]
    params = SamplingParams(temperature=0, max_tokens=16)
    results = await asyncio.gather(*[collect(engine, ids, params, f"c{i}") for i, ids in enumerate(prompts)])
    offline = LLM(tiny_model_dir, num_kv_blocks=128).generate(prompts, params)
    for (text, last), ref in zip(results, offline):
        assert text == last.outputs[0].text == ref.outputs[0].text
        assert last.outputs[0].token_ids == ref.outputs[0].token_ids


async def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    baseline = engine.stats().num_free_blocks
    ids = engine.tokenizer.encode("def long_function():\n" * 5)
    stream = engine.generate(ids, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True), "cancel-me")
    async for out in stream:
        if len(out.outputs[0].token_ids) >= 3:
            break
    await stream.aclose()
    for _ in range(50):
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_free_blocks == baseline:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().num_running == 0 and engine.stats().num_free_blocks == baseline


async def test_task_cancellation_aborts(engine):
    ids = engine.tokenizer.encode("while True:")
    task = asyncio.create_task(collect(engine, ids, SamplingParams(max_tokens=400, ignore_eos=True), "task"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):
        if engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().num_running == 0
    engine.check_health()


async def test_bad_request_raises_before_admission(engine):
    with pytest.raises(ValueError, match="max_tokens"):
        await collect(engine, [1, 2, 3], SamplingParams(max_tokens=10**6), "bad")
    assert engine.stats().num_waiting == 0


async def test_step_failure_reaches_callers_and_health(tiny_model_dir):
    eng = AsyncEngine(EngineConfig(model=tiny_model_dir, num_kv_blocks=32))

    def broken_step():
        raise RuntimeError("device lost")
    eng.engine.step = broken_step
    with pytest.raises(EngineDeadError, match="device lost"):
        await collect(eng, [1, 2, 3], SamplingParams(max_tokens=4), "doomed")
    with pytest.raises(EngineDeadError):
        eng.check_health()
    assert not eng.stats().is_alive
