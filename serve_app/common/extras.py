"""Optional packages: which pip extra each configured feature needs, checked when the app is built.

A configured feature whose package is missing (fp8 without torchao, LoRAs without peft, an
s3://, gcs:// or redis:// image store without its client) fails `serve run` / `serve deploy` at
once, naming the extra to install, instead of an ImportError in a replica (or at the first
request that needs it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from serve_app.common.config import AppConfig

DISTRIBUTION = "qwen-image-edit-serve"

FindSpec = Callable[[str], Any]

# fsspec protocol -> (module, extra)
_STORE_BACKENDS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "redis": ("redis", "redis"),
    "rediss": ("redis", "redis"),
}


class MissingExtraError(RuntimeError):
    """A configured feature needs a package that is not installed."""


def install_hint(extra: str) -> str:
    """How to install `extra` next to the server, from the index or in a clone."""
    clone = f"pip install -e '.[serve,{extra}]'"
    return f"pip install '{DISTRIBUTION}[serve,{extra}]' (in a clone: {clone})"


def needed_extras(config: AppConfig) -> list[tuple[str, str, str]]:
    """(module, extra, the setting that needs it) for each optional feature `config` uses."""
    needs = []
    if config.model.quantization == "fp8":
        needs.append(("torchao", "fp8", "model.quantization: fp8"))
    if config.model.text_encoder == "int8":
        needs.append(("torchao", "fp8", "model.text_encoder: int8"))
    if config.model.loras:
        needs.append(("peft", "lora", "model.loras"))
    url = config.storage.url
    protocol = url.split("://", 1)[0].lower() if "://" in url else ""
    if protocol in _STORE_BACKENDS:
        module, extra = _STORE_BACKENDS[protocol]
        needs.append((module, extra, f"storage.url {url}"))
    return needs


def check_extras(config: AppConfig, *, find_spec: FindSpec | None = None) -> None:
    """Raise MissingExtraError naming every missing package and its extra."""
    find = find_spec or importlib.util.find_spec
    missing = [need for need in needed_extras(config) if find(need[0]) is None]
    if missing:
        raise MissingExtraError(
            "; ".join(
                f"{setting} needs the package {module!r}, which is not installed:"
                f" {install_hint(extra)}"
                for module, extra, setting in missing
            )
        )


__all__ = ["DISTRIBUTION", "MissingExtraError", "check_extras", "install_hint", "needed_extras"]
