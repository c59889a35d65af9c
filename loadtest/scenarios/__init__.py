"""Load-test scenarios and the protocol-independent parts of the Locust users (no locust import
here: pytest and `loadtest.run` import this package, only the locustfiles import locust)."""
from loadtest.scenarios.catalog import MIX, SCENARIOS, ScenarioSource, check_json_reply
from loadtest.scenarios.request import Budget, Conversation, ScenarioRequest
from loadtest.scenarios.settings import Settings
from loadtest.scenarios.stream import StreamTimer

__all__ = ["MIX", "SCENARIOS", "Budget", "Conversation", "ScenarioRequest", "ScenarioSource", "Settings",
           "StreamTimer", "check_json_reply"]
