"""Offline batch generation in vLLM's shape.

    from services.engine.llm import LLM
    from services.engine.sampling_params import SamplingParams
    llm = LLM("models/tiny-target")
    for out in llm.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text)
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, proposers: dict | None = None, kv_tier=None,
                 **engine_args):
        """`proposers`: {name: services.engine.spec_decode.Proposer} for speculative decoding
        (services.draft.build_proposer makes them); `speculative_method` picks the default one."""
        config = EngineConfig(model=model, **engine_args) if model else EngineConfig(**engine_args)
        self.engine = LLMEngine(config, proposers, kv_tier=kv_tier)   # [kv-tier] optional KVTier
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Prompts are strings or token-id lists. Outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = [str(next(self._ids)) for _ in prompts]
        for i, (rid, prompt, sp) in enumerate(zip(ids, prompts, params)):
            sp = dataclasses.replace(sp, output_kind="final_only")   # only finished outputs are read
            self.engine.add_request(rid, prompt if isinstance(prompt, str) else list(prompt), sp,
                                    priority=priority[i] if priority else 0)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        prompt = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.engine.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate([ids], sampling_params)[0]
