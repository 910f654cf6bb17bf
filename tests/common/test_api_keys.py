"""Which API keys a config turns on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from serve_app.common.api_keys import load_api_keys
from serve_app.common.config import AuthConfig


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\nfile-key-2  # ci\n")
    cfg = AuthConfig(api_keys_env="MY_KEYS", api_keys_file=str(key_file))
    keys = load_api_keys(cfg, environ={"MY_KEYS": " env-a , env-b,"})
    assert keys == ["env-a", "env-b", "file-key-1", "file-key-2"]
    assert load_api_keys(AuthConfig(), environ={}) == []


def test_seed_api_key_is_the_key_only_when_ours_is_unset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert load_api_keys(AuthConfig(), environ={"API_KEY": " seed-key "}) == ["seed-key"]
    assert "API_KEY" in caplog.text and "seed-key" not in caplog.text
    both = {"API_KEY": "seed-key", "QWEN_API_KEYS": "ours"}
    assert load_api_keys(AuthConfig(), environ=both) == ["ours"]
    key_file = tmp_path / "keys"
    key_file.write_text("from-file\n")
    cfg = AuthConfig(api_keys_file=str(key_file))
    assert load_api_keys(cfg, environ={"API_KEY": "seed-key"}) == ["from-file"]


def test_missing_key_file_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_api_keys(AuthConfig(api_keys_file=str(tmp_path / "nope")), environ={})
