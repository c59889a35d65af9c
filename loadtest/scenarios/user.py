"""The protocol-independent half of both Locust users: model discovery with back-off, the seeded
scenario source, and turning an Outcome into Locust entries. No locust import (see __init__); the
locustfiles mix this into their `locust.User` and implement `_list_models` and `_stream`."""
from __future__ import annotations

import random
import time
from typing import Any

from loadtest.scenarios.catalog import SCENARIOS, ScenarioSource
from loadtest.scenarios.outcome import Outcome
from loadtest.scenarios.request import Budget, ScenarioRequest
from loadtest.scenarios.settings import Settings
from loadtest.scenarios.stream import StreamTimer

_RANDOM_SEED = random.randrange(2**31)   # used when LOADTEST_SEED is not set


def scenario_tasks(tag: Any) -> dict:
    """One Locust task per scenario, tagged with its name (`--tags` picks them); `tag` is locust's."""
    def task(scenario: str):
        def run(user: "ScenarioUser") -> None:
            user.run_scenario(scenario)
        run.__name__ = scenario
        return tag(scenario)(run)
    return {task(name): 1 for name in SCENARIOS}


class ScenarioUser:
    protocol = ""           # Locust request_type of whole requests: "REST" | "gRPC"
    discovery_name = ""     # Locust name of the model-discovery call
    settings: Settings

    def wait_time(self) -> float:
        return random.uniform(0, self.settings.think_time_s)

    def _start(self, index: int) -> None:
        self.index = index
        self.model: str | None = None
        self.source: ScenarioSource | None = None
        self.num_discovery_failures = 0

    # ---- what a protocol provides -----------------------------------------------------------------
    def _list_models(self) -> list[tuple[str, int | None]]:
        """(model id, max_model_len or None) for every served model; raises on failure."""
        raise NotImplementedError

    def _stream(self, req: ScenarioRequest, out: Outcome) -> None:
        """Send `req`, streaming its reply into `out` (text, timer, usage) or `out.fail(...)`."""
        raise NotImplementedError

    def _discovery_error(self, e: Exception) -> Exception:
        return e

    # ---- shared ----------------------------------------------------------------------------------
    def _fire(self, request_type: str, name: str, value: float, length: int, error: Exception | None) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                             response_length=length, exception=error, context={})

    def _seed(self) -> int:
        worker_index = getattr(self.environment.runner, "worker_index", 0) or 0   # distributed: one per worker
        return self.settings.user_seed(self.index, worker_index, _RANDOM_SEED)

    def _discover(self) -> bool:
        """Model name and context length from the server (once per user; retried on failure)."""
        s = self.settings
        t0 = time.perf_counter()
        try:
            models = self._list_models()
            if not models:
                raise RuntimeError("the server lists no model")
            entry = next((m for m in models if m[0] == s.model), None) if s.model else models[0]
            if entry is None:
                raise RuntimeError(f"LOADTEST_MODEL={s.model!r} is not served; the server has "
                                   f"{[m[0] for m in models]}")
        except Exception as e:   # recorded as a failure, the user retries at its next task
            self._fire(self.protocol, self.discovery_name, (time.perf_counter() - t0) * 1000, 0,
                       self._discovery_error(e))
            return False
        self._fire(self.protocol, self.discovery_name, (time.perf_counter() - t0) * 1000, 0, None)
        self.model = entry[0]
        max_len = s.max_model_len or entry[1] or 2048
        self.source = ScenarioSource(Budget(max_len), self._seed(), s.max_tokens, s.ignore_eos)
        return True

    def run_scenario(self, scenario: str) -> None:
        if self.source is None and not self._discover():
            # Back off (greenlet sleep) so a wrong key or URL is not hammered by every user.
            self.num_discovery_failures += 1
            time.sleep(min(10.0, 0.5 * 2 ** self.num_discovery_failures))
            return
        req = self.source.build(scenario)
        out = Outcome(self.protocol, req, StreamTimer(time.perf_counter()))
        self._stream(req, out)
        if out.error is None:
            out.finish(time.perf_counter(), self.source.budget)
        else:
            req.record_reply(None)
        for entry in out.entries():
            self._fire(*entry)
