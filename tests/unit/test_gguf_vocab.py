"""loadtest.gguf_vocab: a llama.cpp vocabulary file (GGUF metadata) becomes a working tokenizer.json."""
from __future__ import annotations

import struct

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from loadtest.gguf_vocab import CONTROL, read_metadata, write_tokenizer


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", kind) + payload


def _array(kind: int, items: list[bytes]) -> bytes:
    return struct.pack("<IQ", kind, len(items)) + b"".join(items)


def write_gguf(path, tokens: list[str], types: list[int], merges: list[str]) -> None:
    kvs = [_kv("tokenizer.ggml.model", 8, _string("gpt2")),
           _kv("tokenizer.ggml.tokens", 9, _array(8, [_string(t) for t in tokens])),
           _kv("tokenizer.ggml.token_type", 9, _array(5, [struct.pack("<i", t) for t in types])),
           _kv("tokenizer.ggml.merges", 9, _array(8, [_string(m) for m in merges])),
           _kv("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", len(tokens) - 1)),
           _kv("general.alignment", 4, struct.pack("<I", 32))]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))


def test_gguf_vocabulary_becomes_a_byte_level_tokenizer(tmp_path):
    byte_chars = sorted(ByteLevel.alphabet())          # the 256 byte-level symbols (Ġ for a space, ...)
    tokens = byte_chars + ["he", "Ġhe", "<|end|>"]
    types = [1] * (len(tokens) - 1) + [CONTROL]
    write_gguf(tmp_path / "vocab.gguf", tokens, types, ["h e", "Ġ he"])
    meta = read_metadata(tmp_path / "vocab.gguf")
    assert meta["general.alignment"] == 32 and meta["tokenizer.ggml.tokens"] == tokens
    out = write_tokenizer(tmp_path / "vocab.gguf", tmp_path / "tok")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("he he<|end|>").ids
    assert ids == [tokens.index("he"), tokens.index("Ġhe"), len(tokens) - 1]
    assert tok.decode(ids, skip_special_tokens=False) == "he he<|end|>"
