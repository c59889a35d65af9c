"""Prompt-lookup (n-gram) proposer: no model, guesses by copying what followed the same n tokens
earlier in the sequence (Saxena 2023, "prompt lookup decoding"). Pays off on copy-heavy work:
summaries quoting their input, code edits, retrieval answers, chat that repeats the question.

Per sequence it keeps an index {n-gram: latest end position} over the tokens seen so far, updated
incrementally, so a step costs O(new tokens * n) rather than a scan of the whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.spec_decode import Proposal, ProposalInput, Proposer


@dataclass(slots=True)
class _Index:
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> position of its last token
    num_indexed: int = 0   # n-grams ending before this position are in `last_end`


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._index: dict[str, _Index] = {}

    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        return [self._propose_one(i) for i in inputs]

    def _propose_one(self, inp: ProposalInput) -> Proposal | None:
        tokens = inp.token_ids
        idx = self._index.setdefault(inp.request_id, _Index())
        if idx.num_indexed > len(tokens):      # cannot happen for one request id; stay correct anyway
            idx = self._index[inp.request_id] = _Index()
        # Index n-grams ending at positions < len - 1: the suffix itself must not match itself.
        for end in range(idx.num_indexed, len(tokens) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n + 1 >= 0:
                    idx.last_end[tuple(tokens[end - n + 1:end + 1])] = end
        idx.num_indexed = max(idx.num_indexed, len(tokens) - 1)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):   # longest match is the most reliable
            if len(tokens) < n:
                continue
            end = idx.last_end.get(tuple(tokens[-n:]))
            if end is not None:
                guess = tokens[end + 1:end + 1 + inp.num_speculative_tokens]
                return Proposal(list(guess)) if guess else None
        return None

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._index.pop(rid, None)
