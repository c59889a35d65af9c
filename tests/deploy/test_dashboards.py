"""The Grafana dashboards query only metrics that exist: the stack's own (services/telemetry/metrics.py,
parsed, not imported) or a short, named list from other exporters (Ray Serve, NVIDIA dcgm-exporter)."""
from __future__ import annotations

import ast
import json
import re

import pytest

from deploylib import CHART, REPO

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
METRICS_PY = REPO / "services" / "telemetry" / "metrics.py"

# Metrics the dashboards read from exporters that are not ours, each with where it comes from.
EXTERNAL = {
    "ray_serve_deployment_replica_healthy": "Ray Serve (Ray's metrics port 8080)",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA dcgm-exporter",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter",
    "DCGM_FI_PROF_DRAM_ACTIVE": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_POWER_USAGE": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_GPU_TEMP": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_SM_CLOCK": "NVIDIA dcgm-exporter",
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "bool", "offset", "inf", "nan",
             # aggregation operators: `sum by (x) (...)` puts the clause between name and parenthesis
             "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
             "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels
    (in `{...}` matchers or `by (...)` lists), strings, numbers, durations or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                          # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                                        # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                                       # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", s)
    s = re.sub(r"\$\w+", "", s)                                            # $__rate_interval etc.
    s = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d*)?([eE][+-]?\d+)?", "", s)       # numbers, 1e-9
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word, rest = m.group(0), s[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_queries(d: dict) -> list[str]:
    exprs = []
    for p in d["panels"]:
        exprs += [t["expr"] for t in p.get("targets", [])]
    for var in d.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict) and "query" in q:
            m = re.match(r"label_values\(\s*([^,]+),", q["query"])
            if m:
                exprs.append(m.group(1))
    return exprs


def defined_metrics() -> set[str]:
    """Every series name metrics.py makes: counters as *_total, histograms as *_bucket/_sum/_count."""
    if not METRICS_PY.is_file():
        pytest.skip("services/telemetry/metrics.py does not exist yet (the serving engineer writes it)")
    out: set[str] = set()
    for node in ast.walk(ast.parse(METRICS_PY.read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        args = node.args
        if len(args) > 1 and isinstance(args[0], ast.Name) and isinstance(args[1], ast.Constant):
            func, args = args[0].id, args[1:]     # a helper called with the family class first
        if not isinstance(args[0], ast.Constant):
            continue
        name = args[0].value
        if not (isinstance(name, str) and name.startswith("inference_")):
            continue
        kind = func.lower()
        if "counter" in kind:
            base = name.removesuffix("_total")
            out |= {base + "_total", base + "_created"}
        elif "histogram" in kind:
            out |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
        elif "summary" in kind:
            out |= {name, name + "_sum", name + "_count", name + "_created"}
        elif "gauge" in kind:
            out.add(name)
    assert out, "found no metric definitions in metrics.py"
    return out


def test_promql_parser_finds_metrics_not_labels():
    expr = ('histogram_quantile(0.99, sum by (le, tier) (rate(inference_kv_tier_fetch_seconds_bucket'
            '{namespace=~"$namespace", tier="redis"}[$__rate_interval]))) / ignoring(tier) group_left '
            'sum(up{job="x"}) + 1e-9')
    assert promql_metrics(expr) == {"inference_kv_tier_fetch_seconds_bucket", "up"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_grafana_json(path):
    d = json.loads(path.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    assert any(p["type"] == "timeseries" for p in d["panels"])
    for p in d["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_metrics_exist(path):
    ours = defined_metrics()
    used = set().union(*(promql_metrics(e) for e in dashboard_queries(json.loads(path.read_text()))))
    assert used, "a dashboard that queries nothing"
    unknown = {m for m in used if m not in ours and m not in EXTERNAL}
    assert unknown == set(), "queried but defined nowhere (services/telemetry/metrics.py or EXTERNAL)"


def test_service_dashboard_covers_the_issue():
    """Requests, errors by code, TTFT/ITL/e2e, throughput, queue, KV usage, prefix hits by tier,
    Redis latency, grammar compile time and cache hits, replicas."""
    d = json.loads((CHART / "dashboards" / "inference-service.json").read_text())
    used = set().union(*(promql_metrics(e) for e in dashboard_queries(d)))
    must = {"inference_requests_total", "inference_time_to_first_token_seconds_bucket",
            "inference_inter_token_latency_seconds_bucket", "inference_e2e_latency_seconds_bucket",
            "inference_generation_tokens_total", "inference_queue_length", "inference_kv_cache_usage_ratio",
            "inference_prefix_cache_hits_total", "inference_kv_tier_blocks_total",
            "inference_kv_tier_fetch_seconds_bucket", "inference_grammar_compile_seconds_bucket",
            "inference_grammar_cache_lookups_total", "ray_serve_deployment_replica_healthy"}
    assert must - used == set()


def test_service_dashboard_shows_speculation():
    """Acceptance, accepted length, draft latency, fallbacks and what the speculation gate measured."""
    d = json.loads((CHART / "dashboards" / "inference-service.json").read_text())
    used = set().union(*(promql_metrics(e) for e in dashboard_queries(d)))
    assert {"inference_spec_accepted_tokens_total", "inference_spec_proposed_tokens_total",
            "inference_spec_verify_steps_total", "inference_spec_draft_latency_seconds_sum",
            "inference_spec_fallbacks_total", "inference_spec_skipped_steps_total",
            "inference_spec_gate_tokens_per_second"} <= used


def test_gpu_dashboard_reads_dcgm():
    d = json.loads((CHART / "dashboards" / "inference-gpu.json").read_text())
    used = set().union(*(promql_metrics(e) for e in dashboard_queries(d)))
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= used
