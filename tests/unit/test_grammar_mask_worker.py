"""The grammar mask worker (services/grammar/mask_worker.py): a real worker process filling masks from
mirrored matchers gives exactly the rows the engine's own matchers give, catches up after steps it
missed, drops and rebuilds mirrors alike on both sides, sets its flag once its rows are filled, and
when it dies the engine fills in process with nothing lost, the rows a GPU waits for included."""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

import pytest
import torch

from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.grammar.mask_worker import EXPIRE_STEPS, MaskWorker
from services.grammar.matcher import GrammarHandle, fill_grammar_bitmask
from services.grammar.spec import GrammarSpec
from services.grammar.tokenizer import tokenizer_info_from_hf

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
PROMPTS = ["Describe a person as JSON:", "x = ", "hello"]


@pytest.fixture(scope="module")
def info(tiny_model_dir):
    eng = LLM(tiny_model_dir, num_kv_blocks=64, block_size=16).engine
    return tokenizer_info_from_hf(eng.tokenizer, eng.vocab_size, sorted(eng.eos_token_ids))


@dataclass
class Seq:
    """What the worker reads of a Request."""
    matcher: object
    sampling_params: object
    arrival_seq: int
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2])
    token_ids: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Params:
    grammar: object


def run(llm: LLM, handles) -> list[list[tuple[str, str]]]:
    js, choice = handles
    params = [SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=40, grammar=js),
              SamplingParams(temperature=1.0, max_tokens=20, grammar=choice),
              SamplingParams(temperature=1.0, max_tokens=20)]
    return [[(c.text, c.finish_reason) for c in o.outputs] for o in llm.generate(PROMPTS, params)]


def compile_both(info):
    return (GrammarHandle.compile(GrammarSpec.json_schema(PERSON), info),
            GrammarHandle.compile(GrammarSpec.choice(["yes", "no", "maybe"]), info))


def test_engine_outputs_are_the_same_with_the_worker(tiny_model_dir, info):
    handles = compile_both(info)
    want = run(LLM(tiny_model_dir, num_kv_blocks=256, block_size=16, grammar_mask_worker="off"), handles)
    llm = LLM(tiny_model_dir, num_kv_blocks=256, block_size=16, grammar_mask_worker="on")
    assert run(llm, handles) == want
    worker = llm.engine.mask_worker
    assert not worker.failed and worker._step > 10
    llm.engine.mask_worker.close()


def test_mirrors_catch_up_expire_and_come_back(info):
    """Rows filled by the worker equal the in-process fill after lagging several tokens, after `newest`
    tokens not appended yet, and after the mirror expired and was rebuilt from all the tokens."""
    js, choice = compile_both(info)
    worker = MaskWorker(4, info.vocab_size, processes=2)   # a and b in different processes
    a = Seq(js.new_matcher(), Params(js), arrival_seq=1)
    b = Seq(choice.new_matcher(), Params(choice), arrival_seq=2)

    def same(seqs, newest=None):
        assert worker.submit(seqs, newest)
        got = worker.collect()
        assert got is not None and got.rows == [i for i, s in enumerate(seqs) if s.matcher is not None]
        want = fill_grammar_bitmask(seqs)
        for i in got.rows:
            assert torch.equal(got.bitmask[i], want.bitmask[i]), i

    def take(seq, tokens):   # what the engine does when it appends tokens
        for t in tokens:
            assert seq.matcher.accept_token(t)
            seq.token_ids.append(t)

    tokens = _greedy_tokens(js, info, 8)
    same([a, b])
    assert not os.path.exists(worker._path)      # every worker has it mapped: the shared file is unlinked
    take(a, tokens[:5])                           # five tokens behind: the mirror takes them at once
    same([a, b])
    take(a, tokens[5:6])
    a.token_ids.pop()                             # step n's tokens, not appended yet: sent as `newest`
    b_token = _greedy_tokens(choice, info, 1)[0]
    assert b.matcher.accept_token(b_token)
    same([b, a], newest=[b_token, tokens[5]])
    a.token_ids.append(tokens[5])
    b.token_ids.append(b_token)
    for _ in range(2 * EXPIRE_STEPS):             # `a` unused: both sides drop its mirror
        same([b])
    assert a.arrival_seq not in worker._mirrors
    take(a, tokens[6:8])
    same([a])                                     # rebuilt from all of a's tokens
    assert worker._mirrors[a.arrival_seq][0] == 2 + 8
    # The next step samples only some of the submitted rows, in another order: rows are picked.
    plain = Seq(None, Params(None), arrival_seq=3)
    assert worker.submit([a, plain, b])
    got = worker.collect(order=[2, 1])
    want = fill_grammar_bitmask([b, plain])
    assert got.rows == [0] and got.bitmask.shape[0] == 2 and torch.equal(got.bitmask[0], want.bitmask[0])
    assert worker.submit([a, plain, b]) and worker.collect(order=[]) is None   # nothing constrained goes on
    assert worker._done.tolist() == [worker._step & 0xFF] * 2   # each worker's last submission, filled
    worker.close()


def test_steps_with_the_same_rows_send_only_their_new_tokens(info):
    """Overlapped decoding submits the same rows step after step, each lacking only its newest token
    (`newest`): only those tokens go, and the rows stay equal to the in-process fill through an expiry,
    a row that joins, one that leaves until its mirror expires, and its return with tokens it missed."""
    handle = GrammarHandle.compile(GrammarSpec.regex("[a-z]{0,400}"), info)
    worker = MaskWorker(4, info.vocab_size, processes=2)
    a, b, c = (Seq(handle.new_matcher(), Params(handle), arrival_seq=k) for k in (1, 2, 3))
    tokens = _greedy_tokens(handle, info, 4 * EXPIRE_STEPS)
    slow, layout_for = [], worker._layout_for
    worker._layout_for = lambda *args: slow.append(worker._step + 1) or layout_for(*args)

    def next_token(seq):
        return tokens[len(seq.token_ids) - 2]

    def step(seqs):
        assert worker.submit(seqs, [next_token(s) for s in seqs])
        got = worker.collect()
        for s in seqs:                                # appended after the submission, as the engine does
            t = next_token(s)
            assert s.matcher.accept_token(t)
            s.token_ids.append(t)
        want = fill_grammar_bitmask(seqs)
        for i in range(len(seqs)):
            assert torch.equal(got.bitmask[i], want.bitmask[i]), (worker._step, i)

    for _ in range(EXPIRE_STEPS + 4):                 # one full submission, then tokens alone
        step([a, b])
    assert slow == [1]
    step([a, b, c])                                   # c joins: a full submission, then tokens again
    step([a, b, c])
    assert slow == [1, EXPIRE_STEPS + 5]
    for _ in range(2 * EXPIRE_STEPS):                 # b leaves: its mirror expires on both sides
        step([a, c])
    assert b.arrival_seq not in worker._mirrors
    for t in tokens[len(b.token_ids) - 2:][:3]:       # b goes on without the worker, then comes back
        assert b.matcher.accept_token(t)
        b.token_ids.append(t)
    step([a, b, c])
    step([c, b, a])                                   # the same sequences in other rows: a full submission
    step([c, b, a])
    assert len(slow) == 5
    worker.close()


def test_submission_numbers_wrap_alike_on_both_sides(info):
    """Submissions are numbered in the futex word's 31 bits: across the wrap, full and tokens-only
    submissions still fill the rows the in-process fill gives."""
    handle = GrammarHandle.compile(GrammarSpec.regex("[a-z]{0,100}"), info)
    worker = MaskWorker(4, info.vocab_size, processes=2)
    worker._step = 0x7FFFFFFF - 3
    seqs = [Seq(handle.new_matcher(), Params(handle), arrival_seq=k) for k in (1, 2)]
    tokens = _greedy_tokens(handle, info, 12)
    for k in range(10):
        if k == 6:
            seqs.reverse()                            # a full submission after the wrap
        newest = [tokens[len(s.token_ids) - 2] for s in seqs]
        assert worker.submit(seqs, newest)
        got = worker.collect()
        for s, t in zip(seqs, newest):
            assert s.matcher.accept_token(t)
            s.token_ids.append(t)
        want = fill_grammar_bitmask(seqs)
        assert torch.equal(got.bitmask[:2], want.bitmask[:2]), k
    assert worker._step == 6 and not worker.failed
    worker.close()


def test_rows_a_gpu_waits_for_are_filled_when_a_worker_dies(info, caplog):
    """With the GPU-side wait (`collect(gate=True)`) nothing waits on the host; if a worker dies before
    it filled its rows, `settle` fills them in process and sets the flags the GPU waits for."""
    js, choice = compile_both(info)
    worker = MaskWorker(4, info.vocab_size, processes=2)
    gated = []
    worker._gate = gated.append                    # what the GPU would wait for (CUDA: a StreamGate)
    seqs = [Seq(js.new_matcher(), Params(js), arrival_seq=1), Seq(choice.new_matcher(), Params(choice), arrival_seq=2)]
    assert worker.submit(seqs) and worker.collect() is not None       # mirrors made, rows filled
    for seq, t in zip(seqs, (_greedy_tokens(js, info, 1)[0], _greedy_tokens(choice, info, 1)[0])):
        seq.matcher.defer(t)                       # the engine's matchers take it lazily
        seq.token_ids.append(t)
    worker.bitmask.zero_()
    os.kill(worker._procs[1].pid, signal.SIGSTOP)   # the worker of seqs[0] (arrival_seq 1) fills nothing
    assert worker.submit(seqs)
    masks = worker.collect(order=[0, 1], gate=True)
    assert gated == [worker._step] and masks.rows == [0, 1] and worker._unsettled is not None
    worker._procs[1].kill()
    with caplog.at_level(logging.WARNING, logger="services.grammar.mask_worker"):
        assert not worker.settle()
    assert worker.failed and "a worker exited" in caplog.text
    assert worker._done.tolist() == [gated[0] & 0xFF] * 2
    want = fill_grammar_bitmask(seqs)
    assert torch.equal(worker.bitmask[:2], want.bitmask[:2])
    assert not worker.submit(seqs)                  # in process from now on


def test_a_submission_too_large_for_the_shared_file_goes_by_socket(info):
    """Mirrors catching up many tokens can outgrow the file's payload area: that submission is sent to
    each worker by socket instead, with the same rows, and the next one goes through the file again."""
    js, _ = compile_both(info)
    worker = MaskWorker(4, info.vocab_size, processes=2)
    a = Seq(js.new_matcher(), Params(js), arrival_seq=1)
    b = Seq(js.new_matcher(), Params(js), arrival_seq=2)
    assert worker.submit([a, b]) and worker.collect() is not None
    tokens = _greedy_tokens(js, info, 12)
    for seq in (a, b):
        for t in tokens:
            assert seq.matcher.accept_token(t)
            seq.token_ids.append(t)
    area = worker._payload
    worker._payload = area[:64]                      # twelve tokens for each mirror do not fit
    assert worker.submit([a, b])
    assert worker._sub[1] == -1
    got = worker.collect()
    want = fill_grammar_bitmask([a, b])
    assert torch.equal(got.bitmask[:2], want.bitmask[:2])
    worker._payload = area
    assert worker.submit([a, b]) and worker._sub[1] > 0 and worker.collect() is not None
    worker.close()


def _greedy_tokens(handle, info, n: int) -> list[int]:
    """n tokens the grammar accepts: the lowest allowed id at each position."""
    m = handle.new_matcher()
    bitmask = torch.zeros(1, (info.vocab_size + 31) // 32, dtype=torch.int32)
    out = []
    for _ in range(n):
        m.fill_next_token_bitmask(bitmask, 0)
        words = bitmask[0].to(torch.int64) & 0xFFFFFFFF
        allowed = ((words[:, None] >> torch.arange(32)) & 1).flatten().nonzero().flatten().tolist()
        t = next(t for t in allowed if t not in m.stop_token_ids)
        assert m.accept_token(t)
        out.append(t)
    return out


def test_a_dead_worker_loses_nothing(tiny_model_dir, info, caplog):
    handles = compile_both(info)
    want = run(LLM(tiny_model_dir, num_kv_blocks=256, block_size=16, grammar_mask_worker="off"), handles)
    llm = LLM(tiny_model_dir, num_kv_blocks=256, block_size=16, grammar_mask_worker="on")
    engine, worker = llm.engine, llm.engine.mask_worker
    step = engine.step

    def kill_on_fifth():
        if worker._step == 5:
            worker._procs[0].kill()
            worker._procs[0].wait()
        return step()
    engine.step = kill_on_fifth
    with caplog.at_level(logging.WARNING, logger="services.grammar.mask_worker"):
        assert run(llm, handles) == want
    assert worker.failed and "filled in the engine's process" in caplog.text
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
