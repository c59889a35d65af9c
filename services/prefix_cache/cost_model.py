"""Fetch-or-recompute: is loading N blocks from the tier faster than prefilling their tokens here?

    fetch_s     = latency_s + bytes / bandwidth_Bps        (one pipelined round trip)
    recompute_s = tokens / prefill_tokens_per_s
    fetch  iff  fetch_s * margin < recompute_s

All three rates are EWMAs of what this replica observed: round trips of small calls give the
latency, large transfers (fetches and the writer's uploads) the bandwidth after subtracting the
latency, and the engine's prefill steps the prefill speed. Until a rate has been observed its
prior is used; `margin` > 1 leaves room for the decode/copy work the estimate leaves out.
The decision carries its inputs, for metrics and spans.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

_SMALL_TRANSFER_BYTES = 64 * 1024   # below this, a round trip is mostly latency


@dataclass(slots=True, frozen=True)
class CostDecision:
    fetch: bool
    num_blocks: int
    num_tokens: int
    num_bytes: int
    est_fetch_s: float
    est_recompute_s: float
    latency_s: float
    bandwidth_bytes_per_s: float
    prefill_tokens_per_s: float

    def as_attributes(self, prefix: str = "kv_tier.") -> dict[str, float | int | bool]:
        return {prefix + k: v for k, v in asdict(self).items()}


class _Ewma:
    __slots__ = ("value", "alpha", "num_samples")

    def __init__(self, prior: float, alpha: float) -> None:
        self.value, self.alpha, self.num_samples = prior, alpha, 0

    def update(self, x: float) -> None:
        # The first sample replaces the prior outright: a prior is a guess, a sample a fact.
        self.value = x if self.num_samples == 0 else self.alpha * x + (1 - self.alpha) * self.value
        self.num_samples += 1


class CostModel:
    def __init__(self, prior_latency_s: float = 1e-3, prior_bandwidth_bytes_per_s: float = 1e9,
                 prior_prefill_tokens_per_s: float = 5_000.0, alpha: float = 0.2,
                 margin: float = 1.2) -> None:
        for name, v in (("prior_latency_s", prior_latency_s),
                        ("prior_bandwidth_bytes_per_s", prior_bandwidth_bytes_per_s),
                        ("prior_prefill_tokens_per_s", prior_prefill_tokens_per_s)):
            if v <= 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {v}")
        if not 0 < alpha <= 1:
            raise ValueError(f"CostModel.alpha must be in (0, 1], got {alpha}")
        if margin <= 0:
            raise ValueError(f"CostModel.margin must be > 0, got {margin}")
        self.margin = margin
        self._latency = _Ewma(prior_latency_s, alpha)
        self._bandwidth = _Ewma(prior_bandwidth_bytes_per_s, alpha)
        self._prefill = _Ewma(prior_prefill_tokens_per_s, alpha)
        self._lock = threading.Lock()   # observed from the engine and the writer thread

    @property
    def latency_s(self) -> float:
        return self._latency.value

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self._bandwidth.value

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._prefill.value

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        """One round trip that moved `num_bytes` (a fetch, an upload, or a tiny EXISTS)."""
        if seconds <= 0:
            return
        with self._lock:
            if num_bytes < _SMALL_TRANSFER_BYTES:
                self._latency.update(seconds)
            else:
                # The floor keeps a transfer that happened to beat the latency estimate finite.
                wire_s = max(seconds - self._latency.value, seconds * 0.1)
                self._bandwidth.update(num_bytes / wire_s)

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        """One engine step that prefilled `num_tokens` tokens in `seconds`."""
        if num_tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._prefill.update(num_tokens / seconds)

    def decide(self, num_blocks: int, block_size: int, bytes_per_block: int) -> CostDecision:
        with self._lock:
            lat, bw, tps = self._latency.value, self._bandwidth.value, self._prefill.value
        num_tokens, num_bytes = num_blocks * block_size, num_blocks * bytes_per_block
        est_fetch = lat + num_bytes / bw
        est_recompute = num_tokens / tps
        return CostDecision(
            fetch=num_blocks > 0 and est_fetch * self.margin < est_recompute,
            num_blocks=num_blocks, num_tokens=num_tokens, num_bytes=num_bytes,
            est_fetch_s=est_fetch, est_recompute_s=est_recompute, latency_s=lat,
            bandwidth_bytes_per_s=bw, prefill_tokens_per_s=tps)
