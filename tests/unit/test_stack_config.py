"""StackConfig (services/config.py): INFER_* env vars parse to typed fields, bad values name the variable."""
from __future__ import annotations

import pytest

from services.config import KV_TIER_WRITE_POLICIES, StackConfig
from services.prefix_cache.tier_config import WRITE_POLICIES, KVTierConfig


def test_kv_tier_write_policy_default_is_the_tiers():
    assert StackConfig.from_env({}).kv_tier_write_policy == KVTierConfig().write_policy == "reused"


@pytest.mark.parametrize("policy", ["computed", "reused"])
def test_kv_tier_write_policy_from_env_and_args(policy):
    assert StackConfig.from_env({"INFER_KV_TIER_WRITE_POLICY": policy}).kv_tier_write_policy == policy
    assert StackConfig.from_args({"kv_tier_write_policy": policy}).kv_tier_write_policy == policy


def test_bad_kv_tier_write_policy_names_the_variable_and_the_choices():
    with pytest.raises(ValueError) as ei:
        StackConfig.from_env({"INFER_KV_TIER_WRITE_POLICY": "always"})
    msg = str(ei.value)
    assert "INFER_KV_TIER_WRITE_POLICY" in msg and "'computed' or 'reused'" in msg and "'always'" in msg


def test_gateway_mode():
    assert StackConfig.from_env({}).gateway_mode == "separate"
    assert StackConfig.from_env({"INFER_GATEWAY_MODE": "colocated"}).gateway_mode == "colocated"
    with pytest.raises(ValueError) as ei:
        StackConfig.from_env({"INFER_GATEWAY_MODE": "together"})
    assert "INFER_GATEWAY_MODE" in str(ei.value) and "'separate' or 'colocated'" in str(ei.value)


def test_stack_and_tier_agree_on_the_write_policies():
    """services/config.py spells them itself (tier_config imports torch; the gateway must not)."""
    assert KV_TIER_WRITE_POLICIES == WRITE_POLICIES
    for policy in KV_TIER_WRITE_POLICIES:
        assert KVTierConfig(write_policy=policy).write_policy == policy


def test_llm_server_hands_the_write_policy_to_its_tier(redis_url, monkeypatch):
    from services.grammar import local  # noqa: PLC0415
    from services.serving.fake_engine import FakeEngine  # noqa: PLC0415
    from services.serving.llm_server import LLMServer  # noqa: PLC0415

    monkeypatch.setattr(local, "_SETTINGS", dict(local._SETTINGS))   # LLMServer configures them
    tiers = []

    class Engine(FakeEngine):
        def __init__(self, config, kv_tier=None):
            super().__init__(config)
            tiers.append(kv_tier)

    cfg = StackConfig.from_args({"redis_url": redis_url, "kv_tier_write_policy": "computed"})
    server = LLMServer(cfg, engine_cls=Engine)
    try:
        [tier] = tiers
        assert tier.config.write_policy == "computed" and tier.config.redis_url == redis_url
    finally:
        server.shutdown()
        tiers[0].close()
