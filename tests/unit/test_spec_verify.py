"""Verification maths of speculative decoding (Speculator.verify) on synthetic target logits.

The target here is context-free (row j's logits do not depend on earlier tokens), so the exact
distribution of the emitted tokens is known: position j ~ p_j. Whatever the proposal q (good,
bad, point mass), rejection sampling must reproduce it; greedy must emit the longest matching
prefix plus argmax. Seeds are fixed, so the statistical tests are deterministic.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.outputs import RequestMetrics
from services.engine.request import Request
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.spec_decode import (Proposal, ProposalInput, Proposer, accept_guess, best_num_tokens,
                                         expected_tokens, residual)
from services.engine.speculator import Speculator

V = 6
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0],
                       [0.0, 1.5, 1.5, 0.2, -0.5, 0.3],
                       [1.0, 0.0, 2.0, -1.0, 0.5, 0.0]])     # [k+1 = 3, V]


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X ~ chi-square(dof): the regularised upper incomplete gamma Q(dof/2, x/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def goodness_of_fit(counts: dict, expected: dict, n: int) -> float:
    """Pearson's chi-square p-value; categories with expected count < 5 are pooled."""
    stat, dof, pool_o, pool_e = 0.0, -1, 0.0, 0.0
    for key, prob in expected.items():
        e, o = prob * n, counts.get(key, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
            continue
        stat, dof = stat + (o - e) ** 2 / e, dof + 1
    if pool_e > 0:
        stat, dof = stat + (pool_o - pool_e) ** 2 / pool_e, dof + 1
    assert sum(counts.values()) == n and set(counts) <= set(expected), "emitted a token of probability 0"
    return chi2_sf(stat, dof)


class _NoProposer(Proposer):
    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        return [None] * len(inputs)


def make_request(params: SamplingParams, rid: str = "r") -> Request:
    return Request(rid, [1, 2, 3], params, frozenset(), 64, 16, RequestMetrics(0.0))


def run_verify(spec: Speculator, req: Request, proposal: Proposal) -> list[int]:
    req.token_ids = list(req.prompt_token_ids)
    req.num_computed_tokens = len(req.token_ids) + len(proposal.token_ids)  # as after scheduler.update
    req.spec_token_ids = list(proposal.token_ids)
    spec._proposals[req.request_id] = proposal
    emitted: list[int] = []
    spec.verify(req, LOGITS[:len(proposal.token_ids) + 1].clone(),
                lambda t, lp, lps: (emitted.append(t), req.append_token(t)))
    # Rollback: KV is valid for the prompt and the accepted guesses only.
    assert req.num_computed_tokens == len(req.prompt_token_ids) + len(emitted) - 1
    assert req.spec_token_ids == []
    return emitted



@pytest.fixture()
def spec() -> Speculator:
    cfg = EngineConfig(load_format="dummy", model="unused", speculative_method="ngram")
    return Speculator(cfg, {"ngram": _NoProposer()}, Sampler(V, seed=0), V)


def test_greedy_keeps_longest_matching_prefix_then_argmax(spec):
    req = make_request(SamplingParams(temperature=0))
    argmax = LOGITS.argmax(-1).tolist()                      # [0, 1, 2]
    assert run_verify(spec, req, Proposal([argmax[0], argmax[1]])) == argmax           # both accepted + bonus
    assert run_verify(spec, req, Proposal([argmax[0], 4])) == [argmax[0], argmax[1]]   # second rejected
    assert run_verify(spec, req, Proposal([5, argmax[1]])) == [argmax[0]]              # first rejected
    assert spec.stats.num_proposed_tokens == 6 and spec.stats.num_accepted_tokens == 3


def test_residual_and_acceptance_rule():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    r = residual(p, q)
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 0.0]))   # only token 0 has p > q
    assert torch.equal(residual(p, p), p)                       # p == q: rejection impossible, fall back to p
    assert accept_guess(0.3, 0.6, 0.49) and not accept_guess(0.3, 0.6, 0.51)   # accept w.p. p/q = 0.5
    assert accept_guess(0.5, 0.2, 0.999)                         # p >= q: always accept


def test_expected_tokens_and_choice_of_k():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert math.isclose(expected_tokens(0.5, 2), 1.75)
    assert best_num_tokens(0.9, 8, 0.0) == 8        # free guesses that are usually right: guess a lot
    assert best_num_tokens(0.05, 8, 0.3) == 0       # costly guesses that are usually wrong: off
    assert 0 < best_num_tokens(0.6, 8, 0.2) < 8


TEMP = 0.8
P = (LOGITS / TEMP).softmax(-1)   # the target distribution plain sampling draws from


def proposals(kind: str, rng: random.Random) -> Proposal:
    """Two guesses drawn from q, per the kind of draft."""
    if kind == "point":       # ngram-like: fixed guesses, q a point mass
        return Proposal([3, 1])
    if kind == "good":        # q close to p, truncated to the top 3 and renormalised
        ids, probs = [], []
        for j in range(2):
            top = torch.topk(P[j], 3)
            ids.append(top.indices.tolist())
            probs.append((top.values / top.values.sum()).tolist())
    else:                     # "bad": q puts most mass where p has little
        ids = [[5, 4, 0], [4, 0, 3]]
        probs = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]
    guesses = [rng.choices(ids[j], probs[j])[0] for j in range(2)]
    return Proposal(guesses, list(zip(ids, probs)))


@pytest.mark.parametrize("kind", ["point", "good", "bad"])
def test_rejection_sampling_preserves_target_distribution(spec, kind):
    n = 2000
    rng = random.Random(1)
    first: dict[int, int] = {}
    pairs: dict[tuple[int, int], int] = {}
    num_pairs = 0
    req = make_request(SamplingParams(temperature=TEMP, seed=7))
    for _ in range(n):
        out = run_verify(spec, req, proposals(kind, rng))
        first[out[0]] = first.get(out[0], 0) + 1
        if len(out) >= 2:
            pairs[(out[0], out[1])] = pairs.get((out[0], out[1]), 0) + 1
            num_pairs += 1
    assert goodness_of_fit(first, {t: float(P[0, t]) for t in range(V)}, n) > 1e-3
    # Given that a second token was emitted, its distribution is still p_1, independent of the first.
    marginal = {}
    for (a, b), c in pairs.items():
        marginal[b] = marginal.get(b, 0) + c
    assert goodness_of_fit(marginal, {t: float(P[1, t]) for t in range(V)}, num_pairs) > 1e-3
    if kind == "good":
        assert spec.stats.acceptance_rate > 0.6
    if kind == "bad":
        assert spec.stats.acceptance_rate < 0.3
