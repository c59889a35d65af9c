"""The engine's speculative-decoding step: ask proposers for guesses, verify them, adapt k.

LLMEngine.step calls `propose(running)` before scheduling (guesses go into
`request.spec_token_ids`, so the scheduler computes them as extra tokens) and, after the forward
pass, `verify(request, rows, emit)` for each request whose guesses were scored: `emit` is the
engine's per-token append, so stop strings, EOS, max_tokens and grammar matchers act per token and
can stop a run in the middle. Rejected positions are rolled back by lowering num_computed_tokens
(their KV slots are overwritten later; only blocks full of committed tokens are ever registered).

Adaptivity, per sequence: an acceptance-rate estimate alpha (decayed counts) and a cost per guess c
(measured per batch-size bucket, as both grow with the batch: the proposer's time per guessed
position over the engine's step time) give the k in
[0, K] with the most tokens per unit of time (spec_decode.best_num_tokens). k = 0 turns speculation
off for that sequence; every PROBE_EVERY steps it tries k = 1 again, so it comes back on when
acceptance recovers. Above `speculative_disable_batch_size` sequences in a step, nobody speculates:
verifying k extra tokens per sequence stops being free once the batch is compute-bound.

That model compares a step with guesses against the same engine's step without them. On a GPU the
real alternative is cheaper: plain steps overlap (the host prepares step n+1 while the GPU runs step n),
speculative ones do not. So where steps can overlap, `SpecGate` decides per batch-size bucket whether
to speculate at all, from what each mode has been measured to deliver (tokens per second), exploring
the slower mode now and then.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from services.engine.config import EngineConfig
from services.engine.request import Request
from services.engine.sampler import Sampler, on_device
from services.engine.spec_decode import (Proposal, ProposalInput, Proposer, ProposerUnavailable, accept_guess,
                                         best_num_tokens, residual, sample_from, uniform)

log = logging.getLogger(__name__)

Emit = Callable[[int, float, dict | None], None]   # (token, chosen logprob, top logprobs or None)


@dataclass(slots=True)
class SpecStats:
    """Cumulative counters (read by telemetry at scrape time)."""
    num_verify_steps: int = 0        # (sequence, step) pairs that verified guesses
    num_proposed_tokens: int = 0     # guesses scored by the target
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0      # accepted + the corrected/bonus token
    num_draft_calls: int = 0
    draft_time_s: float = 0.0
    num_fallbacks: int = 0           # proposer calls that failed or timed out (plain decoding instead)
    num_skipped_steps: int = 0       # steps without speculation: batch above the cap, or plain measured faster
    gate_rates: dict = field(default_factory=dict)   # SpecGate's bucket -> {speculating: tokens/s}

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_proposed_tokens if self.num_proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.num_accepted_tokens / self.num_verify_steps if self.num_verify_steps else 0.0


def bucket_of(num_running: int) -> int:
    """The batch-size bucket costs and rates are kept for: 1, 2, 4, 8, ..."""
    return 1 << max(num_running - 1, 0).bit_length()


@dataclass(slots=True)
class _Mode:
    """One bucket's state in SpecGate."""
    speculate: bool = False     # the mode of the current stretch (a new bucket measures plain first)
    left: int = 0               # measured steps left in the stretch
    exploring: bool = True      # the stretch measures the mode not preferred (or not measured yet)
    preferred: bool | None = None   # the faster mode at the last comparison
    exploit: int = 0            # length of the stretches in the preferred mode
    rate: dict = field(default_factory=dict)   # mode -> tokens/s over its latest stretch
    tokens: int = 0             # tokens appended by the current stretch's measured steps
    times: list = field(default_factory=list)   # their durations (s)

    def stretch_rate(self) -> float | None:
        """Tokens per step over the median step time: a stall (collection, compilation) in a few steps
        moves the median little, unlike the mean."""
        if not self.times:
            return None
        return self.tokens / len(self.times) / statistics.median(self.times)


class SpecGate:
    """Speculate or decode plainly, per batch-size bucket, by measured tokens per second.

    Steps alternate in stretches: a new bucket runs WINDOW[False] measured plain steps, then WINDOW[True]
    speculative ones, then the faster mode for `exploit` steps, then a window of the other mode again,
    and so on. Each time exploring confirms the preferred mode its stretch doubles, or quadruples where
    it is more than 25 % faster (up to EXPLOIT[1]), so exploring costs less and less where one mode is
    clearly faster; a flip resets it.

    A stretch's rate is its steps' mean tokens over their median time, leaving out what is not the
    mode's steady state: the first SETTLE steps of a run of consecutive steps in one mode and bucket
    (the first step after a switch reads the last overlapped tokens or refills the pipeline; the first
    proposal catches the proposer up on the tokens it missed), steps with requests waiting (prefill
    costs the same in either mode) and idle gaps. Stretches count measured steps only: a bucket
    visited for a step or two at a time (a batch's tail) keeps its mode until it has been measured."""
    WINDOW = {False: 4, True: 6}   # plain steps vary little; a speculative step's tokens do
    SETTLE = 2
    EXPLOIT = (32, 1024)
    IDLE_S = 1.0

    def __init__(self, rates: dict | None = None):
        self.rates = {} if rates is None else rates   # bucket -> {speculating: tokens/s}, shared with SpecStats
        self._modes: dict[int, _Mode] = {}
        self._prev: tuple[int, _Mode, bool, int, float] | None = None   # bucket, state, mode, tokens, time
        self._run = 0   # the previous step's place in its run of consecutive steps (same bucket and mode)

    def __call__(self, bucket: int, tokens: int, now: float, waiting: bool = False) -> bool:
        """Whether the step about to run, in `bucket`, speculates; `tokens` generated so far, at `now`;
        `waiting`: the step is not decoding's steady state (it admits requests, or nothing runs yet)."""
        if self._prev is not None:
            b, m, _, tok, t = self._prev
            if self._run > self.SETTLE and 0 < now - t < self.IDLE_S:
                m.tokens += tokens - tok
                m.times.append(now - t)
                m.left -= 1
                if m.left <= 0:
                    self._next_stretch(b, m)
        m = self._modes.get(bucket)
        if m is None:
            m = self._modes[bucket] = _Mode(left=self.WINDOW[False], rate=self.rates.setdefault(bucket, {}))
        same = self._prev is not None and self._prev[1] is m and self._prev[2] == m.speculate and not waiting
        self._run = self._run + 1 if same else 0 if waiting else 1
        self._prev = (bucket, m, m.speculate, tokens, now)
        return m.speculate

    def reset(self) -> None:
        """The next step follows one the gate did not decide (nothing to measure across it)."""
        self._prev, self._run = None, 0

    def _next_stretch(self, bucket: int, m: _Mode) -> None:
        rate = m.stretch_rate()
        if rate is not None:
            m.rate[m.speculate] = rate
            log.debug("spec gate: bucket %d %s: %d tokens in %d steps, median %.2f ms, max %.2f ms; rates %s",
                      bucket, "speculative" if m.speculate else "plain", m.tokens, len(m.times),
                      1e3 * statistics.median(m.times), 1e3 * max(m.times),
                      {("spec" if k else "plain"): round(v) for k, v in m.rate.items()})
        m.tokens, m.times = 0, []
        other = not m.speculate
        if other not in m.rate or not m.exploring:   # measure the other mode
            m.speculate, m.left, m.exploring = other, self.WINDOW[other], True
            return
        best = m.rate[True] > m.rate[False]
        grow = 4 if m.rate[best] > 1.25 * m.rate[not best] else 2
        m.exploit = min(grow * m.exploit, self.EXPLOIT[1]) if best == m.preferred else self.EXPLOIT[0]
        m.preferred = best
        m.speculate, m.left, m.exploring = best, m.exploit, False

    def preferred(self, bucket: int) -> bool | None:
        """Whether speculating was measured faster for `bucket` (None: not both modes measured yet)."""
        m = self._modes.get(bucket)
        return None if m is None else m.preferred

    def summary(self) -> dict[int, dict]:
        """Per bucket: the latest measured tokens/s of each mode and the preferred one."""
        return {b: {"spec_tokens_per_s": round(m.rate.get(True, 0.0), 1),
                    "plain_tokens_per_s": round(m.rate.get(False, 0.0), 1), "speculate": m.preferred}
                for b, m in sorted(self._modes.items())}


@dataclass(slots=True)
class _SeqState:
    method: str
    accepted: float            # decayed counts: alpha = accepted / checked
    checked: float
    steps_off: int = 0

    @property
    def alpha(self) -> float:
        return self.accepted / self.checked if self.checked > 0 else 0.0


class Speculator:
    DECAY = 0.8          # weight of the past in the acceptance counts (about 5 steps of memory)
    PROBE_EVERY = 16     # steps a sequence stays off before it tries one guess again
    PRIOR = (1.4, 2.0)   # optimistic start, alpha = 0.7: a new sequence tries speculation

    def __init__(self, config: EngineConfig, proposers: Mapping[str, Proposer], sampler: Sampler, vocab_size: int):
        if config.speculative_method is not None and config.speculative_method not in proposers:
            raise ValueError(f"EngineConfig.speculative_method={config.speculative_method!r} needs a proposer "
                             f"of that name (got {sorted(proposers)}); build one with services.draft.build_proposer")
        self.config = config
        self.proposers = dict(proposers)
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.stats = SpecStats()
        self._seqs: dict[str, _SeqState] = {}
        self._proposals: dict[str, Proposal] = {}
        # Per batch-size bucket (a cost measured at batch 8 says nothing about batch 1): seconds per
        # guessed position by method, and the engine's step time. A bucket not seen yet costs nothing,
        # so speculation there is tried, then measured.
        self._cost: dict[tuple[str, int], float] = {}
        self._step_time: dict[int, float] = {}
        self._bucket = 1   # the bucket of the step being proposed for
        self.gate = SpecGate(self.stats.gate_rates)
        self._last_propose: float | None = None
        self._catching_up = True
        self._last_draft_time = 0.0

    # ---- which method, how many guesses ---------------------------------------------------------
    def method_for(self, req: Request) -> str | None:
        """The request's override (SamplingParams.speculative) or the deployment default."""
        over = req.sampling_params.speculative or {}
        if over.get("enabled") is False:
            return None
        method = over.get("method") or self.config.speculative_method
        if method is None and over.get("enabled"):
            method = next(iter(self.proposers), None)
        if method == "draft" and "draft" not in self.proposers and "remote" in self.proposers:
            method = "remote"   # "draft" asks for a draft model, wherever it runs
        return method if method in self.proposers else None

    def _max_k(self, req: Request) -> int:
        over = req.sampling_params.speculative or {}
        return over.get("num_speculative_tokens") or self.config.num_speculative_tokens

    def _choose_k(self, req: Request, method: str) -> int:
        k = min(self._max_k(req), req.max_tokens - req.num_output_tokens - 1)
        if k <= 0 or not self.config.speculative_adaptive:
            return max(k, 0)
        st = self._seqs.get(req.request_id)
        if st is None or st.method != method:
            st = self._seqs[req.request_id] = _SeqState(method, *self.PRIOR)
        step = self._step_time.get(self._bucket)
        cost = self._cost.get((method, self._bucket), 0.0) / step if step else 0.0
        best = best_num_tokens(st.alpha, k, cost)
        if best == 0:
            st.steps_off += 1
            return 1 if st.steps_off % self.PROBE_EVERY == 0 else 0
        st.steps_off = 0
        return best

    # ---- speculate this step? -----------------------------------------------------------------------
    def active(self, running: list[Request], num_waiting: int, tokens_total: int, can_overlap: bool) -> bool:
        """Whether the engine step about to run speculates (called once per step): not above the batch
        size cap, and, where plain steps overlap (`can_overlap`: GPU graphs) and k adapts, only in
        buckets where SpecGate measures speculating faster. `tokens_total`: tokens generated so far."""
        n = min(len(running) + num_waiting, self.config.max_num_seqs)   # the batch this step makes
        cap = self.config.speculative_disable_batch_size
        on = cap is None or n <= cap
        if on and self.config.speculative_adaptive and can_overlap:
            # Steps that admit requests (or have none running: idle, or waiting on the KV tier) are not
            # a decoding steady state: the gate does not measure them.
            on = self.gate(bucket_of(n), tokens_total, time.perf_counter(), waiting=num_waiting > 0 or not running)
        else:
            self.gate.reset()
        if not on:
            self.stats.num_skipped_steps += 1
            self._last_propose = None   # step times are measured between consecutive speculative steps
            if self._seqs and self.stats.num_skipped_steps % 16 == 0:
                self._release_gone(running)
        return on

    def _release_gone(self, running: list[Request]) -> None:
        live = {r.request_id for r in running}
        for rid in [rid for rid in self._seqs if rid not in live]:
            st = self._seqs.pop(rid)
            self.proposers[st.method].release([rid])

    # ---- propose ---------------------------------------------------------------------------------
    def propose(self, running: list[Request]) -> None:
        now = time.monotonic()
        # After steps without proposals the proposer first catches up on the tokens it missed: that
        # call's time is not its cost per guess.
        self._catching_up = self._last_propose is None
        if self._last_propose is not None:
            gap = now - self._last_propose - self._last_draft_time
            if 0 < gap < 2.0:   # longer gaps are idle time, not step time
                prev = self._step_time.get(self._bucket)   # (still the previous step's bucket)
                self._step_time[self._bucket] = gap if prev is None else 0.8 * prev + 0.2 * gap
        self._last_propose, self._last_draft_time = now, 0.0
        self._bucket = bucket_of(len(running))
        self._proposals.clear()
        self._release_gone(running)
        by_method: dict[str, list[tuple[Request, int]]] = {}
        candidates = []
        for r in running:
            r.spec_token_ids = []
            if (r.num_computed_tokens == r.num_tokens - 1 and not r.is_finished
                    and r.sampling_params.mirostat_mode == 0):
                method = self.method_for(r)
                if method is not None:
                    candidates.append((r, method))
        for r, method in candidates:
            k = self._choose_k(r, method)
            if k > 0:
                by_method.setdefault(method, []).append((r, k))
        for method, batch in by_method.items():
            self._call(method, batch)

    def _call(self, method: str, batch: list[tuple[Request, int]]) -> None:
        inputs = [ProposalInput(r.request_id, r.token_ids, k, r.sampling_params.temperature) for r, k in batch]
        for r, _ in batch:
            self._seqs.setdefault(r.request_id, _SeqState(method, *self.PRIOR))
        t0 = time.monotonic()
        try:
            proposals = self.proposers[method].propose(inputs)
        except ProposerUnavailable as e:
            self.stats.num_fallbacks += 1
            for r, _ in batch:
                r.metrics.spec_fallbacks += 1
            log.info("proposer %s unavailable, decoding without speculation this step: %s", method, e)
            return
        finally:
            dt = time.monotonic() - t0
            self._last_draft_time += dt
            self.stats.num_draft_calls += 1
            self.stats.draft_time_s += dt
            for r, _ in batch:
                r.metrics.spec_draft_s += dt
        if not self._catching_up:
            per_position = dt / max(k for _, k in batch)
            prev = self._cost.get((method, self._bucket))
            self._cost[method, self._bucket] = per_position if prev is None else 0.8 * prev + 0.2 * per_position
        assert len(proposals) == len(batch), f"proposer {method} answered {len(proposals)} of {len(batch)}"
        for (r, k), prop in zip(batch, proposals):
            if prop is None or not prop.token_ids:
                continue
            guesses = prop.token_ids[:k]
            bad = next((j for j, t in enumerate(guesses) if not 0 <= t < self.vocab_size), None)
            if bad is not None:   # a remote draft with another vocabulary: keep only valid guesses
                guesses = guesses[:bad]
            if guesses:
                r.spec_token_ids = guesses
                self._proposals[r.request_id] = prop

    # ---- verify ----------------------------------------------------------------------------------
    def verify(self, req: Request, logits: torch.Tensor, emit: Emit) -> None:
        """logits [m+1, V]: rows for the last committed token and the m scored guesses."""
        self.verify_all([(req, logits, emit)])

    def verify_all(self, batch: list[tuple[Request, torch.Tensor, Emit]]) -> None:
        """verify() for a step's requests. Greedy requests whose processing is stateless are decided
        together: one read from the device for all of them."""
        greedy = [(req, logits) for req, logits, _ in batch if self._stateless(req) and req.sampling_params.is_greedy]
        decided = self._greedy_decisions(greedy) if greedy else {}
        for req, logits, emit in batch:
            proposal = self._proposals.pop(req.request_id)
            m = logits.shape[0] - 1
            guesses = req.spec_token_ids[:m]
            if req.request_id in decided:
                accepted, checked = self._emit_greedy(req, guesses, *decided[req.request_id], emit)
            elif self._stateless(req):
                accepted, checked = self._verify_sampled(req, logits, proposal, guesses, emit)
            else:
                accepted, checked = self._verify_row_by_row(req, logits, proposal, guesses, emit)
            self.stats.num_verify_steps += 1
            self.stats.num_proposed_tokens += m
            self.stats.num_accepted_tokens += accepted
            rm = req.metrics
            rm.spec_verify_steps += 1
            rm.spec_proposed_tokens += m
            rm.spec_accepted_tokens += accepted
            st = self._seqs.get(req.request_id)
            if st is not None:
                st.accepted = self.DECAY * st.accepted + accepted
                st.checked = self.DECAY * st.checked + checked
            if not req.is_finished:
                req.num_computed_tokens -= m - accepted
            req.spec_token_ids = []

    @staticmethod
    def _stateless(req: Request) -> bool:
        """Without penalties, grammar or a pending min_tokens ban, processing does not depend on the
        tokens appended in between: all rows can be processed at once."""
        sp = req.sampling_params
        return (req.matcher is None and req.num_output_tokens >= sp.min_tokens and sp.repetition_penalty == 1.0
                and sp.frequency_penalty == 0.0 and sp.presence_penalty == 0.0)

    def _emit(self, req: Request, emit: Emit, token: int, logprob: float, lsm_row: torch.Tensor) -> None:
        lps = Sampler._logprobs(lsm_row[None], [token], [req])[0] if req.sampling_params.logprobs is not None else None
        emit(token, logprob, lps)
        self.stats.num_emitted_tokens += 1

    def _greedy_decisions(self, items: list[tuple[Request, torch.Tensor]]) -> dict[str, tuple]:
        """request id -> (argmax per row, its logprob per row, log-softmax rows), all rows at once."""
        rows = self.sampler.process_logits(torch.cat([logits for _, logits in items]).float(),
                                           [req for req, logits in items for _ in range(logits.shape[0])])
        lsm = rows.log_softmax(-1)
        best = rows.argmax(-1)
        n = best.shape[0]
        flat = torch.cat([best.double(), lsm.gather(1, best[:, None])[:, 0].double()]).tolist()
        out, k = {}, 0
        for req, logits in items:
            r = logits.shape[0]
            out[req.request_id] = ([int(t) for t in flat[k:k + r]], flat[n + k:n + k + r], lsm[k:k + r])
            k += r
        return out

    def _emit_greedy(self, req: Request, guesses: list[int], tokens: list[int], chosen: list[float],
                     lsm: torch.Tensor, emit: Emit) -> tuple[int, int]:
        """The longest run of guesses equal to the argmax, then the argmax after it."""
        m, j = len(guesses), 0
        while True:   # the bonus row (j = m) always ends it
            ok = j < m and tokens[j] == guesses[j]
            self._emit(req, emit, tokens[j], chosen[j], lsm[j])
            if not ok or req.is_finished:
                return j + ok, min(j + 1, m)
            j += 1

    def _verify_sampled(self, req: Request, logits: torch.Tensor, proposal: Proposal, guesses: list[int],
                        emit: Emit) -> tuple[int, int]:
        """Rejection sampling with every row processed at once: two reads from the device, plus one
        per token drawn (a rejected guess's replacement, or the bonus token)."""
        m = len(guesses)
        rows = self.sampler.process_logits(logits.float().clone(), [req] * (m + 1))
        lsm = rows.log_softmax(-1)
        gen = req.generator or self.sampler.generator
        probs = self.sampler.warp(rows, [req] * (m + 1)).softmax(-1)
        if m:
            idx = on_device(guesses, torch.long, rows.device)
            ar = torch.arange(m, device=rows.device)
            p_x, lp_x = torch.stack([probs[ar, idx], lsm[ar, idx]]).tolist()
        for j in range(m):
            x = guesses[j]
            if not accept_guess(p_x[j], proposal.q_of(j, x), uniform(gen)):
                token = sample_from(residual(probs[j], proposal.q_dense(j, self.vocab_size, probs.device)), gen)
                self._emit(req, emit, token, float(lsm[j, token]), lsm[j])
                return j, j + 1
            self._emit(req, emit, x, lp_x[j], lsm[j])
            if req.is_finished:
                return j + 1, j + 1
        token = sample_from(probs[m], gen)   # the bonus token
        self._emit(req, emit, token, float(lsm[m, token]), lsm[m])
        return m, m

    def _verify_row_by_row(self, req: Request, logits: torch.Tensor, proposal: Proposal, guesses: list[int],
                           emit: Emit) -> tuple[int, int]:
        """Processing reads the tokens appended so far (penalties, grammar, min_tokens): row j is
        processed after the tokens before it are emitted."""
        m = len(guesses)
        greedy = req.sampling_params.is_greedy
        gen = req.generator or self.sampler.generator
        accepted = checked = 0
        for j in range(m + 1):
            row = self.sampler.process_logits(logits[j:j + 1].float().clone(), [req])[0]
            lsm = row.log_softmax(-1)
            is_guess = j < m
            if greedy:
                token = int(row.argmax())
                ok = is_guess and token == guesses[j]
            else:
                p = self.sampler.warp(row[None], [req]).softmax(-1)[0]
                if is_guess:
                    x = guesses[j]
                    ok = accept_guess(float(p[x]), proposal.q_of(j, x), uniform(gen))
                    token = x if ok else sample_from(residual(p, proposal.q_dense(j, self.vocab_size, p.device)),
                                                     gen)
                else:
                    ok, token = False, sample_from(p, gen)   # the bonus token
            self._emit(req, emit, token, float(lsm[token]), lsm)
            accepted += ok
            checked += is_guess
            if not ok or req.is_finished:
                break
        return accepted, checked

    def close(self) -> None:
        for p in self.proposers.values():
            p.close()
