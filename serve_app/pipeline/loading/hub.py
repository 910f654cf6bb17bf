"""`model.path` as a Hugging Face model id: resolved to a local snapshot folder on the replica.

`model.path` (or QWEN_MODEL_DIR) is either a local diffusers folder, used as it is, or a Hub id
such as `Qwen/Qwen-Image-Edit-2511`, which `huggingface_hub.snapshot_download` turns into a
folder of the Hugging Face cache, downloading what is missing. The Hub's own environment applies:
`HF_HOME` / `HF_HUB_CACHE` (where the cache is), `HF_TOKEN` (gated or private models),
`HF_HUB_OFFLINE=1` (never download: the id must already be cached). `model.revision` pins a
branch, tag or commit. Only the model replica calls this (the ingress never needs the weights),
and the download's progress goes to the replica log.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger("ray.serve")

# `org/name`, as the Hub spells ids (huggingface_hub.utils.validate_repo_id is stricter on
# length; a bad id gets the Hub's own error). A leading `/`, `.` or `~` is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
# One progress line per bar at most this often (a 54 GiB download takes minutes).
PROGRESS_EVERY_S = 10.0

Download = Callable[..., str]


class ModelSourceError(RuntimeError):
    """`model.path` names neither a local folder nor a model the Hub (or its cache) provides."""


def resolve_model_path(
    path: str, *, revision: str | None = None, download: Download | None = None
) -> Path:
    """The local folder holding the model `path` names (see the module docstring).

    `download` defaults to `huggingface_hub.snapshot_download`; tests inject a fake.
    """
    local = Path(path).expanduser()
    if local.exists():
        if revision is not None:
            logger.warning("model.revision %s is ignored: %s is a local folder", revision, path)
        return local
    if not _HUB_ID.match(path):
        raise ModelSourceError(
            f"model.path {path!r}: no such local folder, and not a Hugging Face model id"
            " (org/name, e.g. Qwen/Qwen-Image-Edit-2511)"
        )
    if download is None:
        from huggingface_hub import snapshot_download

        download = snapshot_download
    where = f"{path}@{revision}" if revision else path
    logger.info("model %s: resolving through the Hugging Face cache (%s)", where, _cache_dir())
    t0 = time.perf_counter()
    try:
        folder = download(path, revision=revision, tqdm_class=_LogProgress)
    except Exception as exc:
        raise ModelSourceError(_explain(exc, path=path, revision=revision)) from exc
    logger.info("model %s: %s (%.1f s)", where, folder, time.perf_counter() - t0)
    return Path(folder)


def is_hub_id(path: str) -> bool:
    """Whether `path` reads as a Hub id (org/name) rather than a local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def resolve_hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    what: str = "file",
    download: Download | None = None,
) -> Path:
    """One file of a Hub repo (e.g. a LoRA's .safetensors) through the Hugging Face cache, as
    `resolve_model_path` does for a whole model: the same environment, cache and errors.

    `download` defaults to `huggingface_hub.hf_hub_download`; tests inject a fake."""
    if download is None:
        from huggingface_hub import hf_hub_download

        download = hf_hub_download
    where = f"{repo_id}@{revision}" if revision else repo_id
    t0 = time.perf_counter()
    try:
        file = download(repo_id, filename=filename, revision=revision, tqdm_class=_LogProgress)
    except Exception as exc:
        raise ModelSourceError(
            _explain(exc, path=repo_id, revision=revision, what=what, filename=filename)
        ) from exc
    logger.info("%s %s/%s: %s (%.1f s)", what, where, filename, file, time.perf_counter() - t0)
    return Path(file)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _explain(
    exc: Exception,
    *,
    path: str,
    revision: str | None,
    what: str = "model",
    filename: str | None = None,
) -> str:
    """One message naming the model (or `what`, for one `filename` of a repo) and the fix, for
    each way resolving can fail."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{path} (revision {revision})" if revision else path
    if filename:
        where = f"{path}/{filename}" + (f" (revision {revision})" if revision else "")
    fetch = f"hf download {path}" + (f" {filename}" if filename else "")
    fetch += f" --revision {revision}" if revision else ""
    local = "its path to a local file" if filename else "model.path to a local diffusers folder"
    if isinstance(exc, LocalEntryNotFoundError) and _offline():
        return (
            f"{what} {where} is not in the Hugging Face cache ({_cache_dir()}) and"
            f" HF_HUB_OFFLINE=1 forbids downloading it. Fix: download it once with the same"
            f" HF_HOME (`{fetch}`), or unset HF_HUB_OFFLINE so the replica downloads it, or set"
            f" {local}."
        )
    if isinstance(exc, GatedRepoError):
        return (
            f"{what} {where} is gated: accept its terms on huggingface.co and set HF_TOKEN"
            f" for the replica ({exc})"
        )
    if isinstance(exc, RevisionNotFoundError):
        fix = "model.revision" if what == "model" else "its revision"
        return f"{what} {path} has no revision {revision!r} on the Hub: fix {fix}"
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{what} {where} was not found on the Hub: check the id, or set HF_TOKEN if it is"
            " private"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        return (
            f"{what} {where} could not be downloaded and is not in the Hugging Face cache"
            f" ({_cache_dir()}): check the network (or HF_ENDPOINT), or download it once with"
            f" `{fetch}` ({exc})"
        )
    return f"{what} {where} could not be resolved through the Hugging Face Hub: {exc}"


class _LogProgress(tqdm):  # type: ignore[type-arg]
    """A tqdm that writes a log line (not a terminal bar) at most every PROGRESS_EVERY_S and
    when it closes: snapshot_download's file count and byte counters in the replica log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)  # huggingface_hub's bar-group name; vanilla tqdm rejects it
        kwargs.update(file=io.StringIO(), disable=False, mininterval=PROGRESS_EVERY_S)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.n or self.total:  # not the empty bars snapshot_download opens first
            logger.info("download: %s", self.line())
        return True

    def line(self) -> str:
        """e.g. `Downloading bytes: 12.3GB / 57.7GB (21 %), 182MB/s`."""
        d = self.format_dict
        unit, n, total, elapsed = d["unit"] or "it", d["n"], d["total"], d["elapsed"]

        def amount(value: float) -> str:
            if d["unit_scale"]:
                return str(self.format_sizeof(value, unit))
            return f"{value:g} {unit}"

        text = f"{d['prefix'] or 'progress'}: {amount(n)}"
        if total:
            text += f" / {amount(total)} ({100 * n / total:.0f} %)"
        rate = d["rate"] or (n / elapsed if elapsed else 0)
        if rate:
            text += f", {amount(rate)}/s"
        return text


__all__ = ["ModelSourceError", "is_hub_id", "resolve_hub_file", "resolve_model_path"]
