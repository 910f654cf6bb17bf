"""Speed switches on the loaded transformer copies: fp8 quantization, the attention backend,
then regional compile (which must see the quantized layers). docs/gpu.md has their effect."""

from __future__ import annotations

import logging
from typing import Any

from serve_app.common.config import ModelConfig
from serve_app.pipeline.quantization import quantize_transformer
from serve_app.pipeline.rope import install_real_rope

logger = logging.getLogger("ray.serve")


def apply_speed_switches(transformers: list[Any], model: ModelConfig) -> list[str]:
    """Quantization, attention backend, then regional compile (which must see the quantized
    layers), on every transformer copy; returns log notes."""
    notes = []
    reports = [quantize_transformer(t, model.quantization) for t in transformers]
    if reports and reports[0] is not None:
        copies = f", each of {len(reports)} copies" if len(reports) > 1 else ""
        notes.append(reports[0].note() + copies)
    if model.attention_backend:
        for transformer in transformers:
            transformer.set_attention_backend(model.attention_backend)
        notes.append(f"attention backend: {model.attention_backend}")
    if model.compile:
        if any(hasattr(m, "_hf_hook") and _spans_devices(m) for m in transformers):
            notes.append("compile skipped: the transformer is split across GPUs")
            if model.quantization != "none":
                notes.append(f"warning: {model.quantization} without compile is slower than bf16")
        else:
            if install_real_rope():
                notes.append("rotary embedding: real arithmetic (fused by compile)")
            if model.compile_cpp_wrapper:
                import torch._inductor.config

                torch._inductor.config.cpp_wrapper = True  # process-wide: one pipeline per replica
                notes.append("compile: inductor C++ wrapper (kernel launches from C++)")
            for transformer in transformers:
                transformer.compile_repeated_blocks(fullgraph=True, dynamic=model.compile_dynamic)
            notes.append(
                f"compile: transformer blocks (fullgraph, dynamic={model.compile_dynamic}),"
                " compiled by the warm-up edit"
            )
    for note in notes:
        logger.info("%s", note)
    return notes


def _spans_devices(module: Any) -> bool:
    return len({p.device for p in module.parameters()}) > 1
