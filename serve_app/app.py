"""The application builder: `serve run serve_app.app:build_app` or serve_config.yaml.

It validates `args` once and wires the two deployments, and chooses the engine the model
deployment runs: it is the only module that knows both deployments and the engine. Deployment
options here are defaults: serve_config.yaml overrides them.
"""

from __future__ import annotations

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


def build_engine(model: ModelConfig, generation: GenerationConfig) -> Engine:
    """The engine for a config, built in the model replica: one diffusers pipeline in-process
    (imported here, so that neither the controller nor the ingress ever imports torch)."""
    from serve_app.pipeline.loader import load_runner

    return load_runner(model, generation)


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    config: AppConfig = load_config(args)
    check_extras(config)  # fp8, LoRA, s3/gcs: their extra installed, or a clear error now
    model: Deployment = serve.deployment(name=MODEL_NAME, **MODEL_DEPLOYMENT_DEFAULTS)(
        ImageEditModel
    )
    ingress: Deployment = serve.deployment(name=INGRESS_NAME, **INGRESS_DEPLOYMENT_DEFAULTS)(
        serve.ingress()(Ingress)
    )
    return ingress.bind(
        model.bind(config, engine_factory=build_engine), config, model_deployment=MODEL_NAME
    )
