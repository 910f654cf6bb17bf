"""The embedded default model: a tiny Qwen-Image-Edit-Plus pipeline with random weights.

Other variants are built on request (``variant=``): ``"edit"`` (``QwenImageEditPipeline``, the
first Qwen-Image-Edit: one input image, its own prompt template), ``"2509"`` (the default,
``QwenImageEditPlusPipeline``) and ``"2511"`` (the Plus pipeline with the transformer's
``zero_cond_t``). ``build_tiny_lora`` makes a random LoRA for them (tests and demos).

It is built here, offline, from the *real* component classes (so every code path of the real
pipeline runs: processor, vision tower, MMDiT, VAE, scheduler) but with configs so small that a
2-step 64x64 edit with true CFG takes about half a second on two CPU cores. Nothing is
downloaded: the tokenizer is a byte-level BPE trained on a fixed corpus (``tokenizer.py``), and
the weights come from torch's RNG seeded with ``seed``, so the same seed always gives
byte-identical safetensors (checked across transformers 5.17 and 5.24).

The folder is written in diffusers format (``model_index.json`` naming
``QwenImageEditPlusPipeline``) and loads with ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any

from serve_app.pipeline.random_weights.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    byte_level_bpe,
    qwen2_tokenizer,
)

logger = logging.getLogger(__name__)

#: Bump whenever the recipe below changes: it names the cache folder and the marker, so a stale
#: build on disk is rebuilt instead of silently reused.
TINY_MODEL_VERSION: str = "1"

#: The variants ``build_tiny_model`` can make; "2509" is the embedded default.
TINY_VARIANTS: tuple[str, ...] = ("edit", "2509", "2511")
DEFAULT_TINY_VARIANT = "2509"

#: Written last inside the folder (before the atomic rename); its presence means "complete".
_MARKER_NAME = ".tiny-model.json"

#: Staging folders older than this are crashed builds (a build takes seconds) and get swept.
_LEFTOVER_AGE_S = 3600.0

#: Serializes builds within a process (they seed torch's process-wide RNG).
_BUILD_LOCK = threading.Lock()

#: The real Qwen-Image ``scheduler/scheduler_config.json`` (Qwen/Qwen-Image, -Edit, -Edit-2509).
_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Tiny sizes. Constraints that the real classes impose (each fails at load or in the first edit):
# - transformer in_channels = 4 * z_dim (2x2 packed latents), out_channels = z_dim;
# - sum(axes_dims_rope) = transformer head dim;
# - text mrope_section sums to text head_dim / 2;
# - vision out_hidden_size = text hidden (vision tokens replace <|image_pad|> embeddings);
# - joint_attention_dim = text hidden (the MMDiT consumes the text encoder's last hidden state);
# - VAE keeps 4 dim_mult levels and 3 temperal_downsample entries, so the 8x scale holds.
# Speed: the Plus pipeline always VAE-encodes every reference at ~1 MP, so the VAE dominates the
# CPU time. ``num_res_blocks=0`` drops all full-resolution residual blocks (their channel-first
# RMS norms are slow on CPU), base_dim 2 keeps the convs thin; what is left is conv_in and the
# mid-block attention over 128x128 latents (their cost fixed by the class). One DiT head
# halves the attention over the ~4k tokens each reference image adds.
_Z_DIM = 4
_TEXT_HIDDEN = 32
_TEXT_HEADS = 2
_MROPE_SECTION = [2, 3, 3]  # head_dim = 32 / 2 = 16 -> sections sum to 8
_VISION_HIDDEN = 32
_DIT_HEAD_DIM = 16
_DIT_HEADS = 1
_DIT_AXES_ROPE = (4, 6, 6)  # (frame, height, width) rotary dims, sum = head dim
_VAE_BASE_DIM = 2
_BPE_VOCAB_SIZE = 512

# Fixed training text for the BPE: the pipeline's own prompt template plus common edit words, so
# prompts tokenize into plausible multi-byte pieces. Training on the template also makes its
# system-prompt prefix exactly 64 tokens, as with the real tokenizer: the pipeline drops the first
# ``prompt_template_encode_start_idx = 64`` hidden states, so a longer prefix would leak system
# text into the conditioning and a shorter one would cut the user's prompt. Changing the corpus
# changes the tokenizer: bump the version.
_BPE_CORPUS: tuple[str, ...] = (
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate.",
    "system user assistant Picture 1: Picture 2: Picture 3:",
    "make it blue red green yellow black white add remove replace change the sky the cat "
    "the dog a person background style photo painting sketch brighter darker text sign",
    "0123456789 , . ; : ! ? ' \" ( ) [ ] - _ / \\ \n",
)


def default_tiny_model_dir(variant: str = DEFAULT_TINY_VARIANT) -> pathlib.Path:
    """Where the embedded model lives: ``$QWEN_TINY_MODEL_DIR`` or a per-version cache.

    The default variant keeps the historical folder name; others get a suffix."""
    override = os.environ.get("QWEN_TINY_MODEL_DIR")
    suffix = "" if variant == DEFAULT_TINY_VARIANT else f"-{variant}"
    if override:
        return pathlib.Path(override + suffix).expanduser()
    name = f"tiny-{TINY_MODEL_VERSION}{suffix}"
    return pathlib.Path.home() / ".cache" / "qwen-image-edit-serve" / name


def ensure_tiny_model(
    path: str | os.PathLike[str] | None = None, *, variant: str = DEFAULT_TINY_VARIANT
) -> pathlib.Path:
    """Return a complete tiny-model folder at ``path`` (default: ``default_tiny_model_dir()``),
    building it first if it is missing or from another recipe version or variant."""
    target = (
        pathlib.Path(path).expanduser() if path is not None else default_tiny_model_dir(variant)
    )
    return build_tiny_model(target, variant=variant)


def build_tiny_model(
    target_dir: str | os.PathLike[str], *, seed: int = 0, variant: str = DEFAULT_TINY_VARIANT
) -> pathlib.Path:
    """Build the tiny pipeline and save it, in diffusers format, into ``target_dir``.

    The folder appears atomically: everything is written into a temporary sibling that is renamed
    into place only when complete, so concurrent replicas never load half a folder. If
    ``target_dir`` already holds a build of this recipe version and seed, it is returned as is
    (without importing torch). An existing folder that is not a tiny-model build is never
    replaced: that raises ``FileExistsError``.

    Weights are drawn from torch's global CPU RNG (seeded, then restored); builds in this module
    are serialized, but another thread drawing from that RNG during the build would change
    the weights, so build before serving starts.
    """
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {TINY_VARIANTS}")
    target = pathlib.Path(target_dir).expanduser().absolute()
    if _is_complete(target, seed, variant):
        return target
    # Threads of one process share torch's global RNG, so two concurrent builds would interleave
    # their seeded draws and give other weights; processes (replicas) each have their own RNG.
    with _BUILD_LOCK:
        if _is_complete(target, seed, variant):  # built by another thread while we waited
            return target
        _build_into(target, seed, variant)
    return target


def _build_into(target: pathlib.Path, seed: int, variant: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(target)
    logger.info("building the tiny %s model (seed %d) in %s", variant, seed, target)
    # A sibling, so the final rename stays on one filesystem (rename is atomic only there).
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        pipe = _build_pipeline(seed, variant)
        pipe.save_pretrained(staging, safe_serialization=True)
        marker = {"version": TINY_MODEL_VERSION, "seed": seed, "variant": variant}
        (staging / _MARKER_NAME).write_text(json.dumps(marker, sort_keys=True) + "\n")
        _make_readable(staging)
        _publish(staging, target, seed, variant)
    finally:
        # Gone already when the rename won; left over when another builder won or we failed.
        shutil.rmtree(staging, ignore_errors=True)


def _is_complete(folder: pathlib.Path, seed: int, variant: str = DEFAULT_TINY_VARIANT) -> bool:
    try:
        marker = json.loads((folder / _MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("version") == TINY_MODEL_VERSION
        and marker.get("seed") == seed
        # Builds from before variants existed have no key: they are the default variant.
        and marker.get("variant", DEFAULT_TINY_VARIANT) == variant
    )


def _make_readable(root: pathlib.Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600 files; other users sharing the
    # cache (or a volume) only need to read it.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _sweep_leftovers(target: pathlib.Path) -> None:
    # A builder killed mid-way (OOM, SIGKILL) leaves its staging folder behind. Only old ones
    # are removed: a young one may belong to a concurrent builder that is still writing.
    cutoff = time.time() - _LEFTOVER_AGE_S
    for pattern in (f".{target.name}.building-*", f".{target.name}.stale-*"):
        for leftover in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    shutil.rmtree(leftover, ignore_errors=True)


def _publish(staging: pathlib.Path, target: pathlib.Path, seed: int, variant: str) -> None:
    """Move the finished ``staging`` folder to ``target``; tolerate a concurrent builder."""
    try:
        # Atomic; also replaces an empty directory. Fails if ``target`` has content.
        os.rename(staging, target)
        return
    except OSError:
        pass
    if _is_complete(target, seed, variant):
        return  # another replica finished first; same recipe and seed, hence the same bytes
    is_empty_dir = target.is_dir() and not any(target.iterdir())
    if not is_empty_dir and not (target / _MARKER_NAME).is_file():
        # Never delete what we did not build (a mistyped $QWEN_TINY_MODEL_DIR, a real model).
        raise FileExistsError(f"{target} exists and is not a tiny-model folder; not replacing it")
    # ``target`` is an older recipe or another seed, or an empty directory that cannot be
    # renamed over. Move it aside and rename ours in (readers may briefly find no folder).
    trash = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(target, trash)
    except FileNotFoundError:
        pass  # a concurrent builder moved it aside already
    except OSError:
        # A mount point (e.g. a Kubernetes volume) cannot be renamed: fill it in place instead,
        # with the marker written last so the folder never looks complete before it is.
        _copy_into(staging, target)
        return
    try:
        os.rename(staging, target)
    except OSError:
        if not _is_complete(target, seed, variant):
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _copy_into(staging: pathlib.Path, target: pathlib.Path) -> None:
    (target / _MARKER_NAME).unlink(missing_ok=True)
    for entry in target.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in staging.iterdir():
        if entry.name == _MARKER_NAME:
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
    shutil.copy2(staging / _MARKER_NAME, target / _MARKER_NAME)


def _build_pipeline(seed: int, variant: str = DEFAULT_TINY_VARIANT) -> Any:
    # Imported here: torch/diffusers/transformers cost seconds to import, and callers that only
    # want the folder path (or an already-built folder) should not pay for them.
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}

    # Models are created in float32 whatever the process default is, so the bytes never depend on
    # the caller; each one gets its own reseed so adding a component later does not shift others.
    # fork_rng restores the caller's global CPU RNG afterwards (devices=[]: never touch CUDA).
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder_config = Qwen2_5_VLConfig(
                text_config={
                    "vocab_size": len(tokenizer),
                    "hidden_size": _TEXT_HIDDEN,
                    "intermediate_size": 2 * _TEXT_HIDDEN,
                    "num_hidden_layers": 1,
                    "num_attention_heads": _TEXT_HEADS,
                    "num_key_value_heads": 1,
                    "max_position_embeddings": 128000,  # as the real 7B; costs nothing
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 1000000.0,
                        "mrope_section": _MROPE_SECTION,
                    },
                    "bos_token_id": ids["<|endoftext|>"],
                    "eos_token_id": ids["<|im_end|>"],
                    "pad_token_id": ids["<|endoftext|>"],
                },
                vision_config={
                    "depth": 1,
                    "hidden_size": _VISION_HIDDEN,
                    "intermediate_size": 2 * _VISION_HIDDEN,
                    "num_heads": 2,
                    "out_hidden_size": _TEXT_HIDDEN,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "window_size": 112,
                    "fullatt_block_indexes": [0],  # the one block is a full-attention one
                },
                image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"],
            )
            text_encoder = Qwen2_5_VLForConditionalGeneration(encoder_config)

            torch.manual_seed(seed + 1)
            transformer = QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=4 * _Z_DIM,
                out_channels=_Z_DIM,
                num_layers=1,
                attention_head_dim=_DIT_HEAD_DIM,
                num_attention_heads=_DIT_HEADS,
                joint_attention_dim=_TEXT_HIDDEN,
                axes_dims_rope=_DIT_AXES_ROPE,
                # 2511: the reference-image tokens get timestep 0 (the class's own switch).
                zero_cond_t=variant == "2511",
            )

            torch.manual_seed(seed + 2)
            vae = AutoencoderKLQwenImage(
                base_dim=_VAE_BASE_DIM,
                z_dim=_Z_DIM,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=0,
                attn_scales=[],
                temperal_downsample=[False, True, True],
                # The real per-channel statistics, cut to the tiny latent width.
                latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075][:_Z_DIM],
                latents_std=[2.8184, 1.4541, 2.3275, 2.6558][:_Z_DIM],
            )
    finally:
        torch.set_default_dtype(previous_dtype)

    processor = Qwen2VLProcessor(
        # torchvision-backed in transformers >= 5.17 (the range pyproject allows); the processor
        # needs it (it was ``Qwen2VLImageProcessorFast`` in early 5.x, now a deprecated alias).
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        # transformers 5 no longer builds a default video processor on its own.
        video_processor=Qwen2VLVideoProcessor(),
    )
    # Same components for every variant; the class brings the prompt template and image count.
    pipeline_cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    return pipeline_cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


def _build_tokenizer() -> Any:
    return qwen2_tokenizer(byte_level_bpe(_BPE_CORPUS, vocab_size=_BPE_VOCAB_SIZE))


#: The attention projections of every MMDiT block: the usual LoRA targets for Qwen-Image.
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]


def build_tiny_lora(
    model_dir: str | os.PathLike[str],
    target_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    rank: int = 4,
    gain: float = 20.0,
) -> pathlib.Path:
    """A random LoRA for the tiny model's transformer, in diffusers' LoRA format.

    Written as ``target_dir/pytorch_lora_weights.safetensors`` (what ``save_lora_weights``
    writes and ``load_lora_weights`` reads). peft's random init is tiny; ``gain`` scales the
    up-projections so the adapter visibly changes outputs. Returns the weights file.
    """
    import torch
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=_LORA_TARGETS, init_lora_weights=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    state = {
        key: value * gain if "lora_B" in key else value
        for key, value in get_peft_model_state_dict(transformer).items()
    }
    target = pathlib.Path(target_dir)
    # The LoRA file format is the same for every Qwen-Image pipeline class.
    QwenImageEditPlusPipeline.save_lora_weights(target, transformer_lora_layers=state)
    return target / "pytorch_lora_weights.safetensors"
