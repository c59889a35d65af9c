"""Incremental detokenization: text decoded token by token (stop strings set) and text decoded only
when read (no stop strings) both equal one decode of the whole output, on the tiny model's tokenizer."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from services.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


PROMPT = [5, 6, 7, 8, 9, 10, 11]


def run(tok, ids, stop, read_every):
    d = IncrementalDetokenizer(tok, PROMPT, True, stop, False)
    streamed = ""
    for i, t in enumerate(ids):
        assert d.add_token(t) is None
        if read_every and i % read_every == 0:
            streamed += d.take_delta(False)
    d.flush()
    return streamed + d.take_delta(True), d.text


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(1, 2047), min_size=1, max_size=40), read_every=st.sampled_from([0, 1, 3]))
def test_lazy_and_eager_decoding_agree(tokenizer, ids, read_every):
    whole = tokenizer.decode(PROMPT[-6:] + ids, skip_special_tokens=True)[len(tokenizer.decode(PROMPT[-6:], skip_special_tokens=True)):]
    never = "\x00never"                    # a stop string that cannot occur: the eager path
    eager_stream, eager_text = run(tokenizer, ids, [never], read_every)
    lazy_stream, lazy_text = run(tokenizer, ids, [], read_every)
    assert lazy_text == eager_text == whole
    assert lazy_stream == eager_stream == whole
