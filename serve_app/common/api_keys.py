"""API key settings: which keys a config turns on.

Read where the server starts (the ingress) and before it (the launcher, which tells the operator
at once): plain config and environment in, keys and warnings out. Checking a request's key is the
ingress' (`ingress/auth.py`).

For the seed server's clients (docs/migrating.md) its `API_KEY` variable is read when ours is
not set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from serve_app.common.config import AuthConfig

logger = logging.getLogger(__name__)

# The seed server's single key; used only when the configured variable and key file are unset.
SEED_API_KEY_ENV = "API_KEY"


def load_api_keys(config: AuthConfig, *, environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys from the env var and the key file; an unreadable key file is a startup error."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(config.api_keys_env, "").split(",")]
    if config.api_keys_file:
        for line in Path(config.api_keys_file).read_text().splitlines():
            keys.append(line.split("#", 1)[0].strip())
    found = sorted({k for k in keys if k})
    seed_key = env.get(SEED_API_KEY_ENV, "").strip()
    if not found and seed_key:
        # A seed server's settings turn auth on with API_KEY; ignoring it would serve openly.
        logger.warning(
            "API keys: using %s (the seed server's variable); %s is the name here.",
            SEED_API_KEY_ENV,
            config.api_keys_env,
        )
        found = [seed_key]
    return found
