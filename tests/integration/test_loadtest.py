"""`make loadtest` against the real local stack: `python -m services.run` (Ray Serve: Gateway +
LLMServer on the tiny model, real Redis) on free loopback ports, then `python -m loadtest.run` as a
subprocess (Locust monkey-patches the interpreter, so it never runs inside pytest) with both users,
two tenants and the mixed scenario.

One short load run (10 s) serves every check: the CSV has TTFT and ITL rows for the REST and
the gRPC user and no failure; the SLO mode exits 1 on an impossible TTFT threshold and 0 (from the
same CSVs, `--from-csv`) on generous ones.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.run import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
KEYS = ("sk-loadtest-alpha", "sk-loadtest-beta")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, redis_url):
    if not (Path(tiny_model_dir) / "config.json").is_file():
        pytest.skip(f"no tiny model at {tiny_model_dir} (scripts/make_tiny_models.py makes it)")
    tmp = tmp_path_factory.mktemp("loadtest-stack")
    keys = tmp / "keys.yaml"
    keys.write_text("keys:\n" + "".join(f"  - {{key: {k}, tenant: t{i}}}\n" for i, k in enumerate(KEYS)))
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "INFER_MODEL": tiny_model_dir, "INFER_HTTP_PORT": str(http),
           "INFER_GRPC_PORT": str(grpc_port), "INFER_HOST": "127.0.0.1", "INFER_REDIS_URL": redis_url,
           "INFER_API_KEYS_FILE": str(keys), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    log = (tmp / "stack.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "services.run"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"services.run exited {proc.returncode}:\n{(tmp / 'stack.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the stack was not ready in 180 s:\n{(tmp / 'stack.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"host": f"http://127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc_port}", "keys": keys}
    finally:
        proc.send_signal(signal.SIGTERM)     # services.run stops Serve and Ray on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})


def _rows(prefix: Path) -> list[dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_headless_load_on_both_users_records_ttft_itl_and_meets_only_sane_slos(stack, tmp_path):
    results = tmp_path / "results"
    run = _loadtest("--host", stack["host"], "--grpc-target", stack["grpc"], "--api-keys-file", str(stack["keys"]),
                    "--user", "both", "--users", "4", "--spawn-rate", "4", "--run-time", "10s", "--stop-timeout", "5",
                    "--scenario", "mixed", "--max-tokens", "8", "--ignore-eos", "--think-time", "0.2",
                    "--results", str(results),
                    # Impossible: no TTFT is under a microsecond. The run must say so and exit 1.
                    "--slo-ttft-p95-ms", "0.001", "--slo-error-rate", "0")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "SLO MISSED: TTFT" in run.stdout
    assert "SLO MISSED: errors" not in run.stdout          # the error-rate SLO (zero) is met

    rows = _rows(results / "locust")
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(r["Type"], []).append(r)
    for kind in ("TTFT", "ITL", "TOKENS/S"):
        for proto in ("rest", "grpc"):
            mine = [r for r in by_type.get(kind, []) if r["Name"].startswith(proto + " ")]
            assert mine and sum(int(r["Request Count"]) for r in mine) > 0, f"no {kind} rows for {proto}: {rows}"
    requests = by_type["REST"] + by_type["gRPC"]
    assert sum(int(r["Request Count"]) for r in requests) >= 4
    assert sum(int(r["Failure Count"]) for r in requests) == 0, (results / "locust_failures.csv").read_text()
    # --ignore-eos --max-tokens 8: every reply has 8 tokens, so 7 ITL samples per TTFT sample, on
    # both protocols (gRPC counts tokens per message, REST spreads usage over the SSE gaps). JSON
    # replies are exempt: a grammar may end them early.
    itl = {r["Name"]: int(r["Request Count"]) for r in by_type["ITL"]}
    for r in by_type["TTFT"]:
        if not r["Name"].endswith("json_extraction"):
            assert itl.get(r["Name"]) == 7 * int(r["Request Count"]), (r, itl)
    for name in ("report.html", "summary.md", "ttft.png", "itl.png", "throughput.png", "errors.png"):
        assert (results / name).stat().st_size > 0, name

    # The same CSVs against generous thresholds: the SLO is met, exit 0.
    again = _loadtest("--from-csv", str(results / "locust"), "--results", str(tmp_path / "again"), "--no-plots",
                      "--slo-ttft-p95-ms", "600000", "--slo-itl-p95-ms", "600000", "--slo-error-rate", "0")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "SLO met:" in again.stdout
