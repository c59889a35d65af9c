"""Reads Locust's CSV output (`<prefix>_stats.csv`, `<prefix>_stats_history.csv`), summarises it and
checks SLOs. No locust import: the CSVs are the contract, so this works on a distributed master's
files too.

SLO semantics: every TTFT (resp. ITL) entry, i.e. every protocol × scenario, must have its p95 at
or under the threshold; the error rate is failed / all requests over the "REST" and "gRPC" entries.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

REQUEST_TYPES = ("REST", "gRPC")
METRIC_TYPES = ("TTFT", "ITL", "TOKENS/S", "CACHED%")
PERCENTILES = ("50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%")


def _num(raw: str | None) -> float | None:
    if raw is None or raw.strip() in ("", "N/A"):
        return None
    value = float(raw)
    return None if math.isnan(value) else value


@dataclass(slots=True, frozen=True)
class Entry:
    """One row of the final stats: a Locust entry (type, name) over the whole run."""
    type: str
    name: str
    count: int
    failures: int
    average: float | None
    percentiles: dict[str, float | None]

    @property
    def p50(self) -> float | None:
        return self.percentiles.get("50%")

    @property
    def p95(self) -> float | None:
        return self.percentiles.get("95%")

    @property
    def p99(self) -> float | None:
        return self.percentiles.get("99%")


@dataclass(slots=True, frozen=True)
class Sample:
    """One row of the history: an entry's state at one time (percentiles over Locust's recent window)."""
    timestamp: float
    user_count: int
    type: str
    name: str
    rps: float
    failures_per_s: float
    percentiles: dict[str, float | None]
    total_count: int
    total_failures: int


@dataclass(slots=True)
class Results:
    entries: list[Entry] = field(default_factory=list)
    history: list[Sample] = field(default_factory=list)

    def of_type(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.type == kind]

    @property
    def num_requests(self) -> int:
        return sum(e.count for e in self.entries if e.type in REQUEST_TYPES)

    @property
    def num_failures(self) -> int:
        return sum(e.failures for e in self.entries if e.type in REQUEST_TYPES)

    @property
    def error_rate(self) -> float:
        return self.num_failures / self.num_requests if self.num_requests else 0.0


def read_results(prefix: str | Path) -> Results:
    """`prefix` is what was given to `locust --csv`; the history is optional (needs --csv-full-history)."""
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} does not exist: did Locust run with --csv {prefix}?")
    out = Results()
    with stats_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Type"] == "" and row["Name"] == "Aggregated":
                continue   # mixes ms with tokens/s: meaningless for us
            out.entries.append(Entry(row["Type"], row["Name"], int(row["Request Count"]), int(row["Failure Count"]),
                                     _num(row["Average Response Time"]), {p: _num(row.get(p)) for p in PERCENTILES}))
    history_path = Path(f"{prefix}_stats_history.csv")
    if history_path.is_file():
        with history_path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["Name"] == "Aggregated":
                    continue
                out.history.append(Sample(float(row["Timestamp"]), int(row["User Count"]), row["Type"], row["Name"],
                                          _num(row["Requests/s"]) or 0.0, _num(row["Failures/s"]) or 0.0,
                                          {p: _num(row.get(p)) for p in PERCENTILES},
                                          int(row["Total Request Count"]), int(row["Total Failure Count"])))
    return out


@dataclass(slots=True, frozen=True)
class SLO:
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    error_rate: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_p95_ms, self.itl_p95_ms, self.error_rate))


def check_slo(results: Results, slo: SLO) -> list[str]:
    """The breaches, one line each (empty = the run meets the SLO). A latency SLO with no samples at
    all is a breach too: a run that produced no tokens proves nothing."""
    breaches: list[str] = []
    for kind, limit in (("TTFT", slo.ttft_p95_ms), ("ITL", slo.itl_p95_ms)):
        if limit is None:
            continue
        rows = [e for e in results.of_type(kind) if e.count > 0]
        if not rows:
            breaches.append(f"{kind}: no samples recorded, so p95 {kind} <= {limit:g} ms cannot be shown")
        for e in rows:
            if e.p95 is None or e.p95 > limit:
                breaches.append(f"{kind} {e.name}: p95 {_fmt(e.p95, 1)} ms > {limit:g} ms ({e.count} samples)")
    if slo.error_rate is not None:
        if results.num_requests == 0:
            breaches.append("errors: no request was recorded")
        elif results.error_rate > slo.error_rate:
            breaches.append(f"errors: {results.num_failures}/{results.num_requests} = {results.error_rate:.2%} "
                            f"> {slo.error_rate:.2%}")
    return breaches


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summary_markdown(results: Results) -> str:
    """A table per metric, for the console and `summary.md`."""
    lines = [f"requests: {results.num_requests}, failures: {results.num_failures} "
             f"({results.error_rate:.2%})", "",
             "| entry | count | failures | p50 | p95 | p99 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    order = {t: i for i, t in enumerate((*REQUEST_TYPES, *METRIC_TYPES))}
    for e in sorted(results.entries, key=lambda e: (order.get(e.type, 99), e.name)):
        unit = {"TOKENS/S": "tok/s", "CACHED%": "% of prompt"}.get(e.type, "ms")
        lines.append(f"| {e.type} {e.name} ({unit}) | {e.count} | {e.failures} | {_fmt(e.p50)} | {_fmt(e.p95)} | "
                     f"{_fmt(e.p99)} |")
    return "\n".join(lines)
