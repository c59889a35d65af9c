"""The engine: add requests, `step()` (schedule -> execute -> postprocess), stream outputs.

Synchronous and single-threaded; `AsyncEngine` runs it on a background thread for servers and
`LLM` drives it to completion for offline use.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer

from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.loader import load_config
from services.engine.model_runner import ModelRunner
from services.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from services.engine.request import Request, RequestStatus
from services.engine.sampler import Sampler, on_device, plain_sampling
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledRequest, Scheduler
from services.engine.spec_decode import Proposer
from services.engine.speculator import Speculator


@dataclass(slots=True, eq=False)
class RequestGroup:
    """The n sequences of one user request. Children after the first are admitted once the first
    has computed the prompt, so they reuse its KV blocks through the prefix cache."""
    request_id: str
    prompt: str | None
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    pending: list[Request] = field(default_factory=list)
    last_logprob_count: list[int] = field(default_factory=list)
    last_token_count: list[int] = field(default_factory=list)
    output_kind: str = "cumulative"

    @property
    def finished(self) -> bool:
        return not self.pending and all(c.is_finished for c in self.children)


@dataclass(slots=True, eq=False)
class InFlight:
    """A step launched on the GPU whose sampled tokens have not been read: `tokens` stays on the device
    (the next step's input ids), `host` receives tokens then logprobs, `ready` marks the copy done."""
    scheduled: list
    tokens: object
    host: object
    ready: object
    constrained: bool   # [grammar] some row has a matcher
    lp_at: int          # where in `host` the logprobs start (the graphs' bucket size, or the row count)


class LLMEngine:
    def __init__(self, config: EngineConfig, proposers: dict[str, Proposer] | None = None,
                 kv_tier=None):
        self.config = config
        self.hf_config = load_config(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path, local_files_only=True)
        self.max_model_len = min(config.max_model_len or self.hf_config.max_position_embeddings,
                                 self.hf_config.max_position_embeddings)
        self.runner = ModelRunner(config, self.hf_config)
        self.vocab_size = self.hf_config.vocab_size
        self.kv = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.sampler = Sampler(self.vocab_size, config.seed)
        if self.runner.graphs is not None and self.runner.graphs.logits is not None:   # one-token steps' sampling
            from services.engine.cuda_graphs import SampleGraphs  # noqa: PLC0415
            self.sampler.graphs = SampleGraphs(self.runner.graphs)
            self.sampler.graphs.capture()
        # [kv-tier] the shared KV tier (services.prefix_cache.tier.KVTier): fetches missing prefix
        # blocks off this thread while it holds the request, publishes newly full blocks after each pass.
        self.kv_tier = kv_tier if config.enable_prefix_caching else None
        if self.kv_tier is not None:
            self.kv_tier.attach(self.kv, self.runner, config)
        # [spec] speculative decoding: proposers (services.draft) come in through the Proposer seam.
        if config.speculative_method is not None and not proposers:
            raise ValueError(f"speculative_method={config.speculative_method!r} needs proposers={{name: Proposer}}; "
                             "build one with services.draft.build_proposer")
        self.speculator = Speculator(config, proposers, self.sampler, self.vocab_size) if proposers else None
        self.eos_token_ids = self._eos_ids()
        # [grammar] masks filled in a process of their own (services/grammar/mask_worker.py)
        self.mask_worker = None
        mode = config.grammar_mask_worker
        if mode == "on" or (mode == "auto" and self.runner.device.type == "cuda"):
            from services.grammar.mask_worker import MaskWorker  # noqa: PLC0415
            self.mask_worker = MaskWorker(config.max_num_seqs, max(self.vocab_size, len(self.tokenizer)),
                                          min_rows=1 if mode == "on" else 4)
        self.groups: dict[str, RequestGroup] = {}
        self.child_to_group: dict[Request, RequestGroup] = {}
        self._seq = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._inflight: InFlight | None = None   # a launched step whose tokens are not read yet
        self._speculate = False   # [spec] whether the current step speculates (Speculator.active)

    def _eos_ids(self) -> frozenset[int]:
        ids = getattr(self.hf_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return frozenset(ids if isinstance(ids, list) else [] if ids is None else [ids])

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        params.validate()
        params.check_against(self.vocab_size, self.max_model_len, len(prompt_token_ids))
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:3]}")
        blocks_needed = -(-(len(prompt_token_ids) + 1) // self.config.block_size)
        if blocks_needed > self.kv.num_blocks:
            raise ValueError(f"prompt needs {blocks_needed} KV blocks but the cache has {self.kv.num_blocks}")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, cache_salt: str | None = None, arrival_time: float | None = None) -> None:
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already running")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        self.validate(ids, params)
        arrival = arrival_time or time.time()
        children = [Request(request_id if params.n == 1 else f"{request_id}#{i}", ids, params,
                            self.eos_token_ids, self.max_model_len, self.config.block_size,
                            RequestMetrics(arrival), priority, cache_salt, index=i, arrival_seq=next(self._seq))
                    for i in range(params.n)]
        for c in children:
            if params.grammar is not None:
                c.matcher = params.grammar.new_matcher()
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                         params.include_stop_str_in_output) for _ in children]
        group = RequestGroup(request_id, text, children, detoks, pending=children[1:],
                             last_logprob_count=[0] * len(children), last_token_count=[0] * len(children),
                             output_kind=params.output_kind)
        self.groups[request_id] = group
        for c in children:
            self.child_to_group[c] = group
        # [kv-tier] held while its missing prefix blocks are fetched (if cheaper); step() queues it then
        if self.kv_tier is None or not self.kv_tier.begin_load(children[0]):
            self.scheduler.add(children[0])
        if not self.config.enable_prefix_caching:
            self._release_pending(group)
        self.prompt_tokens_total += len(ids)

    def _release_pending(self, group: RequestGroup) -> None:
        for c in group.pending:
            self.scheduler.add(c)
        group.pending = []

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for c in group.children:
            if not c.is_finished:
                if c in group.pending:
                    c.status = RequestStatus.FINISHED_ABORTED
                else:
                    self.scheduler.finish(c, RequestStatus.FINISHED_ABORTED)
            self.child_to_group.pop(c, None)
        group.pending = []
        return self._make_output(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self._speculate = self.speculator.active(self.scheduler.running, self.scheduler.num_waiting,
                                                     self.generation_tokens_total, self.runner.graphs is not None)
        if self._inflight is not None:   # overlapped decoding (below): launch the next step, read this one
            return self._step_ahead()
        if self.kv_tier is not None:   # [kv-tier] requests whose fetch ended (or timed out); idle: wait a bit
            for r in self.kv_tier.ready(wait=not self.scheduler.running and not self.scheduler.waiting):
                self.scheduler.add(r)
        if self._speculate:   # [spec] guesses become extra tokens for the scheduler
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        t_exec = time.perf_counter()
        logits, rows = self.runner.execute(sched.scheduled)
        sampling = [(s.request, r[0]) for s, r in zip(sched.scheduled, rows) if r and not s.request.spec_token_ids]
        # [grammar] fill token masks on the CPU now, while the device still runs the forward pass
        # (nothing above waits for it); the sampler applies them on the device.
        masks = None
        if any(r.matcher is not None for r, _ in sampling):
            masks = self._fill_masks([r for r, _ in sampling])
        if self.kv_tier is not None:   # [kv-tier] export blocks that just became full
            self.kv_tier.after_step(sched.scheduled, time.perf_counter() - t_exec)
        self.scheduler.update(sched.scheduled)
        if self._can_overlap(sched.scheduled, rows):   # tokens are read next step, after launching it
            self._inflight = self._launch_sampling(logits, sched.scheduled, masks)
            return []
        touched: dict[str, RequestGroup] = {}
        if sampling:
            reqs = [r for r, _ in sampling]
            out = self.sampler(logits[[row for _, row in sampling]], reqs, grammar_masks=masks)
            now = time.time()
            for i, req in enumerate(reqs):
                group = self.child_to_group[req]
                self._append(req, group, out.token_ids[i], out.chosen_logprobs[i], out.logprobs[i], now)
                touched[group.request_id] = group
        verify, now = [], time.time()
        for s, r in zip(sched.scheduled, rows):   # [spec] verify scored guesses, append token by token
            if r and s.request.spec_token_ids:
                req, group = s.request, self.child_to_group[s.request]
                verify.append((req, logits[r[0]:r[-1] + 1], lambda t, lp, lps, req=req, group=group:
                               self._append(req, group, t, lp, lps, now)))
                touched[group.request_id] = group
        if verify:
            self.speculator.verify_all(verify)
        for s in sched.scheduled:   # children wait for the first one's prompt, then hit its blocks
            group = self.child_to_group.get(s.request)
            if group and group.pending and s.request.num_computed_tokens >= s.request.num_prompt_tokens:
                self._release_pending(group)
        return self._outputs(touched)

    def _outputs(self, touched: dict[str, RequestGroup]) -> list[RequestOutput]:
        outputs = []
        for group in touched.values():
            finished = group.finished
            if group.output_kind == "final_only" and not finished:
                continue
            outputs.append(self._make_output(group, finished))
            if finished:
                del self.groups[group.request_id]
                for c in group.children:
                    self.child_to_group.pop(c, None)
        return outputs

    # ---- overlapped decoding (GPU) -------------------------------------------------------------
    # While step n runs on the GPU, step n+1 is scheduled and launched with step n's tokens as its input
    # ids straight from the device, and only then are step n's tokens read and processed (stop checks,
    # detokenisation, outputs): the host's work hides behind the GPU's. A row launched for a request that
    # step n then finishes (EOS, a stop string, an abort) is dropped. Only plain decoding overlaps (graph
    # decode steps, temperature/greedy sampling with nothing that reads the newest token: no penalties,
    # pending min_tokens or logprobs; with a speculator, only in steps it sits out: Speculator.active),
    # and only while no request waits. [grammar] A step with constrained rows launches its forward pass
    # first and its sampling only after step n's tokens were accepted by the matchers: the masks are
    # filled on the CPU while the forward pass runs. [kv-tier] Blocks are exported as they fill, copied
    # to the host behind the forward pass (the writer thread waits for the copy).

    def _can_overlap(self, scheduled: list, rows: list) -> bool:
        if self.runner.graphs is None or self._speculate or self.scheduler.waiting or not scheduled:
            return False
        for s, r in zip(scheduled, rows):
            req = s.request
            sp = req.sampling_params
            if not r or req.spec_token_ids or not plain_sampling(req) \
                    or sp.logprobs is not None or sp.repetition_penalty != 1.0 or sp.frequency_penalty != 0.0 \
                    or sp.presence_penalty != 0.0 or req.num_output_tokens < sp.min_tokens \
                    or self.child_to_group[req].pending:
                return False
        return True

    def _launch_sampling(self, logits, scheduled: list, masks=None) -> InFlight:
        requests = [s.request for s in scheduled]
        tokens, host, ready, lp_at = self.sampler.launch(logits, requests, masks)
        return InFlight(scheduled, tokens, host, ready,
                        masks is not None or any(r.matcher is not None for r in requests), lp_at)

    def _step_ahead(self) -> list[RequestOutput]:
        prev, self._inflight = self._inflight, None
        if self.kv_tier is not None:   # fetched requests wait in the queue: the next step is a synchronous one
            for r in self.kv_tier.ready():
                self.scheduler.add(r)
        # [grammar] with the mask worker, step n's constrained rows go to it as soon as their tokens are
        # on the host: its mirrors take them and fill the masks of step n+1 while this thread launches
        # n+1's forward pass and appends the tokens. When the host is the slower side (a small model at
        # batch 32) the tokens are there already; otherwise (a GPU-bound step) they are sent after the
        # launch, so the GPU never waits for this.
        values = self._submit_masks(prev, early=True)
        nxt = self._launch_next(prev)   # None: the next step() is a synchronous one
        late = nxt is not None and (prev.constrained if len(nxt[1]) == len(prev.scheduled)   # the same rows
                                    else any(s.request.matcher is not None for s in nxt[1]))
        if nxt is not None and not late:
            self._inflight = self._launch_sampling(*nxt)
        in_worker = values is not None
        if values is None:
            if self.mask_worker is not None:   # [grammar] the workers first: one that died before setting
                self.mask_worker.settle()      # its flag must not leave the GPU (and this wait) waiting
            if prev.ready is not None:
                prev.ready.synchronize()
            values = prev.host.tolist()
            in_worker = late and self._submit_masks(prev, values=values) is not None
        n, lp_at, now = len(prev.scheduled), prev.lp_at, time.time()
        touched: dict[str, RequestGroup] = {}
        for i, s in enumerate(prev.scheduled):
            req = s.request
            group = self.child_to_group.get(req)
            if req.is_finished or group is None:   # finished or aborted while this step ran
                continue
            self._append(req, group, int(values[i]), values[lp_at + i], None, now)
            touched[group.request_id] = group
        if not in_worker:
            if late:   # [grammar] the matchers take step n's tokens, fill the masks for n+1, then its sampling
                self._inflight = self._launch_sampling(*nxt)
            return self._outputs(touched)
        # [grammar] step n's outputs are built while the worker fills, then its masks are collected
        # (always, even when no constrained row goes on) and n+1's sampling is launched; on a GPU that
        # sampling waits for the workers' flags itself, and this thread looks at them next step
        outputs = self._outputs(touched)
        order = None if late else []   # None: the same rows go on
        if late and len(nxt[1]) != n:   # some rows left: pick the others'
            row_of = {id(s.request): i for i, s in enumerate(prev.scheduled)}
            order = [row_of[id(s.request)] for s in nxt[1]]
        masks = self.mask_worker.collect(order, gate=late)
        if late:
            self._inflight = self._launch_sampling(*nxt, masks)
        return outputs

    def _fill_masks(self, requests: list[Request]):
        """[grammar] The token masks of a step's sampling rows, filled in the worker if it takes them."""
        if self.mask_worker is not None and self.mask_worker.submit(requests):
            masks = self.mask_worker.collect()
            if masks is not None:
                return masks
        from services.grammar.matcher import fill_grammar_bitmask  # noqa: PLC0415
        return fill_grammar_bitmask(requests)

    def _submit_masks(self, prev: InFlight, early: bool = False, values: list | None = None) -> list | None:
        """[grammar] Hands step n's constrained rows to the mask worker with their newest tokens, not
        appended yet, so that it fills the masks that follow them. `early`: only if the tokens are on the
        host already. Returns step n's values (tokens, then logprobs) if submitted."""
        if self.mask_worker is None or not prev.constrained:
            return None
        if early:
            if prev.ready is not None and not prev.ready.query():
                return None
            values = prev.host.tolist()
        return values if self.mask_worker.submit([s.request for s in prev.scheduled], prev.host.numpy()) else None

    def _launch_next(self, prev: InFlight) -> tuple[torch.Tensor, list] | None:
        """The forward pass of step n+1 for the requests of step n that are still running and cannot
        finish by length at n: (logits, scheduled), its sampling not launched yet."""
        if self.scheduler.waiting or self._speculate:
            return None
        keep, scheduled = [], []
        for i, s in enumerate(prev.scheduled):
            req = s.request
            if req.is_finished or req.num_output_tokens + 1 >= req.max_tokens:
                continue
            if req.num_computed_tokens + 1 > self.max_model_len or not self.kv.allocate_slots(req, 1):
                return None   # memory is short: the synchronous path preempts
            keep.append(i)
            scheduled.append(ScheduledRequest(req, 1, self.kv.block_ids(req.request_id)))
        if not scheduled or not self.runner.graphs.can_run(scheduled, ahead=True):
            return None
        ids = prev.tokens
        if len(keep) != len(prev.scheduled):
            ids = ids[on_device(keep, torch.long, ids.device)]
        t_exec = time.perf_counter()
        logits, _ = self.runner.execute(scheduled, input_ids=ids)
        self.scheduler.update(scheduled)
        if self.kv_tier is not None:
            self.kv_tier.after_step(scheduled, time.perf_counter() - t_exec)
        return logits, scheduled

    def _append(self, req: Request, group: RequestGroup, token: int, chosen_lp: float,
                logprobs: dict[int, Logprob] | None, now: float) -> None:
        sp = req.sampling_params
        req.append_token(token)
        self.generation_tokens_total += 1
        req.cumulative_logprob += chosen_lp
        if logprobs is not None:
            req.logprobs.append({t: Logprob(lp.logprob, lp.rank, self.tokenizer.decode([t]))
                                 for t, lp in logprobs.items()})
        if req.matcher is not None:   # [grammar] taken when the matcher is next used (not at all when
            req.matcher.defer(token)    # the mask worker's mirror fills its masks)
        req.metrics.first_token_time = req.metrics.first_token_time or now
        req.metrics.last_token_time = now
        detok = group.detoks[req.index]
        stop_str = detok.add_token(token)
        status = None
        if stop_str is not None:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        elif token in self.eos_token_ids and not sp.ignore_eos:
            status = RequestStatus.FINISHED_STOPPED
        elif token in sp.stop_token_ids and req.num_output_tokens >= sp.min_tokens:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif req.matcher is not None and req.matcher.is_terminated():
            status = RequestStatus.FINISHED_STOPPED
        elif req.num_output_tokens >= req.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if stop_str is None:
                detok.flush()
            req.metrics.finished_time = now
            self.scheduler.finish(req, status)

    def _make_output(self, group: RequestGroup, group_finished: bool | None = None) -> RequestOutput:
        """Deltas since the previous output; cumulative fields too unless the request streams deltas
        only ("delta": servers), which spares copying whole outputs every step."""
        outs = []
        for c, detok in zip(group.children, group.detoks):
            finished = c.is_finished
            cumulative = finished or group.output_kind != "delta"
            n_tok, n_lp = group.last_token_count[c.index], group.last_logprob_count[c.index]
            group.last_token_count[c.index] = len(c.token_ids) - len(c.prompt_token_ids)
            delta_lp = None
            if c.logprobs is not None:
                delta_lp = c.logprobs[n_lp:]
                group.last_logprob_count[c.index] = len(c.logprobs)
            delta_text = detok.take_delta(finished)
            outs.append(CompletionOutput(
                index=c.index, text=detok.text[:detok.num_emitted] if cumulative else "",
                token_ids=c.output_token_ids if cumulative else [],
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                logprobs=list(c.logprobs) if c.logprobs is not None and cumulative else None,
                finish_reason=c.status.value if finished else None, stop_reason=c.stop_reason,
                delta_text=delta_text, delta_token_ids=c.token_ids[len(c.prompt_token_ids) + n_tok:],
                delta_logprobs=delta_lp))
        first = group.children[0]
        return RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, outs,
                             finished=group.finished if group_finished is None else group_finished,
                             metrics=first.metrics)

    # ---- stats -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting
