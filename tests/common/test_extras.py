from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from serve_app.app import build_app
from serve_app.common.config import load_config
from serve_app.common.extras import MissingExtraError, check_extras, needed_extras

FP8 = {"quantization": "fp8", "compile": True}
LORA = {"loras": [{"name": "fast", "path": "/loras/fast.safetensors"}]}


def config(storage: str = "~/.cache/images", **model: Any) -> Any:
    return load_config(
        {"model": {"source": "tiny", **model}, "storage": {"url": storage}}, environ={}
    )


def test_a_plain_config_needs_no_extra() -> None:
    assert needed_extras(config()) == []
    assert needed_extras(config("memory://x")) == []


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (config(**FP8), [("torchao", "fp8", "model.quantization: fp8")]),
        (config(**LORA), [("peft", "lora", "model.loras")]),
        (config("s3://bucket/edits"), [("s3fs", "s3", "storage.url s3://bucket/edits")]),
        (config("gcs://bucket/edits"), [("gcsfs", "gcs", "storage.url gcs://bucket/edits")]),
        (config("gs://bucket/edits"), [("gcsfs", "gcs", "storage.url gs://bucket/edits")]),
    ],
)
def test_each_feature_names_its_extra(cfg: Any, expected: list[tuple[str, str, str]]) -> None:
    assert needed_extras(cfg) == expected


def test_missing_packages_are_named_with_their_extras() -> None:
    cfg = config("s3://bucket/edits", **LORA)
    with pytest.raises(MissingExtraError) as caught:
        check_extras(cfg, find_spec=lambda name: None)
    message = str(caught.value)
    assert "model.loras needs the package 'peft'" in message
    assert "pip install 'qwen-image-edit-serve[serve,lora]'" in message
    assert "storage.url s3://bucket/edits needs the package 's3fs'" in message
    assert "pip install -e '.[serve,s3]'" in message


def test_installed_packages_pass() -> None:
    check_extras(config("s3://bucket/edits", **FP8), find_spec=lambda name: object())


def test_build_app_refuses_a_feature_without_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a)
    )
    monkeypatch.delenv("QWEN_MODEL_DIR", raising=False)
    with pytest.raises(MissingExtraError, match=r"\[serve,s3\]"):
        build_app({"model": {"source": "tiny"}, "storage": {"url": "s3://bucket/edits"}})
    build_app({"model": {"source": "tiny"}})  # nothing optional: builds
