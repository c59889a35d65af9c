"""Fetch-vs-recompute decisions follow the measured rates."""
import pytest

from services.prefix_cache.cost_model import CostModel

BLOCK = 16
BYTES = 16 * 1024 * 1024 // 64        # 256 KiB per block


def test_priors_decide_until_measurements_arrive():
    m = CostModel(prior_latency_s=1e-3, prior_bandwidth_bytes_per_s=1e9,
                  prior_prefill_tokens_per_s=1000, margin=1.0)
    d = m.decide(num_blocks=8, block_size=BLOCK, bytes_per_block=BYTES)
    # fetch 1 ms + 2 MiB / 1 GB/s ~ 3.1 ms  vs  recompute 128 tokens / 1000 tok/s = 128 ms
    assert d.fetch and d.num_tokens == 128 and d.num_bytes == 8 * BYTES
    assert d.est_fetch_s == pytest.approx(1e-3 + 8 * BYTES / 1e9)
    assert d.est_recompute_s == pytest.approx(0.128)


def test_slow_link_or_fast_prefill_flips_the_decision_to_recompute():
    m = CostModel(margin=1.0)
    m.observe_prefill(num_tokens=100_000, seconds=1.0)          # a fast GPU
    m.observe_transfer(num_bytes=0, seconds=2e-3)                 # latency sample
    m.observe_transfer(num_bytes=100 * 2 ** 20, seconds=1.002)    # ~100 MiB/s link
    assert m.latency_s == pytest.approx(2e-3)
    assert m.bandwidth_bytes_per_s == pytest.approx(100 * 2 ** 20, rel=1e-6)
    d = m.decide(num_blocks=8, block_size=BLOCK, bytes_per_block=BYTES)
    assert not d.fetch and d.est_fetch_s > d.est_recompute_s
    attrs = d.as_attributes()
    assert attrs["kv_tier.fetch"] is False and attrs["kv_tier.prefill_tokens_per_s"] == 100_000


def test_ewma_moves_towards_new_samples_and_margin_is_applied():
    m = CostModel(alpha=0.5, margin=2.0)
    m.observe_prefill(1000, 1.0)
    m.observe_prefill(3000, 1.0)
    assert m.prefill_tokens_per_s == pytest.approx(2000)
    # 16 tokens at 2000 tok/s = 8 ms; fetch = 1 ms latency + tiny bytes, x2 margin = ~2 ms
    assert m.decide(1, BLOCK, 1024).fetch
    assert not m.decide(0, BLOCK, 1024).fetch


def test_bad_parameters_name_themselves():
    with pytest.raises(ValueError, match="prior_prefill_tokens_per_s"):
        CostModel(prior_prefill_tokens_per_s=0)
    with pytest.raises(ValueError, match="alpha"):
        CostModel(alpha=0)
