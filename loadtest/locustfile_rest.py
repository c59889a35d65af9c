"""Locust user for the OpenAI REST surface: streaming /v1/chat/completions and /v1/completions.

    python -m loadtest.run --user rest --scenario short_chat          # the usual way (plots, SLOs)
    locust -f loadtest/locustfile_rest.py --host http://127.0.0.1:8000 --tags shared_prefix

Each scenario of loadtest/scenarios is one task, tagged with its name (`--tags` picks them).
Metrics are Locust entries (see loadtest/scenarios/outcome.py): "REST" per request (failures
there), "TTFT", "ITL", "TOKENS/S" and "CACHED%" named "rest <scenario>". Settings: LOADTEST_* env vars
(loadtest/scenarios/settings.py). Imports nothing of the server.
"""
from __future__ import annotations

import itertools
import json
import random
import sys
import time
from pathlib import Path

import requests
from locust import User, tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root: loadtest.scenarios
from loadtest.scenarios import SCENARIOS, Budget, ScenarioSource, Settings, StreamTimer  # noqa: E402
from loadtest.scenarios.outcome import Outcome  # noqa: E402
from loadtest.scenarios.settings import next_user_index  # noqa: E402

SETTINGS = Settings.from_env()
_random_seed = random.randrange(2**31)   # used when LOADTEST_SEED is not set


def _error_text(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return f"HTTP {resp.status_code} {err.get('code') or err.get('type') or ''}: {err.get('message', '')}"[:300]
    except (ValueError, AttributeError):
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


def _scenario_task(scenario: str):
    def run(user: "RestUser") -> None:
        user.run_scenario(scenario)
    run.__name__ = scenario
    return tag(scenario)(run)


class RestUser(User):
    _key_indexes = itertools.count()
    host = "http://127.0.0.1:8000"
    tasks = {_scenario_task(name): 1 for name in SCENARIOS}

    def wait_time(self) -> float:
        return random.uniform(0, SETTINGS.think_time_s)

    def on_start(self) -> None:
        self.index = next_user_index()
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        # Keys by the class's own count, so each protocol spreads over every tenant.
        key = SETTINGS.api_key_for(next(self._key_indexes))
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.model: str | None = None
        self.source: ScenarioSource | None = None
        self.num_discovery_failures = 0

    def on_stop(self) -> None:
        self.session.close()

    def _fire(self, request_type: str, name: str, value: float, length: int, error: Exception | None) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                             response_length=length, exception=error, context={})

    def _seed(self) -> int:
        worker_index = getattr(self.environment.runner, "worker_index", 0) or 0   # distributed: one per worker
        return SETTINGS.user_seed(self.index, worker_index, _random_seed)

    def _discover(self) -> bool:
        """Model name and context length from GET /v1/models (once per user; retried on failure)."""
        t0 = time.perf_counter()
        try:
            resp = self.session.get(self.host.rstrip("/") + "/v1/models", timeout=30)
            if resp.status_code != 200:
                raise RuntimeError(_error_text(resp))
            models = resp.json()["data"]
            entry = next((m for m in models if m["id"] == SETTINGS.model), None) if SETTINGS.model else models[0]
            if entry is None:
                raise RuntimeError(f"LOADTEST_MODEL={SETTINGS.model!r} is not served; the server has "
                                   f"{[m['id'] for m in models]}")
        except Exception as e:   # recorded as a failure, the user retries at its next task
            self._fire("REST", "/v1/models", (time.perf_counter() - t0) * 1000, 0, e)
            return False
        self._fire("REST", "/v1/models", (time.perf_counter() - t0) * 1000, 0, None)
        self.model = entry["id"]
        max_len = SETTINGS.max_model_len or int(entry.get("max_model_len") or 2048)
        self.source = ScenarioSource(Budget(max_len), self._seed(), SETTINGS.max_tokens,
                                     SETTINGS.ignore_eos)
        return True

    def run_scenario(self, scenario: str) -> None:
        if self.source is None and not self._discover():
            # Back off (greenlet sleep) so a wrong key or URL is not hammered by every user.
            self.num_discovery_failures += 1
            time.sleep(min(10.0, 0.5 * 2 ** self.num_discovery_failures))
            return
        req = self.source.build(scenario)
        path = "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"
        out = Outcome("REST", req, StreamTimer(time.perf_counter()))
        try:
            with self.session.post(self.host.rstrip("/") + path, data=json.dumps(req.body(self.model)),
                                   stream=True, timeout=SETTINGS.timeout_s) as resp:
                if resp.status_code != 200:
                    out.fail(_error_text(resp), time.perf_counter())
                else:
                    self._read_sse(resp, out)
        except requests.RequestException as e:
            out.fail(f"{type(e).__name__}: {e}"[:300], time.perf_counter())
        if out.error is None:
            out.finish(time.perf_counter(), self.source.budget)
        else:
            req.record_reply(None)
        for entry in out.entries():
            self._fire(*entry)

    @staticmethod
    def _read_sse(resp: requests.Response, out: Outcome) -> None:
        chat = out.request.kind == "chat"
        done = False
        # chunk_size=None: hand over each HTTP chunk as it arrives (a size would wait for that many bytes).
        for line in resp.iter_lines(chunk_size=None):
            if not line or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if "error" in chunk:
                err = chunk["error"]
                out.fail(f"stream error {err.get('code') or err.get('type')}: {err.get('message')}"[:300], now)
                return
            usage = chunk.get("usage")
            if usage:
                out.prompt_tokens, out.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
                out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            for choice in chunk.get("choices") or []:
                if chat:
                    delta = choice.get("delta") or {}
                    if "role" in delta and not delta.get("content") and choice.get("finish_reason") is None:
                        continue   # OpenAI's opening chunk: the role, no token yet
                    out.text += delta.get("content") or ""
                else:
                    out.text += choice.get("text") or ""
                out.timer.on_tokens(now, None)
                if choice.get("finish_reason") is not None:
                    out.finish_reason = choice["finish_reason"]
        if not done:
            out.fail("the stream ended without 'data: [DONE]'", time.perf_counter())
