"""PrefixAwareRouter inside real Ray Serve: two replicas, the prefix index in a real Redis.

The replicas are stand-ins for LLMServer (no engine): each publishes the block hashes of every
request it serves to the index, as a replica's KV tier does, and answers with its replica id.
A repeated prefix must then always reach the replica that holds it; unrelated prompts spread.
"""
import uuid

import pytest

from services.prefix_cache.hashing import block_hashes
from services.serving.wire import ReplicaRequest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def serve_app(redis_url):
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from services.run import init_ray
    init_ray(num_cpus=2, log_to_driver=False)   # Serve in the stack's mode (services/run.py SERVE_ENV)
    namespace = f"t{uuid.uuid4().hex[:8]}"

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8,
                      request_router_config=RequestRouterConfig(
                          request_router_class="services.prefix_cache.router.PrefixAwareRouter",
                          request_router_kwargs={"redis_url": redis_url, "namespace": namespace}))
    class Replica:
        def __init__(self):
            from services.prefix_cache.index import PrefixIndex
            self.index = PrefixIndex(redis_url, namespace)
            self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def generate(self, req: ReplicaRequest) -> str:
            if req.prefix_block_hashes:
                self.index.publish(self.replica_id, added=req.prefix_block_hashes)
            return self.replica_id

    handle = serve.run(Replica.bind(), name="prefix-router", route_prefix=None)
    yield handle
    serve.delete("prefix-router")
    serve.shutdown()
    ray.shutdown()


def request(tokens: list[int], salt: str = "tenant-a") -> ReplicaRequest:
    return ReplicaRequest(uuid.uuid4().hex, tokens, {}, cache_salt=salt,
                          prefix_block_hashes=block_hashes(tokens, 16, salt))


def test_repeated_prefix_goes_to_the_replica_that_holds_it(serve_app):
    doc = list(range(1000, 1000 + 16 * 20))                         # a 20-block shared document
    first = serve_app.generate.remote(request(doc + [1, 2, 3])).result(timeout_s=60)
    for i in range(12):
        follow_up = doc + [7, i, i, i]
        assert serve_app.generate.remote(request(follow_up)).result(timeout_s=60) == first


def test_other_tenant_and_unrelated_prompts_spread_over_both_replicas(serve_app):
    seen = set()
    for i in range(24):
        tokens = [i * 100 + j for j in range(48)]
        seen.add(serve_app.generate.remote(request(tokens, salt=f"tenant-{i}")).result(timeout_s=60))
    assert len(seen) == 2
