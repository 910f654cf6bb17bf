"""The ingress's Ray Serve deployment: builds the FastAPI app at replica start.

CPU only: nothing under `serve_app.ingress` imports torch, so the ingress never initialises CUDA
on a GPU node (tests/test_architecture.py keeps it so).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp

from serve_app.common.api_keys import load_api_keys
from serve_app.common.config import AppConfig
from serve_app.common.links import host_header_warning
from serve_app.common.malloc import keep_large_buffers
from serve_app.ingress.metrics import RayIngressMetrics
from serve_app.ingress.model_client import ModelHandle
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService

logger = logging.getLogger("ray.serve")


async def serve_deployment_healthy(deployment: str) -> bool:
    """Whether Serve reports a running, healthy replica of `deployment` in this app."""
    from ray import serve

    def check() -> bool:
        app_name = serve.get_replica_context().app_name
        app = serve.status().applications.get(app_name)
        status = app.deployments.get(deployment) if app is not None else None
        if status is None:
            return False
        running = sum(n for state, n in status.replica_states.items() if "RUNNING" in str(state))
        return bool(running > 0 and str(status.status).endswith("HEALTHY"))

    return await asyncio.to_thread(check)


class Ingress:
    """Ray Serve deployment (late-bound `@serve.ingress()`): `app.py` binds it to the model
    deployment's handle; Serve calls `__serve_build_asgi_app__` once the replica is up."""

    def __init__(
        self,
        model: ModelHandle,
        config: AppConfig | Mapping[str, Any],
        *,
        model_deployment: str,
    ) -> None:
        cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        keep_large_buffers()  # every edit's multi-MB images and bodies reuse faulted-in pages
        self._api_keys = load_api_keys(cfg.auth)
        keys = self._api_keys
        logger.info("API keys: %s", f"{len(keys)} configured" if keys else "off (no key set)")
        warning = host_header_warning(cfg.storage, cfg.http)
        if warning:
            logger.warning("!!! %s !!!", warning)
        self._service = EditService(
            model=model,
            config=cfg,
            metrics=RayIngressMetrics(),
            model_healthy=functools.partial(serve_deployment_healthy, model_deployment),
        )

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return create_app(self._service, api_keys=self._api_keys)
