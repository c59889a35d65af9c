"""PNG plots of a load test, from Locust's stats history (`--csv-full-history`):

  ttft.png        TTFT p50 / p95 / p99 over time, a panel per protocol and percentile, a line per scenario
  itl.png         the same for inter-token latency
  throughput.png  output tokens/s and requests/s per protocol, with the number of users
  errors.png      failed requests/s per protocol and the cumulative error rate

Locust's history percentiles cover a sliding window of recent samples (10 s by default), so a curve
shows how latency moved during the run, not a running total.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.report import REQUEST_TYPES, Results, Sample  # noqa: E402

PROTOCOLS = {"rest": "REST", "grpc": "gRPC"}   # entry-name prefix → request type
DPI = 80


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    # A 64-colour palette keeps line plots sharp at about a third of the size (results get committed).
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


def _t0(results: Results) -> float:
    return min((s.timestamp for s in results.history), default=0.0)


def _by_name(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        out[s.name].append(s)
    return {k: sorted(v, key=lambda s: s.timestamp) for k, v in sorted(out.items())}


def _pct(s: Sample, pct: str) -> float:
    # Locust writes 0 for every percentile until its window holds two snapshots: no data, not 0 ms.
    value = s.percentiles.get(pct)
    return float("nan") if value is None or not s.percentiles.get("100%") else value


def _scale(ax) -> None:
    """Linear from 0, or logarithmic when a stall dwarfs the rest (then a 0 ms point, tokens that
    arrived together, is not drawn)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y == y]
    positive = [y for y in ys if y > 0]
    if positive and max(ys) > 20 * max(1.0, sorted(ys)[len(ys) // 2]):
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 1.5, max(ys) * 1.5)
    else:
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1] * 1.15))   # flat lines stay off the frame


def latency_plot(results: Results, kind: str, path: Path, title: str) -> Path | None:
    """One panel per (protocol, percentile); a line per scenario. None when there is nothing to draw."""
    t0 = _t0(results)
    named = _by_name([s for s in results.history if s.type == kind])
    protocols = [p for p in PROTOCOLS if any(n.startswith(p + " ") for n in named)]
    if not protocols:
        return None
    pcts = ("50%", "95%", "99%")
    fig, axes = plt.subplots(len(protocols), len(pcts), figsize=(13, 3.4 * len(protocols)), squeeze=False,
                             sharex=True)
    scenarios = sorted({n.split(" ", 1)[1] for n in named})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(scenarios)}
    for row, proto in enumerate(protocols):
        for col, pct in enumerate(pcts):
            ax = axes[row][col]
            for name, samples in named.items():
                if not name.startswith(proto + " "):
                    continue
                scenario = name.split(" ", 1)[1]
                xs = [s.timestamp - t0 for s in samples]
                ys = [_pct(s, pct) for s in samples]
                ax.plot(xs, ys, color=colors[scenario], label=scenario, linewidth=1.4)
            ax.set_title(f"{PROTOCOLS[proto]} {kind} p{pct.rstrip('%')}", fontsize=10)
            ax.set_ylabel("ms")
            _scale(ax)
            ax.grid(alpha=0.3)
            if row == len(protocols) - 1:
                ax.set_xlabel("seconds since start")
    handles = [plt.Line2D([], [], color=colors[s], label=s) for s in scenarios]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=min(len(handles), 4))
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save(fig, path)
    return path


def _sum_by_time(samples: list[Sample], attr: str) -> tuple[list[float], list[float]]:
    acc: dict[float, float] = defaultdict(float)
    for s in samples:
        acc[s.timestamp] += getattr(s, attr)
    ts = sorted(acc)
    return ts, [acc[t] for t in ts]


def throughput_plot(results: Results, path: Path, title: str) -> Path | None:
    if not results.history:
        return None
    t0 = _t0(results)
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(13, 3.8))
    for proto, rtype in PROTOCOLS.items():
        # Every output token is one TTFT sample (the first) or one ITL sample (the rest).
        tok = [s for s in results.history if s.type in ("TTFT", "ITL") and s.name.startswith(proto + " ")]
        req = [s for s in results.history if s.type == rtype]
        if tok:
            ts, ys = _sum_by_time(tok, "rps")
            ax_tok.plot([t - t0 for t in ts], ys, label=rtype)
        if req:
            ts, ys = _sum_by_time(req, "rps")
            ax_req.plot([t - t0 for t in ts], ys, label=rtype)
    users = {s.timestamp: s.user_count for s in results.history}
    ax_users = ax_req.twinx()
    ts = sorted(users)
    ax_users.plot([t - t0 for t in ts], [users[t] for t in ts], color="grey", linestyle=":", label="users")
    ax_users.set_ylabel("users")
    ax_users.set_ylim(bottom=0)
    for ax, label in ((ax_tok, "output tokens/s"), (ax_req, "requests/s")):
        ax.set_ylabel(label)
        ax.set_xlabel("seconds since start")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return path


def errors_plot(results: Results, path: Path, title: str) -> Path | None:
    reqs = [s for s in results.history if s.type in REQUEST_TYPES]
    if not reqs:
        return None
    t0 = _t0(results)
    fig, (ax_rate, ax_cum) = plt.subplots(1, 2, figsize=(13, 3.8))
    for rtype in REQUEST_TYPES:
        mine = [s for s in reqs if s.type == rtype]
        if not mine:
            continue
        ts, fails = _sum_by_time(mine, "failures_per_s")
        ax_rate.plot([t - t0 for t in ts], fails, label=rtype)
        _, total = _sum_by_time(mine, "total_count")
        _, failed = _sum_by_time(mine, "total_failures")
        ax_cum.plot([t - t0 for t in ts], [100 * f / n if n else 0.0 for f, n in zip(failed, total)], label=rtype)
    ax_rate.set_ylabel("failed requests/s")
    ax_cum.set_ylabel("failed / all requests so far (%)")
    for ax in (ax_rate, ax_cum):
        ax.set_xlabel("seconds since start")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_all(results: Results, out_dir: Path, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [latency_plot(results, "TTFT", out_dir / "ttft.png", f"Time to first token: {title}"),
            latency_plot(results, "ITL", out_dir / "itl.png", f"Inter-token latency: {title}"),
            throughput_plot(results, out_dir / "throughput.png", f"Throughput: {title}"),
            errors_plot(results, out_dir / "errors.png", f"Errors: {title}")]
    return [p for p in made if p is not None]
