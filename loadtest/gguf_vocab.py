"""A real tokenizer for the benchmarks, from a llama.cpp vocabulary file (GGUF, metadata only).

Mask work in structured output depends on what the vocabulary's tokens look like, so a synthetic
vocabulary of the right size is only an approximation. llama.cpp ships the vocabularies of the
common model families as small GGUF files (`models/ggml-vocab-*.gguf`, also inside the
llama-cpp-python source package on PyPI); this turns one (GPT-2 style byte-level BPE: Llama 3,
Qwen2) into a Hugging Face `tokenizer.json` the engine and `loadtest.bench_grammar --tokenizer` load:

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp --wildcards '*/models/ggml-vocab-llama-bpe.gguf'
    python -m loadtest.gguf_vocab /tmp/lcp/*/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf /tmp/llama3-tok

The Llama-3 tokenizer made this way encodes llama.cpp's own test texts for that file
(ggml-vocab-llama-bpe.gguf.inp / .out) to exactly the expected ids, 47 of 47.
"""
from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import BinaryIO

# GGUF value types: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
CONTROL = 3   # llama.cpp token type of special tokens (<|begin_of_text|>, ...)
# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (as in the models' own tokenizer.json); others
# get GPT-2's (ByteLevel's own regex). They change how a prompt is split, not the vocabulary.
_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _read(f: BinaryIO, fmt: str):
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _value(f: BinaryIO, kind: int):
    if kind == _STRING:
        return f.read(_read(f, "<Q")).decode("utf-8")
    if kind == _ARRAY:
        elem, n = _read(f, "<I"), _read(f, "<Q")
        return [_value(f, elem) for _ in range(n)]
    return _read(f, _SCALARS[kind])


def read_metadata(path: str | Path) -> dict:
    """The key/value metadata of a GGUF file (version 2 or 3)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _tensors, num_kv = _read(f, "<I"), _read(f, "<Q"), _read(f, "<Q")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        out = {}
        for _ in range(num_kv):
            key = _value(f, _STRING)
            out[key] = _value(f, _read(f, "<I"))
        return out


def tokenizer_json(meta: dict) -> dict:
    """A byte-level BPE tokenizer.json from GGUF tokenizer metadata (`tokenizer.ggml.model` "gpt2")."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE vocabularies (gpt2) are supported, not {meta.get('tokenizer.ggml.model')}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre_tokenizer = byte_level
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]}}


def write_tokenizer(gguf: str | Path, out_dir: str | Path) -> Path:
    """tokenizer.json + tokenizer_config.json (bos/eos from the GGUF) in `out_dir`; returns the directory."""
    meta = read_metadata(gguf)
    tokens = meta["tokenizer.ggml.tokens"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(meta), ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
              "bos_token": tokens[meta.get("tokenizer.ggml.bos_token_id", 0)],
              "eos_token": tokens[meta.get("tokenizer.ggml.eos_token_id", 0)]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    a = ap.parse_args()
    out = write_tokenizer(a.gguf, a.out_dir)
    print(f"{out}/tokenizer.json: {len(json.loads((out / 'tokenizer.json').read_text())['model']['vocab'])} tokens")


if __name__ == "__main__":
    main()
