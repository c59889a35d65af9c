"""Each logits processor against a per-row reference in plain PyTorch; sampling statistics; seeds."""
from __future__ import annotations

import math

import pytest
import torch

from services.engine import sampler as S
from services.engine.outputs import RequestMetrics
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams

torch.manual_seed(0)
LOGITS = torch.randn(5, 12) * 2


def ref_top_k(row, k):
    keep = torch.topk(row, k).indices
    out = torch.full_like(row, -math.inf)
    out[keep] = row[keep]
    return out


def ref_top_p(row, p):
    probs = row.softmax(-1)
    order = torch.argsort(probs, descending=True)
    out, mass = torch.full_like(row, -math.inf), 0.0
    for i in order.tolist():
        out[i] = row[i]
        mass += float(probs[i])
        if mass >= p:
            break
    return out


def ref_min_p(row, m):
    probs = row.softmax(-1)
    return torch.where(probs >= m * probs.max(), row, torch.full_like(row, -math.inf))


def ref_typical(row, mass):
    logp = row.log_softmax(-1)
    p = logp.exp()
    ent = float(-(p * logp).sum())
    order = sorted(range(len(row)), key=lambda i: abs(-float(logp[i]) - ent))
    out, cum = torch.full_like(row, -math.inf), 0.0
    for i in order:
        out[i] = row[i]
        cum += float(p[i])
        if cum >= mass:
            break
    return out


@pytest.mark.parametrize("k", [1, 3, 12])
def test_top_k(k):
    got = S.apply_top_k(LOGITS.clone(), torch.full((5,), k))
    for r in range(5):
        assert torch.equal(got[r], ref_top_k(LOGITS[r], k))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 1.0])
def test_top_p(p):
    got = S.apply_top_p(LOGITS.clone(), torch.full((5,), p))
    for r in range(5):
        assert torch.equal(got[r], ref_top_p(LOGITS[r], p))


@pytest.mark.parametrize("m", [0.0, 0.1, 0.5])
def test_min_p(m):
    got = S.apply_min_p(LOGITS.clone(), torch.full((5,), m))
    for r in range(5):
        assert torch.equal(got[r], ref_min_p(LOGITS[r], m))


@pytest.mark.parametrize("mass", [0.2, 0.6, 0.95])
def test_typical_p(mass):
    got = S.apply_typical_p(LOGITS.clone(), torch.full((5,), mass))
    for r in range(5):
        assert torch.equal(torch.isinf(got[r]), torch.isinf(ref_typical(LOGITS[r], mass)))


def test_penalties_match_reference():
    logits = LOGITS[:2].clone()
    prompt_and_output = [[1, 2, 3], [4]]
    outputs = [[3, 3, 5], []]
    seen = torch.zeros(2, 12, dtype=torch.bool)
    counts = torch.zeros(2, 12)
    for i in range(2):
        seen[i, prompt_and_output[i] + outputs[i]] = True
        for t in outputs[i]:
            counts[i, t] += 1
    got = S.apply_penalties(logits.clone(), seen, counts, torch.tensor([1.3, 2.0]), torch.tensor([0.5, 0.0]),
                            torch.tensor([0.25, 1.0]))
    for i in range(2):
        ref = LOGITS[i].clone()
        for t in set(prompt_and_output[i] + outputs[i]):
            ref[t] = ref[t] / [1.3, 2.0][i] if ref[t] > 0 else ref[t] * [1.3, 2.0][i]
        for t in set(outputs[i]):
            ref[t] -= [0.5, 0.0][i] * outputs[i].count(t) + [0.25, 1.0][i]
        assert torch.allclose(got[i], ref)


def request(params: SamplingParams, output=(), idx=0) -> Request:
    r = Request(f"r{idx}", [1, 2, 3], params, frozenset([0]), 100, 4, RequestMetrics(0.0))
    for t in output:
        r.append_token(t)
    return r


def test_sampling_matches_distribution():
    """Chi-square of 4,000 draws at temperature 0.7 + top-k 4 against the reference distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    sampler = S.Sampler(6, seed=0)
    params = SamplingParams(temperature=0.7, top_k=4, max_tokens=5)
    counts = torch.zeros(6)
    for _ in range(4000):
        counts[sampler(logits.clone(), [request(params)]).token_ids[0]] += 1
    expected = ref_top_k(logits[0] / 0.7, 4).softmax(-1) * 4000
    assert counts[4:].sum() == 0
    chi2 = float(((counts[:4] - expected[:4]) ** 2 / expected[:4]).sum())
    assert chi2 < 16.27   # p = 0.001 for 3 degrees of freedom


def test_seeded_request_is_independent_of_batch():
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=5)
    logits = torch.randn(4, 50)
    alone = [S.Sampler(50, seed=s)(logits[2:3].clone(), [request(params)]).token_ids[0] for s in (1, 2)]
    others = [request(SamplingParams(temperature=1.0), idx=i) for i in range(3)]
    batch = S.Sampler(50, seed=7)(logits.clone(), others[:2] + [request(params)] + others[2:]).token_ids[2]
    assert alone[0] == alone[1] == batch


def test_greedy_min_tokens_bias_and_logprobs():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    sampler = S.Sampler(4)
    # EOS (id 0) is banned until min_tokens outputs exist; logit_bias pushes token 3 up.
    out = sampler(logits.clone(), [request(SamplingParams(temperature=0, min_tokens=2, logit_bias={3: 3.0},
                                                          logprobs=2))])
    assert out.token_ids == [3]
    lp = out.logprobs[0]
    assert lp[3].rank == 1 and set(lp) == {3, 1}
    ref = torch.tensor([-math.inf, 1.0, 0.0, 2.0]).log_softmax(-1)
    assert math.isclose(lp[3].logprob, float(ref[3]), rel_tol=1e-5)
    assert math.isclose(lp[1].logprob, float(ref[1]), rel_tol=1e-5)


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_moves_mu_towards_target(mode):
    torch.manual_seed(0)
    logits = torch.randn(1, 200) * 3
    params = SamplingParams(temperature=1.0, mirostat_mode=mode, mirostat_tau=3.0, mirostat_eta=0.1, seed=3)
    r = request(params)
    sampler = S.Sampler(200)
    surprises = []
    for _ in range(300):
        t = sampler(logits.clone(), [r]).token_ids[0]
        surprises.append(-math.log2(float(logits[0].softmax(-1)[t])))
    assert r.mirostat_mu is not None
    # The running surprise settles near tau (Mirostat's control target), far below unconstrained sampling.
    assert abs(sum(surprises[100:]) / 200 - 3.0) < 1.5


def test_mirostat_v2_keeps_tokens_under_mu():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    kept = ~torch.isinf(S.mirostat_v2_filter(logits, mu=2.0))
    assert kept.tolist() == [True, True, False, False]
