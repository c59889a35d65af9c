"""`make bench`: every CPU benchmark of the stack, one after another, each in its own process.

    python -m loadtest.bench                   # all parts
    python -m loadtest.bench engine gateway    # some parts

Each part prints (and saves) its own JSON side by side with its baseline measured in the same run:
  engine   our engine vs HF transformers generate() on the tiny model (loadtest/bench_engine.py)
  gateway  TTFT added by the gateway + Ray Serve over the engine alone (loadtest/bench_gateway.py)
  grammar  compile time per spec kind, mask overhead vs unconstrained decoding (loadtest/bench_grammar.py)
  prefix   TTFT for a long shared prefix: recompute vs local hit vs Redis fetch (loadtest/bench_prefix.py)
  spec     decode tokens/s with and without speculation per proposer (loadtest/bench_spec.py)
Results land in loadtest/results/*_cpu.json. GPU figures: `python -m loadtest.bench_engine --device cuda`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtest" / "results"

PARTS: dict[str, list[str]] = {
    "engine": ["loadtest.bench_engine", "--device", "cpu"],
    "gateway": ["loadtest.bench_gateway", "--out", str(RESULTS / "bench_gateway_cpu.json")],
    "grammar": ["loadtest.bench_grammar", "--out", str(RESULTS / "grammar_cpu.json")],
    "prefix": ["loadtest.bench_prefix", "--out", str(RESULTS / "prefix_cpu.json")],
    "spec": ["loadtest.bench_spec", "--device", "cpu", "--out", str(RESULTS / "bench_spec_cpu.json")],
}


def main(argv: list[str]) -> int:
    names = argv or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"unknown part(s) {unknown}; choose from {list(PARTS)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        print(f"\n=== {name}: python -m {' '.join(PARTS[name])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", *PARTS[name]], cwd=REPO)
        print(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed parts: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
