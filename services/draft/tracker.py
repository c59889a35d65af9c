"""The caller's side of the draft protocol (services/draft/protocol.py): what each sequence has sent."""
from __future__ import annotations

from services.draft.protocol import DraftCall, DraftReply
from services.engine.spec_decode import Proposal, ProposalInput


class SequenceTracker:
    def __init__(self, namespace: str = ""):
        self.namespace = namespace        # keeps sequence ids of different callers apart on a shared draft
        self.sent: dict[str, int] = {}    # request id -> tokens the draft has been sent
        self.num_lost = 0                 # replies saying the draft had lost a sequence

    def seq_id(self, request_id: str) -> str:
        return f"{self.namespace}/{request_id}" if self.namespace else request_id

    def call(self, inp: ProposalInput) -> DraftCall:
        n = self.sent.get(inp.request_id, 0)
        if n > len(inp.token_ids):        # committed tokens never shrink; resend in full if they did
            n = 0
        return DraftCall(self.seq_id(inp.request_id), n, list(inp.token_ids[n:]), inp.num_speculative_tokens,
                         inp.temperature)

    def on_reply(self, request_id: str, call: DraftCall, reply: DraftReply) -> Proposal | None:
        """A call that got no reply needs nothing: the next call's prefix_len is still one the draft
        holds (if it applied the lost call, it simply rolls back further)."""
        if reply.lost:
            self.sent[request_id] = 0
            self.num_lost += 1
            return None
        self.sent[request_id] = call.prefix_len + len(call.new_token_ids)
        return Proposal(list(reply.token_ids), reply.probs) if reply.token_ids else None

    def release(self, request_ids: list[str]) -> list[str]:
        """Forget these requests; returns the draft-side sequence ids to release."""
        return [self.seq_id(rid) for rid in request_ids if self.sent.pop(rid, None) is not None]
