"""PrefixAwareRouter with two fake replicas over a real Redis prefix index."""
import uuid

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from services.prefix_cache.hashing import block_hashes
from services.prefix_cache.index import PrefixIndex
from services.prefix_cache.router import ROUTING_KWARG, PrefixAwareRouter, request_block_hashes
from services.run import LocalRedis

pytestmark = pytest.mark.integration
DEP = DeploymentID(name="LLMServer", app_name="app")
HASHES = block_hashes(list(range(16 * 10)), 16, salt="tenant-a")


class FakeReplica:
    """What the router reads of a RunningReplica: its id and its queue bound."""

    def __init__(self, name: str, max_ongoing_requests: int = 8):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEP)
        self.max_ongoing_requests = max_ongoing_requests

    def __repr__(self):
        return self.replica_id.unique_id


def make_router(redis_url, namespace, **kwargs):
    router = PrefixAwareRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(redis_url=redis_url, namespace=namespace, **kwargs)
    return router


def request(hashes=None, **kwargs):
    meta = RequestMetadata(request_id="r", internal_request_id=uuid.uuid4().hex)
    return PendingRequest(args=[], kwargs={ROUTING_KWARG: hashes, **kwargs} if hashes else kwargs,
                          metadata=meta)


@pytest.fixture
def setup(redis_url):
    ns = f"t{uuid.uuid4().hex[:8]}"
    index = PrefixIndex(redis_url, ns)
    a, b = FakeReplica("A"), FakeReplica("B")
    index.publish("A", added=HASHES[:3])
    index.publish("B", added=HASHES[:8])
    yield redis_url, ns, index, a, b
    index.close()


async def test_longest_cached_prefix_wins_and_survives_a_router_restart(setup):
    url, ns, _, a, b = setup
    router = make_router(url, ns)
    for _ in range(5):
        ranks = await router.choose_replicas([a, b], request(HASHES))
        assert ranks == [[b], [a]]
    assert router.last_decision.reason == "prefix"
    assert router.last_decision.prefix_blocks == {"A": 3, "B": 8}
    restarted = make_router(url, ns)                 # a new gateway process: no local state
    assert await restarted.choose_replicas([a, b], request(HASHES)) == [[b], [a]]


async def test_queue_length_outweighs_a_modest_prefix_advantage(setup):
    url, ns, _, a, b = setup
    router = make_router(url, ns, queue_penalty_blocks=2.0)
    router.replica_queue_len_cache.update(b.replica_id, 3)     # 8 - 2*3 = 2 < 3 - 0
    assert await router.choose_replicas([a, b], request(HASHES)) == [[a], [b]]
    router.replica_queue_len_cache.update(b.replica_id, 2)     # 8 - 4 = 4 > 3
    assert (await router.choose_replicas([a, b], request(HASHES)))[0] == [b]


async def test_full_replica_goes_last_even_with_the_longest_prefix(setup):
    url, ns, _, a, b = setup
    router = make_router(url, ns)
    router.replica_queue_len_cache.update(b.replica_id, b.max_ongoing_requests)
    assert await router.choose_replicas([a, b], request(HASHES)) == [[a], [b]]


async def test_no_useful_prefix_or_no_hashes_balances_by_load(setup):
    url, ns, _, a, b = setup
    router = make_router(url, ns)
    other = block_hashes(list(range(16 * 10)), 16, salt="tenant-b")
    ranks = await router.choose_replicas([a, b], request(other))
    assert len(ranks) == 1 and sorted(map(repr, ranks[0])) == ["A", "B"]   # both, Ray takes the shorter queue
    assert router.last_decision.reason == "load"
    ranks = await router.choose_replicas([a, b], request())
    assert router.last_decision.reason == "no_hashes" and len(ranks[0]) == 2


async def test_hashes_on_the_first_argument_are_read_too():
    meta = RequestMetadata(request_id="r", internal_request_id="i")
    assert request_block_hashes(PendingRequest(args=[{ROUTING_KWARG: HASHES[:2]}], kwargs={},
                                               metadata=meta)) == HASHES[:2]
    assert request_block_hashes(PendingRequest(args=["plain"], kwargs={}, metadata=meta)) is None


async def test_redis_down_routes_by_load_without_errors():
    server = LocalRedis()
    ns = "down"
    index = PrefixIndex(server.url, ns)
    index.publish("B", added=HASHES)
    router = make_router(server.url, ns)
    a, b = FakeReplica("A"), FakeReplica("B")
    assert (await router.choose_replicas([a, b], request(HASHES)))[0] == [b]
    server.stop()
    for _ in range(5):
        ranks = await router.choose_replicas([a, b], request(HASHES))
        assert len(ranks[0]) == 2
    assert router.last_decision.reason == "index_down"
    assert router.breaker.state == "open"
    index.close()
