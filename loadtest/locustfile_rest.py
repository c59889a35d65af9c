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
import sys
import time
from pathlib import Path

import requests
from locust import User, tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo root: loadtest.scenarios
from loadtest.scenarios import ScenarioRequest, Settings  # noqa: E402
from loadtest.scenarios.outcome import Outcome  # noqa: E402
from loadtest.scenarios.settings import next_user_index  # noqa: E402
from loadtest.scenarios.user import ScenarioUser, scenario_tasks  # noqa: E402

SETTINGS = Settings.from_env()


def _error_text(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error", {})
        return f"HTTP {resp.status_code} {err.get('code') or err.get('type') or ''}: {err.get('message', '')}"[:300]
    except (ValueError, AttributeError):
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


class RestUser(ScenarioUser, User):
    _key_indexes = itertools.count()
    host = "http://127.0.0.1:8000"
    tasks = scenario_tasks(tag)
    protocol, discovery_name, settings = "REST", "/v1/models", SETTINGS

    def on_start(self) -> None:
        self._start(next_user_index())
        self.session = requests.Session()
        self.session.headers["Content-Type"] = "application/json"
        # Keys by the class's own count, so each protocol spreads over every tenant.
        key = SETTINGS.api_key_for(next(self._key_indexes))
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def on_stop(self) -> None:
        self.session.close()

    def _list_models(self) -> list[tuple[str, int | None]]:
        resp = self.session.get(self.host.rstrip("/") + "/v1/models", timeout=30)
        if resp.status_code != 200:
            raise RuntimeError(_error_text(resp))
        return [(m["id"], int(m["max_model_len"]) if m.get("max_model_len") else None) for m in resp.json()["data"]]

    def _stream(self, req: ScenarioRequest, out: Outcome) -> None:
        path = "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"
        try:
            with self.session.post(self.host.rstrip("/") + path, data=json.dumps(req.body(self.model)),
                                   stream=True, timeout=SETTINGS.timeout_s) as resp:
                if resp.status_code != 200:
                    out.fail(_error_text(resp), time.perf_counter())
                else:
                    self._read_sse(resp, out)
        except requests.RequestException as e:
            out.fail(f"{type(e).__name__}: {e}"[:300], time.perf_counter())

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
