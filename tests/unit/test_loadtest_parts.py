"""The load test's locust-free parts: scenarios, stream timing, outcomes → Locust entries, settings,
the CSV report, SLO checks and plots. (Locust itself runs only as a subprocess, in
tests/integration/test_loadtest.py.)"""
from __future__ import annotations

import csv
import json

import pytest

from loadtest.report import PERCENTILES, SLO, check_slo, read_results, summary_markdown
from loadtest.run import parse_args
from loadtest.scenarios import MIX, SCENARIOS, Budget, ScenarioSource, Settings, StreamTimer, check_json_reply
from loadtest.scenarios.outcome import Outcome, ReplyError


# ---- scenarios -------------------------------------------------------------------------------
def test_every_scenario_builds_a_valid_openai_body():
    src = ScenarioSource(Budget(1024), seed=3)
    for name in SCENARIOS:
        req = src.build(name)
        body = req.body("tiny")
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert ("messages" in body) == (req.kind == "chat") and ("prompt" in body) == (req.kind == "completion")
        json.dumps(body)   # what the REST user posts


def test_scenarios_are_deterministic_per_seed_and_differ_between_users():
    a, b, c = (ScenarioSource(Budget(1024), seed=s) for s in (1, 1, 2))
    bodies = [[src.build("short_chat").body("m") for _ in range(5)] for src in (a, b, c)]
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


def test_shared_prefix_is_byte_identical_across_users_and_sized_by_the_context():
    small, big = ScenarioSource(Budget(256), seed=1), ScenarioSource(Budget(4096), seed=2)
    s1 = ScenarioSource(Budget(4096), seed=9).build("shared_prefix").messages[0]["content"]
    s2 = big.build("shared_prefix").messages[0]["content"]
    assert s1 == s2
    assert len(small.build("shared_prefix").messages[0]["content"]) < len(s2)


def test_long_context_fills_about_three_quarters_of_the_context_at_the_estimated_ratio():
    budget = Budget(1024)
    budget.observe(prompt_chars=3000, prompt_tokens=1000)     # 3 chars per token
    req = ScenarioSource(budget, seed=0).build("long_context")
    est_tokens = len(req.prompt) / budget.chars_per_token
    assert 0.6 * 1024 < est_tokens + req.max_tokens <= 0.76 * 1024


def test_budget_keeps_the_most_conservative_ratio():
    b = Budget(512)
    b.observe(400, 100)
    b.observe(900, 300)
    b.observe(0, 0)          # ignored
    assert b.chars_per_token == 3.0 and b.num_observed == 2


def test_multi_turn_grows_with_replies_and_restarts_after_a_failure_or_the_turn_limit():
    src = ScenarioSource(Budget(100_000), seed=0)
    r1 = src.build("multi_turn")
    r1.record_reply("first answer")
    r2 = src.build("multi_turn")
    assert [m["role"] for m in r2.messages] == ["user", "assistant", "user"]
    assert r2.messages[1]["content"] == "first answer"
    r2.record_reply(None)    # failed: roles must still alternate next time
    assert [m["role"] for m in src.build("multi_turn").messages] == ["user"]
    for _ in range(20):
        req = src.build("multi_turn")
        req.record_reply("ok")
        assert len(req.messages) <= 2 * 8 - 1


def test_multi_turn_restarts_before_outgrowing_the_context():
    src = ScenarioSource(Budget(200), seed=0)
    for _ in range(10):
        req = src.build("multi_turn")
        assert src.budget.tokens_in(req.prompt_chars) < 200
        req.record_reply("x" * 120)


def test_mixed_sets_the_priority_of_the_class_and_caps_apply():
    src = ScenarioSource(Budget(1024), seed=5, max_tokens_cap=4, ignore_eos=True)
    seen = set()
    for _ in range(200):
        req = src.build("mixed")
        seen.add(req.scenario)
        assert req.priority == MIX[req.scenario][1]
        assert req.max_tokens <= 4
        assert req.ignore_eos != req.expect_json    # a JSON reply must be allowed to end itself
    assert seen == set(MIX)


def test_unknown_scenario_names_the_choices():
    with pytest.raises(ValueError, match="short_chat"):
        ScenarioSource(Budget(64), seed=0).build("nope")


def test_json_reply_check():
    assert check_json_reply('{"name": "A", "age": 3, "city": "B", "occupation": "C"}') is None
    assert "not valid JSON" in check_json_reply('{"name": ')
    assert "lacks" in check_json_reply('{"name": "A"}')


# ---- stream timing and outcomes -------------------------------------------------------------
def test_known_token_counts_give_one_itl_sample_per_token():
    t = StreamTimer(started=10.0)
    t.on_tokens(10.5, 1)
    t.on_tokens(10.7, 2)     # two tokens after 0.2 s: two samples of 0.1
    t.on_tokens(10.8, 0)     # a finish-only message is not a token
    t.on_tokens(11.0, 1)
    assert t.ttft_s == 0.5
    assert t.itl_samples() == pytest.approx([0.1, 0.1, 0.3])
    assert t.num_tokens() == 4
    assert t.tokens_per_s() == pytest.approx(3 / 0.5)


def test_unknown_counts_spread_usage_over_the_gaps_earliest_first():
    t = StreamTimer(started=0.0)
    for now in (1.0, 1.2, 1.4, 1.6):
        t.on_tokens(now, None)
    samples = t.itl_samples(total_tokens=5)          # 4 tokens after the first over 3 gaps: 2, 1, 1
    assert samples == pytest.approx([0.1, 0.1, 0.2, 0.2])
    assert sum(samples) == pytest.approx(0.6)
    assert t.itl_samples(total_tokens=3) == pytest.approx([0.2, 0.2])   # the last gap carried no token


def _outcome(**kw) -> Outcome:
    req = ScenarioSource(Budget(1024), seed=0).build(kw.pop("scenario", "short_chat"))
    timer = StreamTimer(started=0.0)
    for now in (0.2, 0.25, 0.3):
        timer.on_tokens(now, 1)
    return Outcome("gRPC", req, timer, **kw)


def test_a_successful_outcome_becomes_request_ttft_itl_and_rate_entries():
    out = _outcome(text="hi", finish_reason="length", prompt_tokens=20, completion_tokens=3, cached_tokens=16)
    out.finish(0.31, Budget(1024))
    entries = out.entries()
    kinds = [(e[0], e[1]) for e in entries]
    assert kinds[0] == ("gRPC", "short_chat") and entries[0][4] is None and entries[0][3] == 3
    assert entries[0][2] == pytest.approx(310)
    assert ("TTFT", "grpc short_chat") in kinds
    assert [e[2] for e in entries if e[0] == "ITL"] == pytest.approx([50, 50])
    assert [e[2] for e in entries if e[0] == "TOKENS/S"] == pytest.approx([20.0])
    assert [(e[2], e[3]) for e in entries if e[0] == "CACHED%"] == [(80.0, 16)]


def test_failures_record_only_the_request_entry():
    out = _outcome()
    out.fail("HTTP 429 queue_full: retry later", 0.4)
    (entry,) = out.entries()
    assert isinstance(entry[4], ReplyError) and "429" in str(entry[4])


def test_a_stream_without_finish_or_with_bad_json_fails():
    out = _outcome()
    out.finish(0.5, Budget(1024))
    assert "finish_reason" in out.error
    bad = _outcome(scenario="json_extraction", text='{"name": 1', finish_reason="stop")
    bad.finish(0.5, Budget(1024))
    assert "not valid JSON" in bad.error


# ---- settings and CLI -----------------------------------------------------------------------
def test_settings_round_trip_through_env():
    s = Settings(model="tiny", api_keys=("k1", "k2"), grpc_target="h:1", grpc_app="inference", max_tokens=8,
                 max_model_len=512, ignore_eos=True, think_time_s=0.5, timeout_s=30.0, seed=4)
    assert Settings.from_env(s.to_env()) == s
    assert Settings.from_env({}) == Settings()
    assert s.api_key_for(3) == "k2"


@pytest.mark.parametrize("env, message", [({"LOADTEST_MAX_TOKENS": "lots"}, "LOADTEST_MAX_TOKENS must be an integer"),
                                          ({"LOADTEST_MAX_TOKENS": "0"}, ">= 1"),
                                          ({"LOADTEST_IGNORE_EOS": "maybe"}, "true or false"),
                                          ({"LOADTEST_GRPC_TARGET": "nohost"}, "host:port")])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("argv, message", [(["--scenario", "bogus"], "unknown scenario"),
                                           (["--users", "1"], "fewer than the 2 user classes"),
                                           (["--run-time", "soon"], "run time"),
                                           (["--slo-error-rate", "5"], "fraction")])
def test_bad_cli_arguments_say_what_to_change(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


# ---- report, SLO, plots ---------------------------------------------------------------------
def _write_stats(prefix, rows):
    header = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
              "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
              *PERCENTILES]
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for typ, name, count, fails, p95 in rows:
            w.writerow([typ, name, count, fails, p95 / 2, p95 / 2, 1, p95, 0, 1.0, 0.0,
                        *[p95 if p in ("95%", "98%", "99%", "99.9%", "99.99%", "100%") else p95 / 2
                          for p in PERCENTILES]])
        w.writerow(["", "Aggregated", 999, 9, 1, 1, 1, 1, 0, 1, 0, *["1"] * len(PERCENTILES)])


def test_slo_check_per_entry_and_error_rate(tmp_path):
    prefix = tmp_path / "locust"
    _write_stats(prefix, [("REST", "short_chat", 98, 0, 900), ("gRPC", "short_chat", 100, 2, 800),
                          ("TTFT", "rest short_chat", 98, 0, 400), ("TTFT", "grpc short_chat", 98, 0, 700),
                          ("ITL", "rest short_chat", 3000, 0, 30), ("ITL", "grpc short_chat", 3000, 0, 35)])
    results = read_results(prefix)
    assert results.num_requests == 198 and results.num_failures == 2
    assert check_slo(results, SLO(ttft_p95_ms=700, itl_p95_ms=35, error_rate=0.02)) == []
    breaches = check_slo(results, SLO(ttft_p95_ms=500, itl_p95_ms=10, error_rate=0.001))
    assert any(b.startswith("TTFT grpc short_chat: p95 700") for b in breaches)
    assert not any("TTFT rest" in b for b in breaches)
    assert sum(b.startswith("ITL") for b in breaches) == 2
    assert any(b.startswith("errors: 2/198") for b in breaches)
    assert "| TTFT grpc short_chat (ms) | 98 | 0 | 350 | 700 | 700 |" in summary_markdown(results)


def test_a_latency_slo_without_samples_is_missed(tmp_path):
    _write_stats(tmp_path / "x", [("REST", "short_chat", 5, 5, 10)])
    breaches = check_slo(read_results(tmp_path / "x"), SLO(ttft_p95_ms=1e9))
    assert breaches and "no samples" in breaches[0]


def test_missing_csv_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="--csv"):
        read_results(tmp_path / "none")


def test_plots_from_a_history(tmp_path):
    from loadtest.plots import plot_all
    prefix = tmp_path / "locust"
    _write_stats(prefix, [("REST", "short_chat", 1, 0, 1)])
    header = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", *PERCENTILES,
              "Total Request Count", "Total Failure Count"]
    with open(f"{prefix}_stats_history.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for t in range(10):
            for typ, name, v in (("TTFT", "rest short_chat", 300 + t), ("TTFT", "grpc mixed", 200),
                                 ("ITL", "grpc mixed", 20), ("REST", "short_chat", 900), ("gRPC", "mixed", 800)):
                w.writerow([1000 + t, 4, typ, name, 2.0, 0.1 * (typ == "REST"), *[v] * len(PERCENTILES), 10 * t, t])
    made = plot_all(read_results(prefix), tmp_path / "plots", "unit")
    assert sorted(p.name for p in made) == ["errors.png", "itl.png", "throughput.png", "ttft.png"]
    from PIL import Image
    for p in made:
        with Image.open(p) as im:
            assert im.width > 800 and len(im.convert("RGB").getcolors(256) or []) > 4   # drawn, not blank


# ---- distributed Locust manifests -----------------------------------------------------------
def test_k8s_loadtest_manifests_render_and_point_at_shipped_files():
    import shutil
    import subprocess
    from pathlib import Path

    import yaml
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([kubectl, "kustomize", str(repo / "k8s" / "loadtest")], capture_output=True, text=True,
                         check=True).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}
    master = docs[("Deployment", "inference-stack-loadtest-master")]["spec"]["template"]["spec"]["containers"][0]
    worker = docs[("Deployment", "inference-stack-loadtest-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert "--master" in master["args"] and worker["args"][:3] == ["--worker", "--master-host",
                                                                   "inference-stack-loadtest"]
    config = docs[("ConfigMap", "inference-stack-loadtest")]["data"]
    dockerfile = (repo / "k8s" / "loadtest" / "Dockerfile").read_text()
    for path in config["LOCUST_LOCUSTFILE"].split(","):
        rel = path.removeprefix("/app/")
        assert (repo / rel).is_file() and rel in dockerfile
    assert config["LOCUST_TAGS"] in SCENARIOS
    assert set(Settings.from_env(config).to_env()) <= set(config) | {"LOADTEST_API_KEYS", "LOADTEST_SEED",
                                                                      "LOADTEST_MAX_MODEL_LEN"}
    # Off by default: nothing of the stack's base pulls it in.
    assert "loadtest" not in (repo / "k8s" / "base" / "kustomization.yaml").read_text()
