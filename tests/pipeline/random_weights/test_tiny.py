"""The embedded tiny model: built offline, deterministic, atomic, loadable, and fast to run."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.pipeline.random_weights import tiny


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir: pathlib.Path) -> Any:
    from diffusers import QwenImageEditPlusPipeline

    pipeline = QwenImageEditPlusPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _edit(pipe: Any, images: list[Image.Image], **overrides: Any) -> list[np.ndarray]:
    kwargs: dict[str, Any] = {
        "image": images,
        "prompt": "make it blue",
        "negative_prompt": " ",
        "true_cfg_scale": 4.0,
        "num_inference_steps": 2,
        "height": 64,
        "width": 64,
        "generator": torch.Generator().manual_seed(0),
    }
    kwargs.update(overrides)
    return [np.asarray(im) for im in pipe(**kwargs).images]


def test_folder_is_a_diffusers_edit_plus_pipeline(model_dir: pathlib.Path) -> None:
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert name in index and (model_dir / name).is_dir()
    assert list(model_dir.rglob("*.safetensors"))
    # No half-built siblings left behind next to the folder.
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]


def test_configs_satisfy_the_real_classes_constraints(model_dir: pathlib.Path) -> None:
    def config(name: str, file: str = "config.json") -> dict[str, Any]:
        data: dict[str, Any] = json.loads((model_dir / name / file).read_text())
        return data

    dit, vae, encoder = config("transformer"), config("vae"), config("text_encoder")
    assert dit["in_channels"] == 4 * vae["z_dim"] and dit["out_channels"] == vae["z_dim"]
    assert sum(dit["axes_dims_rope"]) == dit["attention_head_dim"]
    assert dit["joint_attention_dim"] == encoder["text_config"]["hidden_size"]
    assert len(vae["temperal_downsample"]) == 3 and len(vae["dim_mult"]) == 4
    text = encoder["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert 2 * sum(text["rope_parameters"]["mrope_section"]) == head_dim
    assert encoder["vision_config"]["out_hidden_size"] == text["hidden_size"]
    scheduler = config("scheduler", "scheduler_config.json")
    assert scheduler["max_shift"] == 0.9 and scheduler["max_image_seq_len"] == 8192
    assert scheduler["shift_terminal"] == 0.02 and scheduler["use_dynamic_shifting"] is True


def test_special_tokens_match_the_text_encoder(pipe: Any) -> None:
    tok, cfg = pipe.tokenizer, pipe.text_encoder.config
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.QWEN_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids) and all(
        i < cfg.text_config.vocab_size for i in ids.values()
    )
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert tok("<|vision_start|><|image_pad|><|vision_end|>").input_ids == [
        ids["<|vision_start|>"],
        ids["<|image_pad|>"],
        ids["<|vision_end|>"],
    ]
    # The pipeline drops the first 64 tokens (the system prompt); ours is exactly that long too.
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64
    assert tok.decode(tok("naïve 猫 🐱").input_ids) == "naïve 猫 🐱"  # byte-level: no <unk>


def test_ensure_reuses_a_complete_folder(model_dir: pathlib.Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")}
    assert tiny.ensure_tiny_model(str(model_dir)) == model_dir
    assert tiny.ensure_tiny_model(model_dir) == model_dir
    assert {p: p.stat().st_mtime_ns for p in model_dir.rglob("*")} == before


def test_same_seed_gives_byte_identical_files(
    model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    assert _files(again) == _files(model_dir)
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert _files(other)[weights] != _files(model_dir)[weights]


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv("QWEN_TINY_MODEL_DIR", raising=False)
    default = tiny.default_tiny_model_dir()
    assert default.name == f"tiny-{tiny.TINY_MODEL_VERSION}"
    assert default.parent == pathlib.Path.home() / ".cache" / "qwen-image-edit-serve"
    monkeypatch.setenv("QWEN_TINY_MODEL_DIR", str(tmp_path / "here"))
    assert tiny.default_tiny_model_dir() == tmp_path / "here"
    assert tiny.ensure_tiny_model() == tmp_path / "here"
    assert (tmp_path / "here" / "model_index.json").is_file()


def test_stale_or_empty_target_is_replaced(tmp_path: pathlib.Path) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / tiny._MARKER_NAME).write_text(json.dumps({"version": "0", "seed": 0}))
    (stale / "old.bin").write_bytes(b"old")
    assert (tiny.build_tiny_model(stale) / "model_index.json").is_file()
    assert not (stale / "old.bin").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (tiny.build_tiny_model(empty) / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "stale"]


def test_losing_a_race_to_another_builder_is_fine(
    model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # Another replica published first: our identical staging copy is simply dropped.
    target = pathlib.Path(shutil.copytree(model_dir, tmp_path / "model"))
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    staging = pathlib.Path(shutil.copytree(model_dir, tmp_path / ".model.building-x"))
    tiny._publish(staging, target, 0, tiny.DEFAULT_TINY_VARIANT)
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before


def test_concurrent_threads_build_once(tmp_path: pathlib.Path, model_dir: pathlib.Path) -> None:
    target = tmp_path / "model"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: tiny.build_tiny_model(target), range(3)))
    assert results == [target] * 3
    assert _files(target) == _files(model_dir)


def test_old_leftovers_of_crashed_builds_are_swept(tmp_path: pathlib.Path) -> None:
    old, young = tmp_path / ".model.building-old", tmp_path / ".model.building-young"
    old.mkdir()
    young.mkdir()
    os.utime(old, (0, 0))
    tiny.build_tiny_model(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.building-young", "model"]


def test_a_mount_point_is_filled_in_place(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = tmp_path / "volume"
    mount.mkdir()
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if mount in (pathlib.Path(src), pathlib.Path(dst)):
            raise OSError(errno.EBUSY, "Device or resource busy")  # what a mount point answers
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert tiny.build_tiny_model(mount) == mount
    assert (mount / "model_index.json").is_file() and tiny._is_complete(mount, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]


def test_a_foreign_folder_is_never_replaced(tmp_path: pathlib.Path) -> None:
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_model(foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96)])
def test_edit_returns_the_requested_size(pipe: Any, height: int, width: int) -> None:
    (out,) = _edit(pipe, [_image(0)], height=height, width=width)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8


def test_same_seed_same_output(pipe: Any) -> None:
    first, second = _edit(pipe, [_image(0)]), _edit(pipe, [_image(0)])
    assert np.array_equal(first[0], second[0])
    other = _edit(pipe, [_image(0)], generator=torch.Generator().manual_seed(1))
    assert not np.array_equal(first[0], other[0])


def test_two_reference_images(pipe: Any) -> None:
    (out,) = _edit(pipe, [_image(0), _image(1, (48, 80))])
    assert out.shape == (64, 64, 3)


def test_several_images_per_prompt_with_a_generator_each(pipe: Any) -> None:
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    outs = _edit(pipe, [_image(0)], num_images_per_prompt=2, generator=gens)
    assert [o.shape for o in outs] == [(64, 64, 3)] * 2
    assert not np.array_equal(outs[0], outs[1])
