"""The `draft` proposer: a draft model inside the replica's process (services/draft/draft_model.py)."""
from __future__ import annotations

from services.draft.draft_model import DraftModel
from services.draft.tracker import SequenceTracker
from services.engine.spec_decode import Proposal, ProposalInput, Proposer


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, model: DraftModel):
        self.model = model
        self.tracker = SequenceTracker()

    def propose(self, inputs: list[ProposalInput]) -> list[Proposal | None]:
        calls = [self.tracker.call(i) for i in inputs]
        replies = self.model.propose(calls)
        return [self.tracker.on_reply(i.request_id, c, r) for i, c, r in zip(inputs, calls, replies)]

    def release(self, request_ids: list[str]) -> None:
        self.model.release(self.tracker.release(request_ids))
