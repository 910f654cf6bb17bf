"""Speed switches on the loaded transformer: fp8 quantization, the attention backend, the
modulation tables (each block's timestep modulation made once per edit), then regional compile
(which must see the quantized layers) with the rewrites it fuses better (real-valued RoPE; on CUDA
the feed-forward GELU in the GEMM epilogue, or in its sigmoid form after an fp8 GEMM, and the
joint attention's query and key from one Triton kernel).
docs/gpu.md has their effect."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from serve_app.common.config import ModelConfig
from serve_app.pipeline.speed.modulation import Schedule, install_modulation_tables, tables_fit
from serve_app.pipeline.speed.quantization import quantize_transformer
from serve_app.pipeline.speed.rope import install_real_rope

logger = logging.getLogger("ray.serve")


def find_cxx_compiler(
    *,
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> str | None:
    """The C++ compiler inductor's C++ wrapper would build with, or None.

    Inductor (torch._inductor.config.cpp.cxx on Linux) takes $CXX, else g++; it looks for no
    other name, so neither do we.
    """
    env = os.environ if environ is None else environ
    return which(env.get("CXX") or "g++")


def apply_speed_switches(
    transformer: Any,
    model: ModelConfig,
    *,
    find_cxx: Callable[[], str | None] = find_cxx_compiler,
    schedule: Schedule | None = None,
) -> list[str]:
    """Quantization, attention backend, modulation tables (where `schedule` gives the
    pipeline's timesteps), then regional compile (which must see the quantized layers), on the
    transformer; returns log notes. `find_cxx` finds the C++ compiler (tests inject one)."""
    notes = []
    report = quantize_transformer(
        transformer, model.quantization, modulation=model.quantize_at_load
    )
    if report is not None:
        notes.append(report.note())
    if model.attention_backend:
        transformer.set_attention_backend(model.attention_backend)
        notes.append(f"attention backend: {model.attention_backend}")
    if schedule is not None:
        notes.append(_modulation_note(transformer, schedule))
    if model.compile:
        if hasattr(transformer, "_hf_hook") and _spans_devices(transformer):
            notes.append("compile skipped: the transformer is split across GPUs")
            if model.quantization != "none":
                notes.append(f"warning: {model.quantization} without compile is slower than bf16")
        else:
            if install_real_rope():
                notes.append("rotary embedding: real arithmetic (fused by compile)")
            if _on_cuda(transformer):
                from serve_app.pipeline.speed.gelu import (
                    install_gelu_epilogue,
                    install_sigmoid_gelu,
                )

                if fused := install_gelu_epilogue(transformer):
                    notes.append(f"feed-forward GELU: in the GEMM epilogue of {fused} linears")
                if rest := install_sigmoid_gelu(transformer):
                    notes.append(f"feed-forward GELU: as x * sigmoid(2u) after {rest} linears")
                if joined := _join_query_key(transformer):
                    notes.append(
                        f"joint attention: query and key normed, rotated and joined by one Triton"
                        f" kernel in {joined} attentions"
                    )
            if model.compile_cpp_wrapper and find_cxx() is None:
                # A speed switch only (docs/gpu.md): serve without it rather than fail mid-compile.
                notes.append(
                    "warning: compile_cpp_wrapper is OFF: no C++ compiler (inductor looks for $CXX,"
                    " else g++). Install g++ (deploy/Dockerfile does) or set CXX to enable it;"
                    " outputs are the same, edits a little slower"
                )
            elif model.compile_cpp_wrapper:
                import torch._inductor.config

                torch._inductor.config.cpp_wrapper = True  # process-wide: one pipeline per replica
                notes.append("compile: inductor C++ wrapper (kernel launches from C++)")
            transformer.compile_repeated_blocks(fullgraph=True, dynamic=model.compile_dynamic)
            notes.append(
                f"compile: transformer blocks (fullgraph, dynamic={model.compile_dynamic}),"
                " compiled by the warm-up edit"
            )
    for note in notes:
        logger.log(logging.WARNING if note.startswith("warning") else logging.INFO, "%s", note)
    return notes


def compile_text_encoder(text_encoder: Any, **options: Any) -> str:
    """torch.compile each repeated layer of the text encoder (Qwen2.5-VL: the language model's
    decoder layers, the vision tower's blocks) with dynamic shapes, as regional compile does for
    the transformer: one compiled graph serves every layer and every prompt length. Returns the
    log note; `options` go to `Module.compile` (tests pick a backend)."""
    inner = getattr(text_encoder, "model", text_encoder)
    groups = {
        "decoder layers": getattr(getattr(inner, "language_model", None), "layers", None),
        "vision blocks": getattr(getattr(inner, "visual", None), "blocks", None),
    }
    done = []
    for what, layers in groups.items():
        if not layers:
            continue
        for layer in layers:
            layer.compile(**{"dynamic": True, **options})
        done.append(f"{len(layers)} {what}")
    if done:
        note = f"compile: text encoder's {' and '.join(done)} (dynamic), compiled by the warm-up"
    else:
        note = "warning: compile_text_encoder: no repeated layers found; the text encoder is eager"
    logger.log(logging.WARNING if not done else logging.INFO, "%s", note)
    return note


def _modulation_note(transformer: Any, schedule: Schedule) -> str:
    if reason := tables_fit(transformer):
        return f"modulation: per forward ({reason})"
    tables = install_modulation_tables(transformer, schedule)
    if tables is None:
        return "modulation: tables installed before"
    return f"modulation: {len(tables.modules)} projections made once per edit for all its steps"


def _join_query_key(transformer: Any) -> int:
    """The streams joined before the QK norm by the Triton kernel (`joint_qk`); returns how many
    attentions run it (0 where Triton is missing)."""
    from serve_app.pipeline.speed.joint_qk import (
        JointQKAttnProcessor,
        enable_kernel,
        install_joint_qk,
    )

    if not enable_kernel():
        return 0
    install_joint_qk(transformer)  # Ulysses' processor (parallel/attention.py) is one already
    return sum(
        isinstance(getattr(m, "processor", None), JointQKAttnProcessor)
        for m in transformer.modules()
    )


def _spans_devices(module: Any) -> bool:
    return len({p.device for p in module.parameters()}) > 1


def _on_cuda(module: Any) -> bool:
    return any(str(p.device).startswith("cuda") for p in module.parameters())
