from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.common.config import AppConfig, ModelConfig, load_config


def test_defaults_and_env_overrides() -> None:
    cfg = load_config({"model": {"source": "tiny"}}, environ={})
    assert cfg.model.device_map == "auto" and cfg.generation.default_steps == 50
    cfg = load_config(
        {"model": {"source": "tiny"}},
        environ={"QWEN_MODEL_DIR": "/models/x", "DEVICE_MAP": "balanced"},
    )
    assert (cfg.model.source, cfg.model.path, cfg.model.device_map) == (
        "local",
        "/models/x",
        "balanced",
    )


def test_local_source_needs_a_path() -> None:
    with pytest.raises(ValidationError, match=r"model\.path"):
        load_config({"model": {"source": "local"}}, environ={})


@pytest.mark.parametrize(
    "args",
    [
        {"model": {"source": "tiny", "device_map": "auto-ish"}},
        {"model": {"source": "tiny"}, "limits": {"max_n": 11}},
        {"model": {"source": "tiny"}, "generation": {"default_steps": 10, "max_steps": 5}},
        {"model": {"source": "tiny"}, "unknown": 1},
        {"model": {"source": "tiny"}, "limits": {"min_output_side": 512, "max_output_side": 256}},
    ],
)
def test_invalid_args_fail_at_build_time(args: dict) -> None:
    with pytest.raises(ValidationError):
        load_config(args, environ={})


def test_served_names_dedupe_aliases() -> None:
    cfg = AppConfig.model_validate(
        {"model": {"source": "tiny", "served_name": "a", "aliases": ["a", "b"]}}
    )
    assert cfg.model.served_names == ["a", "b"]


def test_every_id_runs_true_cfg_only_without_cfg_off_ids() -> None:
    from serve_app.common.config import GenerationConfig, every_id_runs_true_cfg

    def model(**fields: Any) -> ModelConfig:
        return ModelConfig(source="tiny", **fields)

    gen = GenerationConfig()
    assert every_id_runs_true_cfg(model(), gen)
    assert every_id_runs_true_cfg(model(loras=[{"name": "style", "path": "/s"}]), gen)
    lightning = [{"name": "fast", "path": "/f", "recipe": "lightning-4"}]
    assert not every_id_runs_true_cfg(model(loras=lightning), gen)
    assert not every_id_runs_true_cfg(model(loras=lightning, lora_mode="fused"), gen)
    assert not every_id_runs_true_cfg(model(), GenerationConfig(true_cfg_scale=1.0))
