"""Headless load test of the stack with Locust, plus our plots and an SLO verdict (`make loadtest`).

    python -m loadtest.run                                   # both users, mixed scenario, local stack
    python -m loadtest.run --host http://10.0.0.5:8000 --grpc-target 10.0.0.5:9000 \\
        --users 32 --spawn-rate 4 --run-time 5m --scenario shared_prefix,multi_turn
    python -m loadtest.run --slo-ttft-p95-ms 800 --slo-itl-p95-ms 60 --slo-error-rate 0.01   # exit 1 on a miss
    make loadtest LOADTEST_ARGS="--users 8 --run-time 2m"

Writes into --results (default loadtest/results/tmp/<time>/): Locust's report.html and
locust_*.csv, summary.md, ttft.png, itl.png, throughput.png, errors.png. Locust runs as a
subprocess (it monkey-patches the interpreter at import); this process only reads its CSVs.
Exit status: 0, or 1 when an SLO is missed, or Locust's own status when Locust itself failed.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from loadtest.report import SLO, check_slo, read_results, summary_markdown
from loadtest.scenarios import SCENARIOS, Settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCUSTFILES = {"rest": HERE / "locustfile_rest.py", "grpc": HERE / "locustfile_grpc.py"}
DEFAULT_GRPC_APP = "inference"   # the Serve application name of services/app.py (APP_NAME)
LOCAL_KEYS_FILE = REPO / ".run" / "api_keys.yaml"   # the dev key `make run` writes


def _duration(raw: str) -> str:
    if not re.fullmatch(r"(\d+h)?(\d+m)?(\d+s?)?", raw) or not raw:
        raise argparse.ArgumentTypeError(f"run time must look like 30s, 5m or 1h30m, got {raw!r}")
    return raw


def _fraction(raw: str) -> float:
    v = float(raw)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"an error rate is a fraction in [0, 1] (0.01 = 1%), got {raw}")
    return v


def _scenarios(raw: str) -> list[str]:
    names = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in names if n not in SCENARIOS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {bad or raw!r}; choose from {', '.join(SCENARIOS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="REST base URL")
    p.add_argument("--grpc-target", default="127.0.0.1:9000", help="gRPC host:port")
    p.add_argument("--grpc-app", default=DEFAULT_GRPC_APP,
                   help='Ray Serve application name sent as gRPC metadata ("" = none)')
    p.add_argument("--user", choices=("rest", "grpc", "both"), default="both", help="which Locust user(s)")
    p.add_argument("-u", "--users", type=int, default=4, help="concurrent users (split evenly between users)")
    p.add_argument("-r", "--spawn-rate", type=float, default=1.0, help="users started per second")
    p.add_argument("-t", "--run-time", type=_duration, default="60s", help="e.g. 30s, 5m, 1h")
    p.add_argument("--scenario", type=_scenarios, default=["mixed"],
                   help=f"comma-separated, from: {', '.join(SCENARIOS)} (Locust tags)")
    p.add_argument("--results", type=Path, default=None, help="results folder (default loadtest/results/tmp/<time>)")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", action="append", default=[], help="repeat for several tenants")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="a keys file ({keys: [{key, tenant}]}) whose keys the users share; default: "
                        ".run/api_keys.yaml (from `make run`) when no --api-key is given")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on every reply's max_tokens")
    p.add_argument("--max-model-len", type=int, default=None, help="context to size prompts for (default: ask)")
    p.add_argument("--ignore-eos", action="store_true", help="fixed reply lengths (not for the JSON scenario)")
    p.add_argument("--think-time", type=float, default=1.0, help="max seconds a user waits between requests")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the prompts (default: a random one, printed; a rerun with the same seed "
                        "finds its prompts in the server's prefix cache)")
    p.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds users get to finish in-flight requests when the run time is up")
    p.add_argument("--slo-ttft-p95-ms", type=float, default=None, help="SLO: p95 TTFT of every entry")
    p.add_argument("--slo-itl-p95-ms", type=float, default=None, help="SLO: p95 inter-token latency of every entry")
    p.add_argument("--slo-error-rate", type=_fraction, default=None, help="SLO: failed/all requests, e.g. 0.01")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--title", default=None, help="title of the plots and summary (default: the run's settings)")
    p.add_argument("--from-csv", type=Path, default=None, metavar="PREFIX",
                   help="no run: report (plots, summary, SLOs) on an earlier run's CSVs, e.g. ones copied "
                        "from the distributed master on Kubernetes (PREFIX_stats.csv ...)")
    args = p.parse_args(argv)
    n_classes = 2 if args.user == "both" else 1
    if args.users < n_classes:
        p.error(f"--users {args.users} is fewer than the {n_classes} user classes of --user {args.user}")
    if args.spawn_rate <= 0:
        p.error("--spawn-rate must be > 0")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    return args


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    path = args.api_keys_file or (LOCAL_KEYS_FILE if not args.api_key and LOCAL_KEYS_FILE.is_file() else None)
    if path is None:
        return tuple(args.api_key)
    import yaml
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get("keys") or []
        keys = tuple(e["key"] for e in entries)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, KeyError) as e:
        raise SystemExit(f"--api-keys-file {path}: expected {{keys: [{{key, tenant}}, ...]}} ({e})") from None
    if not keys:
        raise SystemExit(f"--api-keys-file {path} holds no key")
    print(f"API keys: {len(keys)} from {path}", flush=True)
    return (*args.api_key, *keys)


def locust_command(args: argparse.Namespace, prefix: Path, html: Path) -> list[str]:
    files = [LOCUSTFILES[u] for u in (("rest", "grpc") if args.user == "both" else (args.user,))]
    return [sys.executable, "-m", "locust", "-f", ",".join(str(f) for f in files), "--headless",
            "--host", args.host, "-u", str(args.users), "-r", f"{args.spawn_rate:g}", "-t", args.run_time,
            "--tags", *args.scenario, "--csv", str(prefix), "--csv-full-history", "--html", str(html),
            "--only-summary", "--stop-timeout", f"{args.stop_timeout:g}s",
            # Failures are judged here (SLO mode), not by Locust's exit status.
            "--exit-code-on-error", "0"]


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(model=args.model, api_keys=api_keys(args), grpc_target=args.grpc_target,
                    grpc_app=args.grpc_app or None, max_tokens=args.max_tokens, max_model_len=args.max_model_len,
                    ignore_eos=args.ignore_eos, think_time_s=args.think_time, timeout_s=args.timeout,
                    seed=args.seed)


def report(args: argparse.Namespace, prefix: Path, results_dir: Path, command: str) -> int:
    """Summary, plots and the SLO verdict from Locust's CSVs at `prefix`."""
    results = read_results(prefix)
    title = f"{args.user} users={args.users} scenario={','.join(args.scenario)} {args.run_time}"
    if args.from_csv is not None:
        title = f"report of {prefix.parent.name}/{prefix.name}"
    title = args.title or title
    summary = summary_markdown(results)
    if not args.no_plots:
        from loadtest.plots import plot_all   # matplotlib only when plotting
        made = plot_all(results, results_dir, title)
        summary += "\n\nplots: " + ", ".join(p.name for p in made)
    slo = SLO(args.slo_ttft_p95_ms, args.slo_itl_p95_ms, args.slo_error_rate)
    breaches = check_slo(results, slo) if slo.is_set else []
    if slo.is_set:
        goals = [f"p95 {k} <= {v:g} ms" for k, v in (("TTFT", slo.ttft_p95_ms), ("ITL", slo.itl_p95_ms))
                 if v is not None] + ([f"error rate <= {slo.error_rate:.2%}"] if slo.error_rate is not None else [])
        summary += "\n\n" + ("\n".join(f"SLO MISSED: {b}" for b in breaches) or f"SLO met: {', '.join(goals)}.")
    (results_dir / "summary.md").write_text(f"# {title}\n\n```\n{command}\n```\n\n{summary}\n")
    print(summary)
    print(f"\nresults: {results_dir}")
    return 1 if breaches else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    invocation = " ".join(["python -m loadtest.run", *argv])
    if args.from_csv is not None:
        out = args.results or args.from_csv.parent
        out.mkdir(parents=True, exist_ok=True)
        return report(args, args.from_csv, out, invocation)
    if args.user != "rest" and not (REPO / "services" / "gen" / "inference" / "v1" / "inference_pb2.py").is_file():
        print("The gRPC stubs are missing: run `make proto` (or use --user rest).", file=sys.stderr)
        return 2
    if args.seed is None:   # fresh prompts, so the server's prefix cache holds none of them yet
        args.seed = random.randrange(1_000_000)
        invocation += f"  # prompt seed {args.seed}: add --seed {args.seed} to repeat the prompts"
    results_dir = args.results or REPO / "loadtest" / "results" / "tmp" / time.strftime("%Y%m%d-%H%M%S")
    results_dir.mkdir(parents=True, exist_ok=True)
    prefix, html = results_dir / "locust", results_dir / "report.html"
    cmd = locust_command(args, prefix, html)
    env = {**os.environ, **settings_from(args).to_env(), "PYTHONPATH": str(REPO)}
    print("$ " + " ".join(cmd), flush=True)
    with (results_dir / "locust.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not Path(f"{prefix}_stats.csv").is_file():
        tail = (results_dir / "locust.log").read_text()[-3000:]
        print(f"Locust failed (exit {proc.returncode}); its log ends with:\n{tail}", file=sys.stderr)
        return proc.returncode or 2
    return report(args, prefix, results_dir, f"{invocation}\n# which ran:\n{' '.join(cmd)}")


if __name__ == "__main__":
    sys.exit(main())
