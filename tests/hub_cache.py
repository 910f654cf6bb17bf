"""A model folder laid out as a Hugging Face cache entry, as `hf download` leaves it.

    HF_HOME/hub/models--ORG--NAME/
        blobs/<sha256 of each file>
        snapshots/<commit>/<the repo's files, symlinks into ../../blobs>
        refs/main            (the commit, no newline)

With HF_HOME (or HF_HUB_CACHE) pointing there and HF_HUB_OFFLINE=1, `snapshot_download(id)`
returns the snapshot folder without touching the network: how tests resolve a model id offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# Any 40-hex commit: the cache keys snapshots by it and refs/ map branch names to it.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(
    model_dir: Path, hub_cache: Path, repo_id: str, *, ref: str = "main", commit: str = COMMIT
) -> Path:
    """Copy `model_dir` into `hub_cache` (HF_HOME/hub) as `repo_id` at `commit`, with `ref`
    naming it; returns the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for source in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relative = source.relative_to(model_dir)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
