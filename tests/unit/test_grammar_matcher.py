"""The engine's side: matchers, bitmask fill/apply (logits wider than the tokenizer), rollback,
and apply_grammar_masks over a mixed batch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import xgrammar as xgr

from services.grammar.matcher import (GrammarHandle, allocate_token_bitmask, apply_grammar_masks,
                                      apply_token_bitmask, fill_grammar_bitmask)
from services.grammar.spec import GrammarSpec

VOCAB = [b"<eos>", b"a", b"b", b"ab", b"yes", b"no", b"y", b"es", b"{", b"}", b'"', b":", b" "] + \
        [f"t{i}".encode() for i in range(40)]      # ids past 32: the bitmask's second word
EOS, A, B, AB, YES, NO, Y, ES = range(8)
MODEL_VOCAB = 70                                    # a padded head: logits wider than the tokenizer


@pytest.fixture(scope="module")
def info():
    return xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, stop_token_ids=[EOS])


def handle(info, spec: GrammarSpec) -> GrammarHandle:
    return GrammarHandle.compile(spec, info)


def allowed(logits_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(~torch.isneginf(logits_row)).flatten().tolist())


def test_fill_and_apply_masks_padded_columns(info):
    h = handle(info, GrammarSpec.choice(["yes", "no"]))
    m = h.new_matcher()
    bitmask = allocate_token_bitmask(1, h.vocab_size)
    assert m.fill_next_token_bitmask(bitmask, 0)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, [0], h.vocab_size)
    assert allowed(logits[0]) == {YES, NO, Y}
    assert torch.isneginf(logits[0, len(VOCAB):]).all()


def test_accept_terminate_and_rollback(info):
    h = handle(info, GrammarSpec.choice(["yes", "no"]))
    m = h.new_matcher()
    assert not m.accept_token(A)                 # rejected: state unchanged
    assert m.accept_token(Y) and not m.is_completed()
    m.rollback(1)
    assert m.num_accepted == 0
    assert m.accept_token(YES) and m.is_completed() and not m.is_terminated()
    bitmask = allocate_token_bitmask(1, h.vocab_size)
    m.fill_next_token_bitmask(bitmask, 0)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, None, h.vocab_size)
    assert allowed(logits[0]) == {EOS}           # complete: only a stop token
    assert m.accept_token(EOS) and m.is_terminated()
    m.fill_next_token_bitmask(bitmask, 0)        # terminated: still a valid (stop-only) row
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, None, h.vocab_size)
    assert allowed(logits[0]) == {EOS}


def test_deferred_tokens_are_taken_when_the_matcher_is_next_used(info):
    """`defer` (how the engine appends): non-stop tokens wait, and the matcher behaves as if it had
    taken them at once; a stop token is taken at once, so termination is never late."""
    h = handle(info, GrammarSpec.choice(["yes", "no"]))
    eager, lazy = h.new_matcher(), h.new_matcher()
    eager.accept_token(Y)
    lazy.defer(Y)
    assert not lazy.is_terminated() and lazy.num_accepted == 0   # not taken yet
    want, got = allocate_token_bitmask(1, h.vocab_size), allocate_token_bitmask(1, h.vocab_size)
    eager.fill_next_token_bitmask(want, 0)
    lazy.fill_next_token_bitmask(got, 0)                         # taken here
    assert torch.equal(got, want) and lazy.num_accepted == 1
    lazy.defer(ES)
    assert lazy.is_completed() and not lazy.is_terminated()
    lazy.defer(EOS)                                              # a stop token: taken now
    assert lazy.is_terminated() and lazy.num_accepted == 3


def test_high_token_ids_use_the_sign_bit_word(info):
    # t31 sits at id 44 (word 1, bit 12); t19 at id 32 (word 1, bit 0); id 31 = t18 (word 0, bit 31).
    h = handle(info, GrammarSpec.choice(["t18", "t19", "t31"]))
    m = h.new_matcher()
    assert m.accept_token(VOCAB.index(b"t18")) and m.accept_token(EOS) and m.is_terminated()
    bitmask = allocate_token_bitmask(1, h.vocab_size)
    m.fill_next_token_bitmask(bitmask, 0)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, None, h.vocab_size)
    assert allowed(logits[0]) == {EOS}
    m2 = h.new_matcher()
    m2.fill_next_token_bitmask(bitmask, 0)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask, None, h.vocab_size)
    assert {31, 32, 44} <= allowed(logits[0])


def fake_request(matcher=None, grammar=None, min_tokens=0, num_output_tokens=0):
    """Only the fields apply_grammar_masks reads (the engine's Request has them all)."""
    return SimpleNamespace(matcher=matcher, num_output_tokens=num_output_tokens,
                           sampling_params=SimpleNamespace(grammar=grammar, min_tokens=min_tokens))


def test_mixed_batch_masks_only_constrained_rows(info):
    h = handle(info, GrammarSpec.regex("a+b"))
    reqs = [fake_request(), fake_request(h.new_matcher(), h), fake_request(), fake_request(h.new_matcher(), h)]
    reqs[3].matcher.accept_token(A)
    logits = torch.randn(4, MODEL_VOCAB)
    before = logits.clone()
    apply_grammar_masks(logits, reqs)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert allowed(logits[1]) == {A, AB}
    assert allowed(logits[3]) == {A, B, AB}
    assert torch.equal(logits[1, A], before[1, A])     # allowed logits keep their values


def test_prefilled_bitmask_is_used(info):
    h = handle(info, GrammarSpec.choice(["no"]))
    reqs = [fake_request(h.new_matcher(), h)]
    filled = fill_grammar_bitmask(reqs)
    assert filled is not None and filled.rows == [0] and filled.vocab_size == len(VOCAB)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_grammar_masks(logits, reqs, filled)
    assert allowed(logits[0]) == {NO}
    assert fill_grammar_bitmask([fake_request()]) is None


def test_grammar_wins_over_a_min_tokens_ban(info):
    # The sampler bans EOS before min_tokens; a complete grammar allows nothing else.
    h = handle(info, GrammarSpec.choice(["no"]))
    m = h.new_matcher()
    m.accept_token(NO)
    reqs = [fake_request(m, h, min_tokens=5, num_output_tokens=1)]
    logits = torch.randn(1, MODEL_VOCAB)
    logits[0, EOS] = float("-inf")
    apply_grammar_masks(logits, reqs)
    assert allowed(logits[0]) == {EOS}


def test_handles_survive_serialization(info):
    compiled = handle(info, GrammarSpec.builtin("iso_date")).compiled
    h = GrammarHandle.from_serialized(compiled.serialize_json(), info, spec_hash="x")
    m = h.new_matcher()
    assert m._m.accept_string("2024-01-31") and m.is_completed()
    assert h.tokenizer_fingerprint and "vocab_size=53" in repr(h)
