"""Tokenizer info for xgrammar, and its fingerprint (part of every compile-cache key).

A compiled grammar is only valid for the exact vocabulary it was compiled against, so the cache
key carries a hash of the decoded vocabulary, the vocabulary type, the mask size (the model's
logits width, which may exceed the tokenizer's length) and the stop tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import xgrammar as xgr

_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def tokenizer_info_from_hf(tokenizer: Any, vocab_size: int | None = None,
                           stop_token_ids: list[int] | None = None) -> xgr.TokenizerInfo:
    """`vocab_size`: the model's logits width (config.vocab_size); ids past the tokenizer's own
    vocabulary are then never allowed by a mask."""
    if vocab_size is not None and vocab_size < len(tokenizer):
        # Models whose tokenizer has more entries than the head (added tokens never produced).
        vocab_size = len(tokenizer)
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)


def tokenizer_info_from_model_dir(model_dir: str) -> xgr.TokenizerInfo:
    """The same info the engine builds for a model directory (tokenizer + config.json)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy, only where a model dir is given
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    vocab_size, eos = None, None
    cfg_path = os.path.join(model_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        vocab_size = cfg.get("vocab_size")
        eos = cfg.get("eos_token_id")
    stop = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else None
    return tokenizer_info_from_hf(tok, vocab_size, stop)


def fingerprint(info: xgr.TokenizerInfo) -> str:
    """Hex sha256 of the vocabulary and metadata; memoised per TokenizerInfo object."""
    hit = _FINGERPRINTS.get(id(info))
    if hit is not None and hit[0] is info:
        return hit[1]
    h = hashlib.sha256(info.dump_metadata().encode())
    h.update(json.dumps(sorted(info.special_token_ids)).encode())
    for token in info.decoded_vocab:
        h.update(len(token).to_bytes(4, "little"))
        h.update(token)
    fp = h.hexdigest()[:32]
    _FINGERPRINTS[id(info)] = (info, fp)
    return fp
