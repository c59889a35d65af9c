"""The engine benchmark's driver on the CPU: each KV cache dtype asked for runs in its own child beside the
others, and the report carries both (JSON summary and plot)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kv_cache_dtypes_run_side_by_side_into_one_report(tmp_path):
    subprocess.run([sys.executable, "-m", "loadtest.bench_engine", "--device", "cpu", "--skip-hf",
                    "--kv-cache-dtypes", "auto,fp8", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    report = json.loads((tmp_path / "engine_bench_cpu.json").read_text())
    entry = report["models"]["tiny-target"]
    assert entry["engine"]["kv_cache_dtype"] == "float32"
    assert entry["engine_fp8"]["kv_cache_dtype"] == "float8_e4m3fn"
    blocks = entry["engine"]["num_kv_blocks"]
    assert 4 * blocks <= entry["engine_fp8"]["num_kv_blocks"] < 4 * blocks + 4     # same memory, a quarter a block
    row = report["summary"][0]
    assert row["itl_ms"] > 0 and row["itl_ms_fp8"] > 0
    assert "--kv-cache-dtypes auto,fp8" in report["meta"]["command"]
    assert (tmp_path / "engine_bench_cpu.png").stat().st_size > 0
