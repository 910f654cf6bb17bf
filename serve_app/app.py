"""The application builder: `serve run serve_app.app:build_app` or serve_config.yaml.

It validates `args` once and wires the two deployments, and chooses the engine the model
deployment runs: it is the only module that knows both deployments and the engine. Deployment
options here are defaults: serve_config.yaml overrides them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from serve_app.common.config import AppConfig, GenerationConfig, ModelConfig, load_config
from serve_app.common.extras import check_extras
from serve_app.engine import Engine
from serve_app.ingress.deployment import Ingress
from serve_app.replica.deployment import ImageEditModel

INGRESS_NAME = "OpenAIIngress"
MODEL_NAME = "QwenImageEditModel"

# A diffusion replica works on one edit at a time; a short queue in front of it keeps
# latency bounded, and overflow is answered at once with 503 + Retry-After.
MODEL_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 1,
    "max_queued_requests": 8,
    "graceful_shutdown_timeout_s": 300,
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
}
INGRESS_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 64,
    # CPU only: never given a GPU, and never imports torch.
    "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
}
# Past args.request_timeout_s, the time an answer may still take (encoding, a url result's
# store write) before a draining ingress replica is stopped.
INGRESS_DRAIN_MARGIN_S = 30.0


def build_engine(model: ModelConfig, generation: GenerationConfig) -> Engine:
    """The engine for a config, built in the model replica: one diffusers pipeline in-process,
    or with `model.parallel.gpus` > 1 rank 0 of a group of rank processes (imported here, so that
    neither the controller nor the ingress ever imports torch)."""
    if model.parallel.gpus > 1:
        from serve_app.pipeline.parallel_engine import ParallelEngine

        return ParallelEngine(model, generation)
    from serve_app.pipeline.loading.loader import load_runner

    return load_runner(model, generation)


def model_deployment_options(model: ModelConfig) -> dict[str, Any]:
    """The model deployment's defaults; with several ranks, one placement-group bundle per rank
    (rank 0, the replica itself, takes bundle 0; `ParallelEngine` puts the others in the rest)."""
    options = copy.deepcopy(MODEL_DEPLOYMENT_DEFAULTS)
    parallel = model.parallel
    if parallel.gpus > 1:
        gpus = 0 if model.device_map == "cpu" else 1
        bundle: dict[str, float] = {"CPU": parallel.cpus_per_rank}
        if gpus:
            bundle["GPU"] = gpus
        options["placement_group_bundles"] = [dict(bundle) for _ in range(parallel.gpus)]
        options["placement_group_strategy"] = parallel.placement_strategy
        options["ray_actor_options"] = {"num_cpus": parallel.cpus_per_rank, "num_gpus": gpus}
    return options


def ingress_deployment_options(config: AppConfig) -> dict[str, Any]:
    """The ingress deployment's defaults. A replica being replaced (a config update's rolling
    update, a scale-down) drains: it stops taking requests and answers those it holds. Serve
    stops it anyway after graceful_shutdown_timeout_s (20 s by default), which would cut the
    requests still waiting, e.g. for a model replica that the same update is reloading; every
    request has its answer within request_timeout_s, so the drain may take that long."""
    options = copy.deepcopy(INGRESS_DEPLOYMENT_DEFAULTS)
    options["graceful_shutdown_timeout_s"] = config.request_timeout_s + INGRESS_DRAIN_MARGIN_S
    return options


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    config: AppConfig = load_config(args)
    check_extras(config)  # fp8, LoRA, s3/gcs: their extra installed, or a clear error now
    model: Deployment = serve.deployment(name=MODEL_NAME, **model_deployment_options(config.model))(
        ImageEditModel
    )
    ingress: Deployment = serve.deployment(name=INGRESS_NAME, **ingress_deployment_options(config))(
        serve.ingress()(Ingress)
    )
    return ingress.bind(
        model.bind(config, engine_factory=build_engine), config, model_deployment=MODEL_NAME
    )
