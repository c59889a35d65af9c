"""The colocated deployment's autoscaling counts the calls on the replicas' own gRPC ports: Serve's
own context and config classes, the policy as Serve calls it."""
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from services.app import DIRECT_ONGOING, autoscaling_policy, llm_deployment_options
from services.config import StackConfig


def context(serve_requests: float, direct: dict[str, float] | None) -> AutoscalingContext:
    dep = DeploymentID(name="Gateway", app_name="inference")
    replicas = [ReplicaID(unique_id=u, deployment_id=dep) for u in ("a", "b")]
    return AutoscalingContext(
        deployment_id=dep, deployment_name="Gateway", app_name="inference", current_num_replicas=2,
        target_num_replicas=2, running_replicas=replicas, total_num_requests=serve_requests,
        total_queued_requests=0, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2),
        aggregated_metrics=None if direct is None else
        {DIRECT_ONGOING: {r: direct[r.unique_id] for r in replicas}})


def test_policy_adds_direct_calls_to_what_serve_counts():
    assert autoscaling_policy(context(4, None))[0] == 2                       # Serve's default alone
    assert autoscaling_policy(context(4, {"a": 3, "b": 1}))[0] == 4           # 8 in flight / 2 per replica
    assert autoscaling_policy(context(0, {"a": 6, "b": 6}))[0] == 6


def test_only_colocated_direct_replicas_get_the_policy():
    base = {"llm_min_replicas": 1, "llm_max_replicas": 4}
    opts = llm_deployment_options(StackConfig.from_args({**base, "gateway_mode": "colocated",
                                                         "direct_grpc_port": 9100}))
    assert opts["autoscaling_config"]["policy"] == {"policy_function": "services.app:autoscaling_policy"}
    for extra in ({"gateway_mode": "colocated"}, {"direct_grpc_port": 9100}):
        assert "policy" not in llm_deployment_options(StackConfig.from_args({**base, **extra}))["autoscaling_config"]
