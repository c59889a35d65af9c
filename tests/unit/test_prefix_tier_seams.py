"""The KV tier's engine seams on their own: BlockManager.import_cached_blocks and KVTierConfig."""
import pytest

from services.engine.block_manager import BlockManager
from services.prefix_cache.hashing import block_hashes
from services.prefix_cache.tier_config import KVTierConfig, model_fingerprint

H = block_hashes(list(range(16 * 8)), 16, salt="t")


def test_imported_blocks_are_cached_free_and_continue_the_chain():
    kv = BlockManager(num_blocks=10, block_size=16)
    ids = kv.import_cached_blocks([], H[:4])
    assert len(ids) == 4 and len(set(ids)) == 4
    assert [kv.cached[h].block_id for h in H[:4]] == ids
    assert kv.num_free_blocks == 10                     # cached but free: evictable, hit-able
    kv.check_invariants()
    more = kv.import_cached_blocks(H[:4], H[4:6])
    assert not set(more) & set(ids)
    kv.check_invariants()


def test_importing_never_evicts_the_prefix_it_continues():
    kv = BlockManager(num_blocks=6, block_size=16)
    head = kv.import_cached_blocks([], H[:2])
    # 6 free blocks, 2 hold the head: at most 4 can be taken, and the head survives.
    tail = kv.import_cached_blocks(H[:2], H[2:8])
    assert len(tail) == 4
    assert [kv.cached[h].block_id for h in H[:2]] == head
    assert all(h in kv.cached for h in H[:6]) and H[6] not in kv.cached
    kv.check_invariants()


def test_import_stops_at_a_hash_already_cached_and_is_off_without_prefix_caching():
    kv = BlockManager(num_blocks=8, block_size=16)
    kv.import_cached_blocks([], H[1:2])
    assert kv.import_cached_blocks([], [H[0], H[1], H[2]]) == [kv.cached[H[0]].block_id]
    assert BlockManager(8, 16, enable_prefix_caching=False).import_cached_blocks([], H[:2]) == []


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="encoding"):
        KVTierConfig(encoding="int4")
    with pytest.raises(ValueError, match="redis_url"):
        KVTierConfig(redis_url="localhost:6379")
    with pytest.raises(ValueError, match="write_policy"):
        KVTierConfig(write_policy="never")
    with pytest.raises(ValueError, match="replica_id"):
        KVTierConfig(index_namespace="llm")
    assert KVTierConfig().tier_name == "memory"
    assert KVTierConfig(redis_url="redis://r:6379/0").tier_name == "redis"


def test_model_fingerprint_follows_config_weights_and_seed(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    a = model_fingerprint(str(tmp_path), "dummy", seed=0)
    assert a == model_fingerprint(str(tmp_path), "dummy", seed=0)
    assert a != model_fingerprint(str(tmp_path), "dummy", seed=1)
    (tmp_path / "model.safetensors").write_bytes(b"w" * 100)
    b = model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"v" * 100)
    assert b != model_fingerprint(str(tmp_path))
