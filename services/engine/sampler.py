"""Turns a step's logits into next tokens, vectorised over the batch with per-request parameters.

Order of processing (one row per sequence that samples this step):
  logit_bias -> min_tokens (ban EOS/stop ids) -> repetition/frequency/presence penalties
  -> grammar mask -> [logprobs are taken here, before temperature]
  -> greedy argmax | temperature -> top_k -> top_p -> min_p -> typical_p -> sample
  (Mirostat rows: temperature -> Mirostat v1/v2 truncation -> sample, with their own state.)
Sampling draws token = argmax(probs / q) with q ~ Exp(1) (equivalent to sampling from probs);
a seeded request draws q from its own generator, so its tokens do not depend on the batch.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from services.engine.outputs import Logprob
from services.engine.request import Request

try:   # the fused GPU sampling kernel; CPUs and the other cases use the row-vectorised path below
    from services.engine.layers import fused
except ImportError:   # pragma: no cover - no Triton
    fused = None

NEG_INF = float("-inf")


# ---- pure, row-vectorised filters (tested against per-row references) ----------------------------
def apply_penalties(logits: torch.Tensor, seen_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """seen_mask [B, V]: token appears in prompt or output (repetition penalty, HF/CTRL style);
    output_counts [B, V]: occurrences in the output (OpenAI frequency/presence penalties)."""
    rep = repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen_mask, penalised, logits)
    logits = logits - frequency[:, None] * output_counts
    return logits - presence[:, None] * (output_counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """k [B] long; k >= V keeps everything."""
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (k.clamp(max=logits.shape[1]) - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p (at least one)."""
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    remove = mass_before >= p[:, None]
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(1, idx, remove), NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    threshold = min_p[:, None] * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_typical_p(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022), as in HF's TypicalLogitsWarper."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_scores, idx = torch.sort(shifted, dim=-1)
    cum = logits.gather(-1, idx).softmax(-1).cumsum(-1)
    last = (cum < mass[:, None]).sum(1).clamp(max=logits.shape[1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last[:, None])
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(1, idx, remove), NEG_INF)


def mirostat_v2_filter(logits: torch.Tensor, mu: float) -> torch.Tensor:
    """Keep tokens whose surprise -log2 p is at most mu (at least the most likely one). logits: [V]."""
    probs = logits.softmax(-1)
    surprise = -torch.log2(probs)
    keep = surprise <= mu
    keep[probs.argmax()] = True
    return logits.masked_fill(~keep, NEG_INF)


def mirostat_v1_filter(logits: torch.Tensor, mu: float, m: int = 100) -> torch.Tensor:
    """Mirostat v1 (Basu et al. 2021), as llama.cpp: estimate the Zipf exponent from the top m
    probabilities, derive k from the target surprise mu, keep the top k. logits: [V]."""
    n = logits.shape[0]
    p = torch.sort(logits.softmax(-1), descending=True).values.double()
    m = min(m, n - 1)
    i = torch.arange(m - 1, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))
    b = torch.log(p[:m - 1].clamp_min(1e-300) / p[1:m].clamp_min(1e-300))
    s_hat = float((t * b).sum() / (t * t).sum()) if m > 1 else 1.0
    eps = s_hat - 1
    if abs(eps) < 1e-9 or s_hat <= 0:
        k = n
    else:
        k = ((eps * 2.0 ** mu) / (1 - n ** (-eps))) ** (1 / s_hat)
        k = int(min(max(round(k), 1), n)) if math.isfinite(k) else n
    return apply_top_k(logits[None], torch.tensor([k]))[0]


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    q = torch.empty(shape, dtype=torch.float32).exponential_(generator=generator)
    return q.to(device)


def plain_sampling(r: Request) -> bool:
    """Rows the fused sampler takes: greedy or temperature only, no per-request seed, no Mirostat."""
    sp = r.sampling_params
    return r.generator is None and sp.mirostat_mode == 0 and sp.top_k is None and sp.top_p >= 1.0 \
        and sp.min_p <= 0.0 and sp.typical_p >= 1.0


def _temperatures(requests: list[Request]) -> tuple[float, ...]:
    """The fused sampler's per-row temperatures: 0 for greedy rows."""
    return tuple(0.0 if r.sampling_params.is_greedy else r.sampling_params.temperature for r in requests)


def on_device(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small per-step tensor on the device. To a GPU through pinned memory, asynchronously: a plain
    host->device copy would make the host wait for the forward pass still running."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


# ---- the sampler -------------------------------------------------------------------------------
@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    chosen_logprobs: list[float]


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)   # for requests without a seed
        self.seed = seed
        self.device_generator: torch.Generator | None = None   # the same role on a GPU (no host noise)
        self.step_seeds = random.Random(seed)                  # noise seeds for the fused GPU sampler
        self._kept: dict[str, tuple] = {}                      # _kept_on_device: name -> (key, device tensor)
        self._hosts: list = [(None, None)] * 2                 # launch()'s (pinned results, event), used in turn
        self.graphs = None   # cuda_graphs.SampleGraphs: launch() replays them for the decode graphs' steps

    def process_logits(self, logits: torch.Tensor, requests: list[Request], grammar_masks=None,
                       grammar: bool = True) -> torch.Tensor:
        """Everything that changes the model's distribution before temperature. logits: [B, V] float32.
        grammar_masks: fill_grammar_bitmask(requests) when the engine already filled them; grammar=False:
        the caller applies them."""
        device = logits.device
        params = [r.sampling_params for r in requests]
        for i, (r, sp) in enumerate(zip(requests, params)):
            if sp.logit_bias:
                ids = torch.tensor(list(sp.logit_bias), device=device)
                logits[i, ids] += torch.tensor(list(sp.logit_bias.values()), device=device, dtype=logits.dtype)
            if r.num_output_tokens < sp.min_tokens:
                banned = list(r.eos_token_ids) + sp.stop_token_ids
                logits[i, torch.tensor(banned, device=device, dtype=torch.long)] = NEG_INF
        rows = [i for i, sp in enumerate(params) if sp.repetition_penalty != 1.0
                or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0]
        if rows:
            v = logits.shape[1]
            seen = torch.zeros(len(rows), v, dtype=torch.bool, device=device)
            counts = torch.zeros(len(rows), v, dtype=logits.dtype, device=device)
            for j, i in enumerate(rows):
                seen[j, torch.tensor(requests[i].token_ids, device=device)] = True
                out = requests[i].output_token_ids
                if out:
                    counts[j].index_add_(0, torch.tensor(out, device=device), torch.ones(len(out), device=device))
            idx = torch.tensor(rows, device=device)
            tensor = lambda name: torch.tensor([getattr(params[i], name) for i in rows], device=device)  # noqa: E731
            logits[idx] = apply_penalties(logits[idx], seen, counts, tensor("repetition_penalty"),
                                          tensor("frequency_penalty"), tensor("presence_penalty"))
        if grammar and any(r.matcher is not None for r in requests):
            from services.grammar.matcher import apply_grammar_masks  # noqa: PLC0415
            apply_grammar_masks(logits, requests, grammar_masks)
        return logits

    def warp(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature and truncation for sampled (non-greedy, non-Mirostat) rows. Returns new logits."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        temp = on_device([sp.temperature or 1.0 for sp in params], torch.float32, device)
        logits = logits / temp[:, None]
        if any(sp.top_k is not None for sp in params):
            k = on_device([sp.top_k or logits.shape[1] for sp in params], torch.long, device)
            logits = apply_top_k(logits, k)
        if any(sp.top_p < 1.0 for sp in params):
            logits = apply_top_p(logits, on_device([sp.top_p for sp in params], torch.float32, device))
        if any(sp.min_p > 0.0 for sp in params):
            logits = apply_min_p(logits, on_device([sp.min_p for sp in params], torch.float32, device))
        if any(sp.typical_p < 1.0 for sp in params):
            logits = apply_typical_p(logits, on_device([sp.typical_p for sp in params], torch.float32, device))
        return logits

    def __call__(self, logits: torch.Tensor, requests: list[Request], grammar_masks=None) -> SamplerOutput:
        logits = self.process_logits(logits.float(), requests, grammar_masks)
        params = [r.sampling_params for r in requests]
        if logits.is_cuda and fused is not None and all(plain_sampling(r) for r in requests):
            return self._fused(logits, requests, params)
        sampled = [i for i, sp in enumerate(params) if not sp.is_greedy and sp.mirostat_mode == 0]
        if len(sampled) == len(requests):        # all rows sample: no greedy argmax, no row gather
            probs = self.warp(logits, requests).softmax(-1)
            tokens = (probs / self._noise(probs.shape, requests, logits.device)).argmax(-1)
        else:
            tokens = logits.argmax(-1)
            if sampled:
                rows = on_device(sampled, torch.long, logits.device)
                probs = self.warp(logits[rows], [requests[i] for i in sampled]).softmax(-1)
                tokens[rows] = (probs / self._noise(probs.shape, [requests[i] for i in sampled],
                                                    logits.device)).argmax(-1)
        for i, r in enumerate(requests):
            if r.sampling_params.mirostat_mode:
                tokens[i] = self._mirostat(logits[i], r)
        # The chosen token's logprob from one logsumexp; whole log-softmax rows only when asked for.
        logprobs = logits.log_softmax(-1) if any(sp.logprobs is not None for sp in params) else None
        if logprobs is not None:
            chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        else:
            chosen = logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        # One device->host transfer for tokens and their logprobs (float64 holds token ids exactly).
        both = torch.cat([tokens.double(), chosen.double()]).tolist()
        token_list = [int(t) for t in both[:len(requests)]]
        return SamplerOutput(token_list, self._logprobs(logprobs, token_list, requests), both[len(requests):])

    def _sample_fused(self, logits: torch.Tensor, requests: list[Request],
                      masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """GPU rows with temperature alone (or greedy), unseeded: one Triton pass per row (layers/fused.py)
        instead of ~10 full passes over [B, V]; its noise comes from a per-step seed of the engine's seed.
        `masks` (matcher.FilledMasks): the grammar's token bitmasks, applied inside that pass. Returns the
        tokens on the device, and float64 [2B]: the tokens, then their logprobs (what the host reads)."""
        temps = _temperatures(requests)
        temp = self._kept_on_device("temperature", temps, lambda: temps, torch.float32, logits.device)
        mask = limit = None
        if masks is not None:
            n = len(requests)
            limit = self._kept_on_device("mask_limit", masks.limit_key(n), lambda: masks.limits(n), torch.int32,
                                         logits.device)
            mask = masks.bitmask.to(logits.device, non_blocking=True)
        both = torch.empty(2 * len(requests), dtype=torch.float64, device=logits.device)
        tokens, _ = fused.sample_rows(logits, temp, self.step_seeds.getrandbits(31), mask=mask, mask_limit=limit,
                                      out=both)
        return tokens, both

    def _kept_on_device(self, name: str, key, make, dtype: torch.dtype, device) -> torch.Tensor:
        """A small per-row tensor that repeats from step to step while the same rows decode (temperatures,
        mask limits): sent to the device again only when `key` changes, `make()` giving its values."""
        kept = self._kept.get(name)
        if kept is None or kept[0] != key:
            kept = self._kept[name] = (key, on_device(list(make()), dtype, device))
        return kept[1]

    def _host_buffer(self, n: int, cuda: bool):
        """Where launch()'s results land and the event that marks them there: two pairs in turn, since the
        engine reads step n's after launching step n+1's sampling and before launching n+2's (a new pinned
        buffer and event each step cost host time right after a graph replay: NOTES)."""
        self._hosts.reverse()
        if self._hosts[0][0] is None or self._hosts[0][0].numel() < n:
            self._hosts[0] = (torch.empty(max(n, 512), dtype=torch.float64, pin_memory=cuda),
                              torch.cuda.Event() if cuda else None)
        buf, event = self._hosts[0]
        return buf[:n], event

    def _fused(self, logits: torch.Tensor, requests: list[Request], params: list) -> SamplerOutput:
        both = self._sample_fused(logits, requests)[1].tolist()
        token_list = [int(t) for t in both[:len(requests)]]
        logprobs = logits.log_softmax(-1) if any(sp.logprobs is not None for sp in params) else None
        return SamplerOutput(token_list, self._logprobs(logprobs, token_list, requests), both[len(requests):])

    def launch(self, logits: torch.Tensor, requests: list[Request], grammar_masks=None):
        """The fused GPU path without waiting: returns (tokens on the device, a pinned host buffer that
        receives tokens then logprobs, an event set once it has, or None on the CPU, and where in that
        buffer the logprobs start). For `plain_sampling` rows only, none of them with a min_tokens ban
        pending (a grammar's masks are applied inside the sampling kernel, where nothing else could leave a
        row empty). Logits that a decode graph just wrote are sampled by a replay of `graphs`."""
        if grammar_masks is None and any(r.matcher is not None for r in requests):
            from services.grammar.matcher import fill_grammar_bitmask  # noqa: PLC0415
            grammar_masks = fill_grammar_bitmask(requests)
        logits = self.process_logits(logits.float(), requests, grammar=False)
        if self.graphs is not None and self.graphs.takes(logits):
            tokens, both, lp_at = self.graphs.sample(_temperatures(requests), self.step_seeds.getrandbits(31),
                                                     grammar_masks)
        else:
            (tokens, both), lp_at = self._sample_fused(logits, requests, grammar_masks), len(requests)
        if grammar_masks is not None:
            from services.telemetry import metrics  # noqa: PLC0415
            metrics.GRAMMAR_MASK_SECONDS.observe(grammar_masks.fill_s)
        cuda = logits.is_cuda   # (the CPU runs this only in tests, with Triton's interpreter)
        host, ready = self._host_buffer(len(both), cuda)
        host.copy_(both, non_blocking=cuda)
        if ready is not None:
            ready.record()
        return tokens, host, ready, lp_at

    def _noise(self, shape, requests: list[Request], device) -> torch.Tensor:
        if device.type == "cuda":   # unseeded rows draw on the GPU: no [B, V] noise made on the host
            if self.device_generator is None:
                self.device_generator = torch.Generator(device).manual_seed(self.seed)
            q = torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=self.device_generator)
        else:
            q = exponential_noise(shape, self.generator, device)
        for j, r in enumerate(requests):
            if r.generator is not None:
                q[j] = exponential_noise((shape[1],), r.generator, device)
        return q

    def _mirostat(self, logits: torch.Tensor, r: Request) -> int:
        sp = r.sampling_params
        if r.mirostat_mu is None:
            r.mirostat_mu = 2.0 * sp.mirostat_tau
        logits = logits / max(sp.temperature, 1e-5) if sp.temperature > 0 else logits
        filt = mirostat_v1_filter if sp.mirostat_mode == 1 else mirostat_v2_filter
        probs = filt(logits, r.mirostat_mu).softmax(-1)
        token = int((probs / exponential_noise(probs.shape, r.generator or self.generator, probs.device)).argmax())
        observed = -math.log2(max(float(probs[token]), 1e-30))
        r.mirostat_mu -= sp.mirostat_eta * (observed - sp.mirostat_tau)
        return token

    @staticmethod
    def _logprobs(logprobs: torch.Tensor, tokens: list[int], requests: list[Request]):
        out: list[dict[int, Logprob] | None] = []
        for i, r in enumerate(requests):
            n = r.sampling_params.logprobs
            if n is None:
                out.append(None)
                continue
            row = logprobs[i]
            chosen = float(row[tokens[i]])
            entry = {tokens[i]: Logprob(chosen, int((row > chosen).sum()) + 1)}
            if n > 0:
                top = torch.topk(row, n)
                for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                    entry.setdefault(tid, Logprob(lp, rank))
            out.append(entry)
        return out
