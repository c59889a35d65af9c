"""Speculative decoding: the `Proposer` seam the engine defines, and the verification maths.

A proposer guesses up to k next tokens per running sequence; the target scores the last committed
token and the k guesses in one forward pass (k+1 logits rows, see ModelRunner.prepare), and this
module decides which guesses to keep. Implementations live in services/draft (ngram, a local
draft model, the remote DraftServer); the engine never imports them.

Verification, per sequence, position j = 0..m (m <= k guesses were scored):
  p_j  the target's distribution at position j after the sampler's processing (logit bias,
       min_tokens, penalties, grammar mask, then temperature/top-k/top-p/min-p/typical-p), computed
       with the sequence's state as if guesses 0..j-1 were accepted;
  q_j  the proposal distribution the guess x_j was drawn from (a point mass for ngram and greedy
       drafts; the draft model's top few probabilities renormalised otherwise).
Greedy requests keep the longest prefix of guesses equal to argmax p_j, then emit argmax p at the
first mismatch (or the bonus token p_m after m matches): identical to plain greedy decoding.
Sampled requests use rejection sampling (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"):
  accept x_j with probability min(1, p_j(x_j) / q_j(x_j));
  on rejection emit y ~ norm(max(0, p_j - q_j)) and stop;
  after m acceptances emit the bonus token y ~ p_m.
Why this is exact for any q: P(emit y) = q(y) min(1, p(y)/q(y)) + P(reject) r(y), with
sum_x q(x) min(1, p(x)/q(x)) = sum_x min(q(x), p(x)) = 1 - beta, so P(reject) = beta, and
r(y) = max(0, p(y) - q(y)) / beta. Then P(y) = min(q(y), p(y)) + max(0, p(y) - q(y)) = p(y).
Truncating q (top few, renormalised) changes nothing in the proof, as long as the verifier uses the
same q the guess was drawn from. A guess the grammar forbids has p_j(x_j) = 0 and is always rejected.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

SPEC_METHODS = ("ngram", "draft", "remote")


class ProposerUnavailable(RuntimeError):
    """A proposer cannot answer this step (slow or unreachable service). The engine decodes
    without speculation for the step and counts a fallback; any other exception is a bug."""


@dataclass(slots=True)
class ProposalInput:
    request_id: str
    token_ids: list[int]            # committed tokens (prompt + output); the proposer must not mutate them
    num_speculative_tokens: int     # k >= 1: propose at most this many
    temperature: float              # 0 = greedy: a point-mass (argmax) proposal is best


@dataclass(slots=True)
class Proposal:
    """Up to k guessed next tokens. `probs[j]` = (ids, probabilities) of q_j, the distribution
    guess j was drawn from (the guess is among the ids; probabilities sum to 1). `probs` None =
    every q_j is a point mass on the guess (ngram, greedy drafts)."""
    token_ids: list[int]
    probs: list[tuple[list[int], list[float]]] | None = None

    def q_of(self, j: int, token: int) -> float:
        if self.probs is None:
            return 1.0 if token == self.token_ids[j] else 0.0
        ids, ps = self.probs[j]
        return ps[ids.index(token)] if token in ids else 0.0

    def q_dense(self, j: int, vocab_size: int, device) -> torch.Tensor:
        q = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if self.probs is None:
            q[self.token_ids[j]] = 1.0
        else:
            ids, ps = self.probs[j]
            q[torch.tensor(ids, device=device)] = torch.tensor(ps, dtype=torch.float32, device=device)
        return q


class Proposer(abc.ABC):
    """Guesses next tokens for many sequences at once.

    Invariants: `propose` returns one entry per input, in order (None = no guess for that
    sequence this step); guesses are valid token ids of the target's vocabulary; a sampled
    guess was drawn from the q reported with it. A sequence's committed tokens only grow between
    calls (a preempted sequence comes back with the same tokens), so a stateful proposer may keep
    per-sequence state keyed by request id until `release`. `propose` raises ProposerUnavailable
    (and nothing else) when it cannot answer in time.
    """
    name: str = "proposer"

    @abc.abstractmethod
    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]: ...

    def release(self, request_ids: list[str]) -> None:
        """These sequences finished or left the running set: drop their state."""

    def close(self) -> None:
        """Free resources (models, connections)."""


# ---- verification maths (one position at a time; p is a probability row [V]) ----------------------
def uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """y ~ probs via argmax(probs / E), E ~ Exp(1): the sampler's own trick, generator on the CPU."""
    noise = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=generator).to(probs.device)
    return int((probs / noise).argmax())


def accept_guess(p_x: float, q_x: float, u: float) -> bool:
    """Accept x with probability min(1, p(x) / q(x)), given u ~ U[0, 1). q(x) > 0 since x ~ q."""
    return u * q_x < p_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to sample after a rejection. Its mass beta equals the rejection
    probability; beta == 0 means p == q up to rounding (a rejection then has probability ~0), so p
    itself is the right fallback."""
    r = (p - q).clamp_min(0.0)
    mass = float(r.sum())
    return r / mass if mass > 1e-12 else p


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted per verify step with k guesses each accepted with probability alpha,
    independently (Leviathan et al. eq. 1): 1 + alpha + ... + alpha^k."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_num_tokens(alpha: float, max_k: int, cost_per_token: float) -> int:
    """The k in [0, max_k] that maximises tokens per unit of time, where one step without guesses
    costs 1 and each guess adds `cost_per_token` (proposing it plus verifying it). 0 = off."""
    best_k, best = 0, 1.0
    for k in range(1, max_k + 1):
        rate = expected_tokens(alpha, k) / (1.0 + cost_per_token * k)
        if rate > best * 1.02:   # a guess must pay for itself by a margin: noise in alpha is real
            best_k, best = k, rate
    return best_k
