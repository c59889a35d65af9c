"""Shared by the CPU and GPU tests of speculative steps on CUDA graphs."""
from __future__ import annotations


def eager_spec_steps(runner) -> list[bool]:
    """Watches `runner`'s eager path: one entry per step with guesses that took it, True when the
    step had the shape the speculative graphs serve (every row at its newest token), i.e. missed them."""
    seen: list[bool] = []
    prepare = runner.prepare

    def spy(scheduled):
        if any(s.request.spec_token_ids for s in scheduled):
            seen.append(all(s.request.num_computed_tokens + 1 == s.request.num_tokens for s in scheduled))
        return prepare(scheduled)
    runner.prepare = spy
    return seen
