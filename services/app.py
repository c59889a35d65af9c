"""Builds the Ray Serve application from one StackConfig: Gateway (ingress: REST + gRPC) → LLMServer,
or with INFER_GATEWAY_MODE=colocated one deployment whose replicas are both (`ColocatedGateway`).

Ray Serve import path: `services.app:build_app` (an application builder; `args` holds the INFER_*
names lowercase without the prefix). gRPC is configured on Serve's proxy, not per application:
start Serve with `grpc_options(port=INFER_GRPC_PORT, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS)`
(services/run.py does; the Helm chart's serveConfigV2 does the same).
"""
from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from services.config import StackConfig
from services.gateway.gateway import Gateway, app as rest_app
from services.gateway.service import LocalLLMClient
from services.serving.llm_server import DEFAULT_ENGINE, LLMServer

APP_NAME = "inference"
GRPC_SERVICER_FUNCTIONS = [
    "services.gen.inference.v1.inference_pb2_grpc.add_InferenceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# Seconds a replica being stopped waits for in-flight requests before the engine is shut down.
DRAIN_TIMEOUT_S = 30.0


# The custom autoscaling metric: calls in flight on a replica's own gRPC port (INFER_DIRECT_GRPC_PORT).
DIRECT_ONGOING = "direct_ongoing_requests"


def autoscaling_policy(ctx: Any) -> tuple[float, dict]:
    """Serve's default policy (ongoing requests per replica against the target) over the requests
    Serve routed plus the calls in flight on the replicas' own gRPC ports, which Serve never sees.
    Serve applies the min/max bounds and the up/down-scale delays around it as for its own."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
    direct = sum((ctx.aggregated_metrics or {}).get(DIRECT_ONGOING, {}).values())
    ctx.__dict__["total_num_requests"] = ctx.total_num_requests + direct   # overrides the cached_property
    return replica_queue_length_autoscaling_policy(ctx)


class ServedGateway(Gateway):
    """The Gateway as a Serve replica. Serve awaits `__del__` once it has drained the requests it
    routed; the direct gRPC port (INFER_DIRECT_GRPC_PORT) then refuses new calls and lets its calls
    in flight finish. Serve polls `record_autoscaling_stats` for `autoscaling_policy`."""

    async def __del__(self) -> None:
        await self.stop_direct(DRAIN_TIMEOUT_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {DIRECT_ONGOING: float(self.direct.ongoing if self.direct is not None else 0)}


class ColocatedGateway(ServedGateway):
    """A replica that is the gateway and an LLMServer at once: requests reach the engine in-process,
    with no Serve handle hop (the TTFT that hop costs: README, Benchmarks). Serve's health check,
    autoscaling on ongoing requests and draining act on this one deployment."""

    def __init__(self, config: StackConfig, engine_cls: Any = DEFAULT_ENGINE, grammar_handle: Any = None,
                 draft_handle: Any = None) -> None:
        self.llm_server = LLMServer(config, engine_cls, grammar_handle=grammar_handle, draft_handle=draft_handle)
        super().__init__(config, LocalLLMClient(self.llm_server))

    def check_health(self) -> None:
        self.llm_server.check_health()

    async def __del__(self) -> None:
        await super().__del__()
        if hasattr(self, "llm_server"):
            self.llm_server.__del__()


def llm_deployment_options(cfg: StackConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": "LLMServer",
        "ray_actor_options": {"num_cpus": cfg.llm_num_cpus, "num_gpus": cfg.llm_num_gpus},
        # Running batch plus the bounded engine queue; beyond that Serve queues at most
        # max_queued_requests per caller and then refuses (BackPressureError → 429).
        "max_ongoing_requests": cfg.engine.max_num_seqs + cfg.llm_max_queued_requests,
        "max_queued_requests": cfg.llm_max_queued_requests if cfg.llm_max_queued_requests > 0 else -1,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S,
    }
    if cfg.llm_max_replicas > cfg.llm_min_replicas:
        opts["autoscaling_config"] = {"min_replicas": cfg.llm_min_replicas,
                                      "max_replicas": cfg.llm_max_replicas,
                                      "target_ongoing_requests": cfg.llm_target_ongoing_requests}
        if cfg.direct_grpc_port and cfg.gateway_mode == "colocated":   # these replicas take direct calls
            opts["autoscaling_config"]["policy"] = {"policy_function": "services.app:autoscaling_policy"}
    else:
        opts["num_replicas"] = cfg.llm_max_replicas
    if cfg.redis_url:
        from ray.serve.config import RequestRouterConfig
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class="services.prefix_cache.router.PrefixAwareRouter",
            request_router_kwargs={"redis_url": cfg.redis_url, "namespace": cfg.model_name})
    return opts


def build_app_from_config(cfg: StackConfig, engine_cls: Any = DEFAULT_ENGINE) -> Application:
    grammar = None
    if cfg.grammar_replicas > 0:   # 0 = each LLM replica compiles grammars in its own process
        from services.grammar.service import grammar_deployment
        grammar = grammar_deployment(cfg.grammar_replicas).bind(
            model_dirs=[cfg.engine.tokenizer_path], redis_url=cfg.redis_url or None, num_workers=cfg.grammar_workers,
            compile_threads=cfg.grammar_compile_threads, warm_up=cfg.grammar_warm_up)
    draft = None
    if cfg.draft_replicas > 0:
        if not cfg.draft_model:
            raise ValueError("INFER_DRAFT_REPLICAS >= 1 needs INFER_DRAFT_MODEL (the draft model directory)")
        from services.draft.server import build_draft_app
        draft = build_draft_app(cfg.draft_model, num_replicas=cfg.draft_replicas, device=cfg.engine.device)
    if cfg.gateway_mode == "colocated":
        opts = llm_deployment_options(cfg)
        opts.pop("request_router_config", None)   # the ingress is reached through HAProxy, not a handle
        opts["name"] = "Gateway"
        return serve.deployment(serve.ingress(rest_app)(ColocatedGateway)).options(**opts).bind(
            cfg, engine_cls, grammar_handle=grammar, draft_handle=draft)
    llm = serve.deployment(LLMServer).options(**llm_deployment_options(cfg)).bind(
        cfg, engine_cls, grammar_handle=grammar, draft_handle=draft)
    gateway = serve.deployment(serve.ingress(rest_app)(ServedGateway)).options(
        name="Gateway", num_replicas=cfg.gateway_replicas,
        ray_actor_options={"num_cpus": cfg.gateway_num_cpus},
        max_ongoing_requests=1000,     # it only awaits; the LLM replicas hold the real limits
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S)
    return gateway.bind(cfg, llm)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (`serve run services.app:build_app key=value ...`)."""
    return build_app_from_config(StackConfig.from_args(dict(args or {})))
